"""LLM messages: the OpenAI-shaped requests the edge accepts, and what travels on the bus."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from contracts.errors import InferBusError, invalid
from contracts.structured import FUNCTION_NAME

Role = Literal["system", "developer", "user", "assistant", "tool"]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(ge=0.0, le=1.0)]
MaxTokens = Annotated[int, Meta(ge=1, le=1 << 20)]  # bounded: it travels as msgpack, and no model goes further
Seed = Annotated[int, Meta(ge=-(1 << 63), le=(1 << 63) - 1)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
Bias = Annotated[float, Meta(ge=-100.0, le=100.0)]
TopLogprobs = Annotated[int, Meta(ge=0, le=20)]


# ---- OpenAI HTTP shapes (JSON) --------------------------------------------------------------


class TextPart(Struct, tag="text", tag_field="type"):
    text: str


class ImageUrlPart(Struct, tag="image_url", tag_field="type"):
    image_url: dict[str, Any]


class InputAudioPart(Struct, tag="input_audio", tag_field="type"):
    input_audio: dict[str, Any]


ContentPart = TextPart | ImageUrlPart | InputAudioPart


class FunctionCall(Struct, forbid_unknown_fields=True):
    name: str
    arguments: str


class ChatToolCall(Struct, tag="function", tag_field="type", forbid_unknown_fields=True):
    id: str
    function: FunctionCall


class ChatMessage(Struct):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ChatToolCall] | None = None
    refusal: str | None = None


class StreamOptions(Struct, forbid_unknown_fields=True):
    include_usage: bool = False
    include_obfuscation: bool | None = None


class FunctionDef(Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionTool(Struct, tag="function", tag_field="type", forbid_unknown_fields=True):
    function: FunctionDef


class NamedFunction(Struct, forbid_unknown_fields=True):
    name: str


class NamedToolChoice(Struct, tag="function", tag_field="type", forbid_unknown_fields=True):
    function: NamedFunction


class TextFormat(Struct, tag="text", tag_field="type", forbid_unknown_fields=True):
    pass


class JsonObjectFormat(Struct, tag="json_object", tag_field="type", forbid_unknown_fields=True):
    pass


class JsonSchemaSpec(Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class JsonSchemaFormat(Struct, tag="json_schema", tag_field="type", forbid_unknown_fields=True):
    json_schema: JsonSchemaSpec


ChatResponseFormat = TextFormat | JsonObjectFormat | JsonSchemaFormat


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
    logit_bias: dict[str, Bias] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None


class ChatCompletionRequest(_SamplingFields, kw_only=True, forbid_unknown_fields=True):
    messages: list[ChatMessage]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    response_format: ChatResponseFormat | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
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
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


# ---- Bus shapes (msgpack) -------------------------------------------------------------------

# A retry before the first token is a new attempt under the same request id (0: the first send); the
# worker copies it into its usage event, and each attempt is billed for what it did.
MAX_ATTEMPT = 99
Attempt = Annotated[int, Meta(ge=0, le=MAX_ATTEMPT)]


class ToolCall(Struct, frozen=True, array_like=True):
    """A function call an assistant made: `arguments` is its JSON text, as the model wrote it."""

    id: str
    name: str
    arguments: str


class Message(Struct, frozen=True, array_like=True):
    role: str
    content: str
    # Fields added later travel at the end, so [role, content] from an older client still decodes.
    tool_calls: list[ToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool result: the call it answers


class Tool(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A function the model may call; `parameters` is a JSON Schema of its arguments object."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool = False


class ResponseFormat(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Structured output: any JSON object, or JSON that validates against `schema`."""

    type: Literal["json_object", "json_schema"]
    schema: dict[str, Any] | None = None
    name: str | None = None
    strict: bool = False


ToolChoice = Literal["auto", "none", "required"]


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
    # Tools and structured output (absent on plain requests: nothing to check, nothing on the wire).
    tools: list[Tool] | None = None
    tool_choice: ToolChoice = "auto"
    tool_name: str | None = None  # tool_choice naming one function: the model must call it
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    # Sampling an engine may not support: it refuses them (unsupported_parameter naming the field).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None  # token id -> bias in [-100, 100]
    logprobs: int | None = None  # per-token log probabilities with this many alternatives (0..20)
    reasoning_effort: str | None = None
    # Count the prompt's tokens, generate nothing: the Final's usage says how many (nothing is billed).
    count_only: bool = False

    @property
    def plain(self) -> bool:
        """Nothing but text and the common sampling fields: every engine's fast path."""
        return (self.tools is None and self.response_format is None and self.logit_bias is None
                and self.logprobs is None and not self.frequency_penalty and not self.presence_penalty
                and self.reasoning_effort is None)

    @property
    def calls_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


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


class ToolCallDelta(Struct, frozen=True, array_like=True):
    """Part of the `index`-th tool call: its first part carries id and name, every part some arguments text."""

    index: int
    id: str | None
    name: str | None
    arguments: str


class TopLogprob(Struct, frozen=True, array_like=True):
    token: str
    logprob: float


class TokenLogprob(Struct, frozen=True, array_like=True):
    token: str
    logprob: float
    top: list[TopLogprob] = []


class Delta(Struct, frozen=True, tag="d", array_like=True):
    seq: int
    text: str
    tokens: int
    tool_calls: list[ToolCallDelta] | None = None
    logprobs: list[TokenLogprob] | None = None


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
    param: str | None = None  # the request field at fault (an engine's unsupported_parameter)

    def to_error(self) -> InferBusError:
        exc = InferBusError(self.code, self.message, param=self.param)
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

SERVICE_TIERS = (None, "auto", "default")


def _unsupported(param: str, message: str) -> InferBusError:
    return InferBusError("unsupported_parameter", message, param=param)


MAX_CHOICES = 16  # `n` on /v1/chat/completions and /v1/completions (the gateway runs each choice as a generation)


def _check_common(req: _SamplingFields, max_choices: int) -> None:
    if not req.model:
        raise invalid("model must not be empty", "model")
    if req.n is not None and req.n < 1:
        raise invalid(f"n must be at least 1, not {req.n}", "n")
    if req.n is not None and req.n > max_choices:
        if max_choices == 1:
            raise _unsupported("n", "n > 1 is served on /v1/chat/completions and /v1/completions only: "
                                    "send n requests for n choices")
        raise _unsupported("n", f"n may be at most {max_choices}, not {req.n}")
    if req.stream_options is not None and not req.stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")
    if req.store:
        raise _unsupported("store", "stored chat completions are not supported (the Responses API stores responses)")
    if req.metadata is not None:
        raise _unsupported("metadata", "metadata is kept only with stored completions, which are not supported")
    if req.service_tier not in SERVICE_TIERS:
        raise _unsupported("service_tier", f"service_tier {req.service_tier!r} is not offered: use 'auto' or 'default'")


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if not bias:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        if not key.isdigit() or len(key) > 9:
            raise invalid(f"logit_bias keys are token ids, not {key[:40]!r}", "logit_bias")
        out[int(key)] = value
    if len(out) > 300:
        raise invalid("logit_bias may hold at most 300 tokens", "logit_bias")
    return out


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


def _message(m: ChatMessage, i: int) -> Message:
    text = _text_of(m, i)
    if m.role == "tool":
        if not m.tool_call_id:
            raise invalid(f"messages[{i}].tool_call_id is required on a tool message", f"messages[{i}].tool_call_id")
        return Message("tool", text, tool_call_id=m.tool_call_id)
    if m.tool_calls:
        if m.role != "assistant":
            raise invalid(f"messages[{i}].tool_calls: only assistant messages carry tool calls",
                          f"messages[{i}].tool_calls")
        calls = [ToolCall(c.id, c.function.name, c.function.arguments) for c in m.tool_calls]
        return Message("assistant", text, tool_calls=calls)
    return Message(m.role, text)


def tool_of(name: str, description: str | None, parameters: dict[str, Any] | None, strict: bool | None,
            param: str) -> Tool:
    if not FUNCTION_NAME.match(name):
        raise invalid(f"{param}.name must be 1-64 letters, digits, '_' or '-', not {name[:80]!r}", f"{param}.name")
    return Tool(name=name, description=description, parameters=parameters, strict=bool(strict))


def tools_of(tools: list[Tool], choice: str | None, named: str | None) -> tuple[ToolChoice, str | None]:
    """tool_choice as the bus carries it, checked against the tools (a named one must be among them)."""
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise invalid("tools must have distinct names", "tools")
    if named is not None:
        if named not in names:
            raise invalid(f"tool_choice names {named!r}, which is not among the tools", "tool_choice")
        return "required", named
    if choice in ("required",) and not tools:
        raise invalid("tool_choice 'required' needs tools", "tool_choice")
    mode: ToolChoice = "auto" if choice is None else choice  # type: ignore[assignment]
    return mode, None


def chat_to_generate(
    req: ChatCompletionRequest, request_id: str, default_max_tokens: int, max_choices: int = 1
) -> GenerateRequest:
    """The generation one choice of `req` runs (`max_choices`: the largest `n` the caller serves)."""
    _check_common(req, max_choices)
    if not req.messages:
        raise invalid("messages must hold at least one message", "messages")
    if req.prediction:
        raise _unsupported("prediction", "predicted outputs are not supported")
    if req.audio:
        raise _unsupported("audio", "audio output is not supported on chat completions")
    if req.modalities and req.modalities != ["text"]:
        raise _unsupported("modalities", "only text output is supported")
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise invalid("set max_tokens or max_completion_tokens, not both", "max_tokens")
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
    tools = [tool_of(t.function.name, t.function.description, t.function.parameters, t.function.strict,
                     f"tools[{i}].function") for i, t in enumerate(req.tools or ())]
    named = req.tool_choice.function.name if isinstance(req.tool_choice, NamedToolChoice) else None
    choice, tool_name = tools_of(tools, req.tool_choice if isinstance(req.tool_choice, str) else None, named)
    return GenerateRequest(
        request_id=request_id,
        model=req.model,
        messages=[_message(m, i) for i, m in enumerate(req.messages)],
        max_tokens=req.max_completion_tokens or req.max_tokens or default_max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        stop=_stops(req.stop),
        seed=req.seed,
        user=req.user or req.safety_identifier,
        tools=tools or None,
        tool_choice=choice,
        tool_name=tool_name,
        parallel_tool_calls=req.parallel_tool_calls is not False,
        response_format=chat_format(req.response_format),
        frequency_penalty=req.frequency_penalty or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        logit_bias=_logit_bias(req.logit_bias),
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        reasoning_effort=req.reasoning_effort,
    )


def chat_format(fmt: ChatResponseFormat | None) -> ResponseFormat | None:
    if fmt is None or isinstance(fmt, TextFormat):
        return None
    if isinstance(fmt, JsonObjectFormat):
        return ResponseFormat(type="json_object")
    spec = fmt.json_schema
    return schema_format(spec.name, spec.schema, bool(spec.strict), "response_format.json_schema")


def schema_format(name: str, schema: dict[str, Any] | None, strict: bool, param: str) -> ResponseFormat:
    if not FUNCTION_NAME.match(name):
        raise invalid(f"{param}.name must be 1-64 letters, digits, '_' or '-'", f"{param}.name")
    if schema is None:
        return ResponseFormat(type="json_object", name=name)
    return ResponseFormat(type="json_schema", schema=schema, name=name, strict=strict)


def completion_to_generate(
    req: CompletionRequest, request_id: str, default_max_tokens: int, max_choices: int = 1
) -> GenerateRequest:
    """The generation one choice of `req` runs (`max_choices`: the largest `n` the caller serves)."""
    _check_common(req, max_choices)
    if req.echo:
        raise _unsupported("echo", "echo is not supported")
    if req.suffix:
        raise _unsupported("suffix", "suffix is not supported")
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
        frequency_penalty=req.frequency_penalty or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        logit_bias=_logit_bias(req.logit_bias),
        logprobs=req.logprobs,
    )


def check_generate(req: GenerateRequest) -> None:
    """What the edge checks of tools and formats, for a GenerateRequest that arrives ready-made (NATS)."""
    for i, m in enumerate(req.messages or ()):
        if m.role == "tool" and not m.tool_call_id:
            raise invalid(f"messages[{i}].tool_call_id is required on a tool message", f"messages[{i}].tool_call_id")
    if req.tools is not None:
        for i, tool in enumerate(req.tools):
            tool_of(tool.name, tool.description, tool.parameters, tool.strict, f"tools[{i}]")
        tools_of(req.tools, req.tool_choice, req.tool_name)
    elif req.tool_name is not None or req.tool_choice == "required":
        raise invalid("tool_choice needs tools", "tool_choice")
    if req.response_format is not None and req.response_format.type == "json_schema":
        if req.response_format.schema is None:
            raise invalid("a json_schema response_format needs its schema", "response_format.schema")
    if req.logprobs is not None and not 0 <= req.logprobs <= 20:
        raise invalid("logprobs must be in 0..20", "logprobs")
    for name in ("frequency_penalty", "presence_penalty"):
        if not -2.0 <= getattr(req, name) <= 2.0:
            raise invalid(f"{name} must be in [-2, 2]", name)
