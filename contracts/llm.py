"""LLM messages: the OpenAI-shaped requests the edge accepts, and what travels on the bus."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from contracts.errors import InferBusError, invalid

Role = Literal["system", "developer", "user", "assistant", "tool"]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(ge=0.0, le=1.0)]
MaxTokens = Annotated[int, Meta(ge=1, le=1 << 20)]  # bounded: it travels as msgpack, and no model goes further
Seed = Annotated[int, Meta(ge=-(1 << 63), le=(1 << 63) - 1)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]


# ---- OpenAI HTTP shapes (JSON) --------------------------------------------------------------


class TextPart(Struct, tag="text", tag_field="type"):
    text: str


class ImageUrlPart(Struct, tag="image_url", tag_field="type"):
    image_url: dict[str, Any]


class InputAudioPart(Struct, tag="input_audio", tag_field="type"):
    input_audio: dict[str, Any]


ContentPart = TextPart | ImageUrlPart | InputAudioPart


class ChatMessage(Struct):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    refusal: str | None = None


class StreamOptions(Struct, forbid_unknown_fields=True):
    include_usage: bool = False
    include_obfuscation: bool | None = None


class _SamplingFields(Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: int | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None


class ChatCompletionRequest(_SamplingFields, kw_only=True, forbid_unknown_fields=True):
    messages: list[ChatMessage]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[str] | None = None
    reasoning_effort: str | None = None
    prediction: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None


class CompletionRequest(_SamplingFields, kw_only=True, forbid_unknown_fields=True):
    prompt: str | list[Any]
    max_tokens: MaxTokens | None = 16
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


# ---- Bus shapes (msgpack) -------------------------------------------------------------------

# A retry before the first token is a new attempt under the same request id (0: the first send); the
# worker copies it into its usage event, and each attempt is billed for what it did.
MAX_ATTEMPT = 99
Attempt = Annotated[int, Meta(ge=0, le=MAX_ATTEMPT)]


class Message(Struct, frozen=True, array_like=True):
    role: str
    content: str


class GenerateRequest(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One generation: a chat (messages) or a plain completion (prompt), already validated."""

    request_id: str
    model: str
    max_tokens: int
    messages: list[Message] | None = None
    prompt: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = []
    seed: int | None = None
    user: str | None = None
    # A shadow copy (progressive delivery): its output is compared, never returned, never billed.
    shadow: bool = False
    attempt: Attempt = 0


class Usage(Struct, frozen=True, array_like=True):
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Accepted(Struct, frozen=True, tag="a", array_like=True):
    """First message of every stream: a worker took the request (it may still be queued)."""

    seq: int
    worker_id: str
    version: str


class Delta(Struct, frozen=True, tag="d", array_like=True):
    seq: int
    text: str
    tokens: int


class Heartbeat(Struct, frozen=True, tag="h", array_like=True):
    """Sent while no token is ready (queued, prefill), so an idle timeout means a dead worker."""

    seq: int


class Final(Struct, frozen=True, tag="f", array_like=True):
    seq: int
    finish_reason: str
    usage: Usage
    version: str


class ErrorChunk(Struct, frozen=True, tag="e", array_like=True):
    seq: int
    code: str
    message: str
    retry_after: float | None = None  # seconds, when the cause says (an upstream's 429 Retry-After)

    def to_error(self) -> InferBusError:
        exc = InferBusError(self.code, self.message)
        return exc.retry_in(self.retry_after) if self.retry_after is not None else exc


class Bundle(Struct, frozen=True, tag="b", array_like=True):
    """Several chunks of one stream in one bus message, for callers that ask (`Inferbus-Bundle: 1`).

    `items` are the chunks' own encodings, in order, each with its own seq (`seq` is the first's); a
    short answer complete before the worker's first flush (Accepted, Delta, Final) is one message.
    """

    seq: int
    items: list[msgspec.Raw]


Chunk = Accepted | Delta | Heartbeat | Final | ErrorChunk | Bundle
TERMINAL = (Final, ErrorChunk)

chunk_encoder = msgspec.msgpack.Encoder()
chunk_decoder = msgspec.msgpack.Decoder(Chunk)
request_encoder = msgspec.msgpack.Encoder()
request_decoder = msgspec.msgpack.Decoder(GenerateRequest)


# ---- Edge -> bus translation ----------------------------------------------------------------

_NEUTRAL_REJECTS: dict[str, str] = {
    "tools": "tool calling is not supported by this model",
    "logit_bias": "logit_bias is not supported",
    "prediction": "predicted outputs are not supported",
    "audio": "audio output is not supported on chat completions",
    "suffix": "suffix is not supported",
}


def _unsupported(param: str, message: str) -> InferBusError:
    return InferBusError("unsupported_parameter", message, param=param)


def _check_common(req: _SamplingFields) -> None:
    if not req.model:
        raise invalid("model must not be empty", "model")
    if req.n not in (None, 1):
        raise _unsupported("n", "only n=1 is supported")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise _unsupported(name, f"{name} is not supported")
    if req.logprobs not in (None, False, 0):
        raise _unsupported("logprobs", "logprobs are not supported")
    if req.logit_bias:
        raise _unsupported("logit_bias", _NEUTRAL_REJECTS["logit_bias"])
    if req.stream_options is not None and not req.stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > 4:
        raise invalid("stop may hold at most 4 sequences", "stop")
    if any(not s for s in stops):
        raise invalid("stop sequences must not be empty", "stop")
    return stops


def _text_of(message: ChatMessage, index: int) -> str:
    content = message.content
    if content is None:
        if message.role == "assistant":
            return ""
        raise invalid(f"messages[{index}].content is required", f"messages[{index}].content")
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if not isinstance(part, TextPart):
            raise _unsupported(f"messages[{index}].content", "this model accepts text content only")
        texts.append(part.text)
    return "".join(texts)


def chat_to_generate(req: ChatCompletionRequest, request_id: str, default_max_tokens: int) -> GenerateRequest:
    _check_common(req)
    if not req.messages:
        raise invalid("messages must hold at least one message", "messages")
    for name in ("tools", "prediction", "audio"):
        if getattr(req, name):
            raise _unsupported(name, _NEUTRAL_REJECTS[name])
    if req.tool_choice not in (None, "none", "auto"):
        raise _unsupported("tool_choice", "tool calling is not supported by this model")
    if req.response_format and req.response_format.get("type") not in ("text", None):
        raise _unsupported("response_format", "only response_format type 'text' is supported")
    if req.modalities and req.modalities != ["text"]:
        raise _unsupported("modalities", "only text output is supported")
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise invalid("set max_tokens or max_completion_tokens, not both", "max_tokens")
    messages = [Message(m.role, _text_of(m, i)) for i, m in enumerate(req.messages)]
    return GenerateRequest(
        request_id=request_id,
        model=req.model,
        messages=messages,
        max_tokens=req.max_completion_tokens or req.max_tokens or default_max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        stop=_stops(req.stop),
        seed=req.seed,
        user=req.user,
    )


def completion_to_generate(req: CompletionRequest, request_id: str, default_max_tokens: int) -> GenerateRequest:
    _check_common(req)
    if req.echo:
        raise _unsupported("echo", "echo is not supported")
    if req.suffix:
        raise _unsupported("suffix", _NEUTRAL_REJECTS["suffix"])
    if req.best_of not in (None, 1):
        raise _unsupported("best_of", "only best_of=1 is supported")
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise _unsupported("prompt", "prompt must be a string or a list of one string")
        prompt = prompt[0]
    return GenerateRequest(
        request_id=request_id,
        model=req.model,
        prompt=prompt,
        max_tokens=req.max_tokens or default_max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        stop=_stops(req.stop),
        seed=req.seed,
        user=req.user,
    )
