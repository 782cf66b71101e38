"""Anthropic's Messages API, inbound: the request, the message object, its stream events and error shape."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from contracts.llm import MaxTokens

# Our catalogue's codes as Anthropic's error types.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    499: "api_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
}


class Block(Struct, kw_only=True, forbid_unknown_fields=True):
    """A content block: text, tool_use, tool_result (others are refused by name; thinking is dropped)."""

    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: Any = None
    tool_use_id: str | None = None
    content: str | list[Block] | None = None
    is_error: bool | None = None
    cache_control: dict[str, Any] | None = None
    citations: Any = None
    source: Any = None
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None
    caller: Any = None  # a tool_use block as we sent it


class InputMessage(Struct, forbid_unknown_fields=True):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ToolParam(Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    input_schema: dict[str, Any] | None = None
    description: str | None = None
    type: str | None = None  # "custom" or absent; server tools (web_search, ...) are refused
    cache_control: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceParam(Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class MetadataParam(Struct, forbid_unknown_fields=True):
    user_id: str | None = None


class OutputFormat(Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["json_schema"]
    schema: dict[str, Any]


class OutputConfig(Struct, kw_only=True, forbid_unknown_fields=True):
    """Structured output (`format`) and reasoning `effort`."""

    format: OutputFormat | None = None
    effort: str | None = None


class MessagesRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    max_tokens: MaxTokens
    messages: list[InputMessage]
    system: str | list[Block] | None = None
    stop_sequences: list[str] | None = None
    stream: bool | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    top_k: int | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoiceParam | None = None
    metadata: MetadataParam | None = None
    thinking: dict[str, Any] | None = None
    output_config: OutputConfig | None = None
    service_tier: str | None = None
    cache_control: dict[str, Any] | None = None  # a caching hint: it changes no output
    # Refused when set: nothing here runs them.
    container: Any = None
    mcp_servers: Any = None
    inference_geo: Any = None
    speed: Any = None
    diagnostics: Any = None
    workspace_id: Any = None
    user_profile_id: Any = None


class CountTokensRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    messages: list[InputMessage]
    system: str | list[Block] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoiceParam | None = None
    thinking: dict[str, Any] | None = None
    output_config: OutputConfig | None = None
    cache_control: dict[str, Any] | None = None


class TokenCount(Struct):
    input_tokens: int


class TextBlock(Struct, tag="text", tag_field="type"):
    text: str
    citations: list[Any] | None = None


class DirectCaller(Struct, frozen=True, tag="direct", tag_field="type"):
    """A tool call the model made itself (not a server tool's)."""


class ToolUseBlock(Struct, tag="tool_use", tag_field="type"):
    id: str
    name: str
    input: Any
    caller: DirectCaller = DirectCaller()


class MessageUsage(Struct):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation: dict[str, int] | None = None
    inference_geo: str | None = None
    output_tokens_details: dict[str, int] | None = None
    server_tool_use: dict[str, int] | None = None
    service_tier: Literal["standard", "priority", "batch"] | None = "standard"


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use", "refusal"]


class MessageObject(Struct, kw_only=True):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[TextBlock | ToolUseBlock]
    stop_reason: StopReason | None
    stop_sequence: str | None = None
    stop_details: dict[str, Any] | None = None
    container: dict[str, Any] | None = None
    usage: MessageUsage


class StreamEvent(Struct, kw_only=True):
    """One streamed event (`event:` names its `type`): message_start, content_block_delta, ..., message_stop."""

    type: str
    index: int | None = None
    message: MessageObject | None = None
    content_block: TextBlock | ToolUseBlock | None = None
    delta: dict[str, Any] | None = None
    usage: dict[str, int] | None = None
    error: dict[str, str] | None = None


class AnthropicErrorBody(Struct):
    type: str
    message: str


class AnthropicError(Struct):
    """Anthropic's error shape: {"type": "error", "error": {"type", "message"}}."""

    type: Literal["error"]
    error: AnthropicErrorBody
    request_id: str | None = None
