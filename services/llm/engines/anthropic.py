"""Anthropic Messages API as a translator: system on top, max_tokens required, named stream events."""

from __future__ import annotations

from typing import Any

import msgspec

from contracts.errors import InferBusError
from contracts.llm import GenerateRequest, Message, ToolCallDelta
from services.llm.engines.remote import RemoteEngine, SSEEvent, Turn, arguments_object, conversation

FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "refusal": "content_filter",
    "tool_use": "tool_calls",
    "pause_turn": "stop",
}


class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None

    def prompt(self) -> int | None:
        if self.input_tokens is None:
            return None
        return self.input_tokens + (self.cache_creation_input_tokens or 0) + (self.cache_read_input_tokens or 0)


class _Message(msgspec.Struct):
    usage: _Usage | None = None


class _MessageStart(msgspec.Struct):
    message: _Message


class _TextDelta(msgspec.Struct):
    type: str
    text: str = ""
    partial_json: str = ""


class _BlockDelta(msgspec.Struct):
    index: int
    delta: _TextDelta


class _Block(msgspec.Struct):
    type: str
    id: str | None = None
    name: str | None = None


class _BlockStart(msgspec.Struct):
    index: int
    content_block: _Block


class _StopDelta(msgspec.Struct):
    stop_reason: str | None = None


class _MessageDelta(msgspec.Struct):
    delta: _StopDelta
    usage: _Usage | None = None


class _ErrorDetail(msgspec.Struct):
    type: str = "error"
    message: str = ""


class _ErrorEvent(msgspec.Struct):
    error: _ErrorDetail


_start = msgspec.json.Decoder(_MessageStart)
_block = msgspec.json.Decoder(_BlockDelta)
_block_start = msgspec.json.Decoder(_BlockStart)
_message_delta = msgspec.json.Decoder(_MessageDelta)
_error = msgspec.json.Decoder(_ErrorEvent)


def messages(request: GenerateRequest, turns: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Turns as Anthropic messages: calls as tool_use blocks, results as tool_result blocks of a user turn."""
    out: list[dict[str, Any]] = []
    source: list[Message] = request.messages or []
    for i, (role, text) in enumerate(turns):
        m = source[i] if request.messages is not None else None
        if role == "system":
            continue
        if role == "tool" and m is not None:
            if m.tool_call_id is None:
                param = f"messages[{i}].tool_call_id"
                raise InferBusError("invalid_request", f"{param}: a tool result must name its call", param=param)
            block = {"type": "tool_result", "tool_use_id": m.tool_call_id, "content": text}
            if out and out[-1]["role"] == "user" and isinstance(out[-1]["content"], list):
                out[-1]["content"].append(block)  # results of parallel calls go back in one turn
            else:
                out.append({"role": "user", "content": [block]})
        elif m is not None and m.tool_calls:
            blocks: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
            blocks += [{"type": "tool_use", "id": c.id, "name": c.name,
                        "input": arguments_object(c.arguments, f"messages[{i}].tool_calls[{j}].function.arguments")}
                       for j, c in enumerate(m.tool_calls)]
            out.append({"role": "assistant", "content": blocks})
        else:
            out.append({"role": role, "content": text})
    return out


def tools_fields(request: GenerateRequest) -> dict[str, Any]:
    """tools and tool_choice; structured output and effort in `output_config`."""
    body: dict[str, Any] = {}
    config: dict[str, Any] = {}
    if (fmt := request.response_format) is not None:
        schema = fmt.schema if fmt.schema is not None else {"type": "object"}
        config["format"] = {"type": "json_schema", "schema": schema}
    if request.reasoning_effort is not None:
        config["effort"] = request.reasoning_effort
    if config:
        body["output_config"] = config
    if not request.tools:
        return body
    body["tools"] = [
        {"name": t.name, "description": t.description or "",
         "input_schema": t.parameters if t.parameters is not None else {"type": "object", "properties": {}}}
        for t in request.tools
    ]
    choice: dict[str, Any] = {"auto": {"type": "auto"}, "required": {"type": "any"}, "none": {"type": "none"}}[
        request.tool_choice]
    if request.tool_name is not None:
        choice = {"type": "tool", "name": request.tool_name}
    if not request.parallel_tool_calls and choice["type"] != "none":
        choice["disable_parallel_tool_use"] = True
    body["tool_choice"] = choice
    return body


class AnthropicEngine(RemoteEngine):
    name = "anthropic"
    default_base_url = "https://api.anthropic.com"
    supported = frozenset({"tools", "response_format", "reasoning_effort"})

    def __init__(self, *, anthropic_version: str = "2023-06-01", **options: Any) -> None:
        super().__init__(**options)
        self.anthropic_version = anthropic_version

    def body(self, request: GenerateRequest) -> dict[str, Any]:
        turns = conversation(request, tools=True)
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": request.max_tokens,
            "messages": messages(request, turns),
            "stream": True,
        }
        if system := "\n\n".join(text for role, text in turns if role == "system"):
            body["system"] = system
        # Anthropic's range is 0..1 and newer models refuse temperature and top_p together: send only
        # what differs from the shared default (1.0).
        if request.temperature != 1.0:
            body["temperature"] = min(request.temperature, 1.0)
        if request.top_p != 1.0:
            body["top_p"] = request.top_p
        if request.stop:
            body["stop_sequences"] = request.stop
        if request.user is not None:
            body["metadata"] = {"user_id": request.user}
        if not request.plain:
            body.update(tools_fields(request))
        return body

    def stream_url(self) -> str:
        return f"{self.base_url}/v1/messages"

    def models_url(self) -> str:
        return f"{self.base_url}/v1/models"

    def auth_headers(self) -> dict[str, str]:
        headers = {"anthropic-version": self.anthropic_version}
        if self.api_key:
            headers["x-api-key"] = self.api_key
        return headers

    def read(self, event: SSEEvent, turn: Turn) -> str:
        if event.event == "content_block_delta":
            block = self.decode(_block, event)
            delta = block.delta
            if delta.type == "text_delta":
                return delta.text
            if delta.type == "input_json_delta" and block.index in turn.blocks and delta.partial_json:
                turn.calls.append(ToolCallDelta(turn.blocks[block.index], None, None, delta.partial_json))
            return ""
        if event.event == "content_block_start":
            start = self.decode(_block_start, event)
            if start.content_block.type == "tool_use":
                turn.blocks[start.index] = turn.call(start.content_block.id, start.content_block.name or "")
            return ""
        if event.event == "message_start":
            usage = self.decode(_start, event).message.usage
            if usage is not None:
                turn.prompt_tokens = usage.prompt()
                turn.completion_tokens = usage.output_tokens
        elif event.event == "message_delta":
            message = self.decode(_message_delta, event)
            if message.delta.stop_reason:
                turn.finish = FINISH.get(message.delta.stop_reason, "stop")
            if message.usage is not None:
                turn.prompt_tokens = message.usage.prompt() or turn.prompt_tokens
                if message.usage.output_tokens is not None:
                    turn.completion_tokens = message.usage.output_tokens
        elif event.event == "error":
            error = self.decode(_error, event).error
            raise self.upstream.fail("upstream_error", f"failed mid-stream: {error.type}: {error.message}")
        return ""  # ping, content_block_start/stop, message_stop, and event types added later
