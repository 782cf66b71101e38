"""HTTP response shapes of the OpenAI-compatible API, as msgspec Structs: what /openapi.json describes.

The gateway builds the hot responses as plain dicts (services/gateway/formats.py) for speed; these Structs
say what those dicts are, and the test suite holds them to it (every response validates against the spec).
"""

from __future__ import annotations

from typing import Any, Literal

from msgspec import Struct

FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


class ErrorDetail(Struct):
    message: str
    type: str
    code: str | None
    param: str | None


class ErrorResponse(Struct):
    """Every error: OpenAI's shape, code from the catalogue (contracts/errors.py)."""

    error: ErrorDetail


class CompletionUsage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCallOut(Struct):
    name: str
    arguments: str  # JSON text


class ToolCallOut(Struct):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class TopLogprobOut(Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprobOut]


class ChoiceLogprobs(Struct):
    content: list[TokenLogprobOut] | None
    refusal: list[TokenLogprobOut] | None


class AssistantMessage(Struct):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(Struct):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(Struct):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str  # "<engine>:<version>" that served
    choices: list[ChatChoice]
    usage: CompletionUsage


class FunctionDelta(Struct):
    name: str | None = None
    arguments: str | None = None


class ToolCallDeltaOut(Struct):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta | None = None


class ChunkDelta(Struct):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDeltaOut] | None = None


class ChunkChoice(Struct):
    index: int
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(Struct):
    """One `data:` event of a streamed chat completion (the stream ends with `data: [DONE]`)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None


class LegacyLogprobs(Struct):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class TextChoice(Struct):
    index: int
    text: str
    logprobs: LegacyLogprobs | None
    finish_reason: FinishReason | None


class TextCompletion(Struct):
    """A text completion, whole or (streamed) one `data:` event of it."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[TextChoice]
    usage: CompletionUsage | None = None


class ModelObject(Struct):
    """A model; `inferbus` adds its versions, traffic policy and live workers."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    kind: str | None = None
    version: str | None = None  # the stable version
    workers: int | None = None  # live workers
    inferbus: dict[str, Any] | None = None


class ModelList(Struct):
    object: Literal["list"]
    data: list[ModelObject]


class Health(Struct):
    status: str


class Readiness(Struct):
    status: Literal["ready", "not_ready"]
    problems: list[str]


class DeletedObject(Struct):
    id: str
    object: str
    deleted: bool
