"""OpenAI chat completions (and any OpenAI-compatible server: vLLM, llama.cpp) as a translator."""

from __future__ import annotations

from typing import Any

import msgspec

from contracts.llm import GenerateRequest, TokenLogprob, ToolCallDelta, TopLogprob
from services.llm.engines.remote import Fault, RemoteEngine, SSEEvent, Turn

FINISH = {"stop": "stop", "length": "length", "content_filter": "content_filter", "tool_calls": "tool_calls",
          "function_call": "tool_calls"}
FILTER_KINDS = frozenset({"content_filter", "content_policy_violation"})
SUPPORTED = frozenset({"tools", "response_format", "logit_bias", "logprobs", "frequency_penalty", "presence_penalty",
                       "reasoning_effort", "seed"})


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCall(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: _Function | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _Top(msgspec.Struct):
    token: str
    logprob: float


class _TokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    top_logprobs: list[_Top] = []


class _Logprobs(msgspec.Struct):
    content: list[_TokenLogprob] | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: str | None = None
    logprobs: _Logprobs | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int


class _Error(msgspec.Struct):
    message: str = ""


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: _Error | None = None


_chunk = msgspec.json.Decoder(_Chunk)


def messages(request: GenerateRequest) -> list[dict[str, Any]]:
    if request.messages is None:
        return [{"role": "user", "content": request.prompt or ""}]
    out: list[dict[str, Any]] = []
    for m in request.messages:
        # "developer" is newer than most OpenAI-compatible servers: they all know "system".
        turn: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.content}
        if m.tool_calls:
            turn["content"] = m.content or None
            turn["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            turn["tool_call_id"] = m.tool_call_id
        out.append(turn)
    return out


def tools_fields(request: GenerateRequest) -> dict[str, Any]:
    """tools, tool_choice, parallel_tool_calls and response_format in OpenAI's shape (what we took in)."""
    body: dict[str, Any] = {}
    if request.tools:
        tools = []
        for t in request.tools:
            function: dict[str, Any] = {"name": t.name}
            if t.description is not None:
                function["description"] = t.description
            if t.parameters is not None:
                function["parameters"] = t.parameters
            if t.strict:
                function["strict"] = True
            tools.append({"type": "function", "function": function})
        body["tools"] = tools
        body["tool_choice"] = (
            {"type": "function", "function": {"name": request.tool_name}} if request.tool_name else request.tool_choice
        )
        if not request.parallel_tool_calls:
            body["parallel_tool_calls"] = False
    fmt = request.response_format
    if fmt is not None:
        if fmt.type == "json_object" or fmt.schema is None:
            body["response_format"] = {"type": "json_object"}
        else:
            spec: dict[str, Any] = {"name": fmt.name or "output", "schema": fmt.schema}
            if fmt.strict:
                spec["strict"] = True
            body["response_format"] = {"type": "json_schema", "json_schema": spec}
    return body


class OpenAIEngine(RemoteEngine):
    name = "openai"
    default_base_url = "https://api.openai.com/v1"
    supported = SUPPORTED

    def __init__(self, *, max_tokens_field: str = "max_tokens", **options: Any) -> None:
        """`max_tokens_field`: "max_completion_tokens" for OpenAI's reasoning models, which refuse max_tokens."""
        if max_tokens_field not in ("max_tokens", "max_completion_tokens"):
            raise ValueError("max_tokens_field must be max_tokens or max_completion_tokens")
        super().__init__(**options)
        self.max_tokens_field = max_tokens_field

    def body(self, request: GenerateRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages(request),
            "stream": True,
            "stream_options": {"include_usage": True},
            self.max_tokens_field: request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
        }
        if request.stop:
            body["stop"] = request.stop
        if request.seed is not None:
            body["seed"] = request.seed
        if request.user is not None:
            body["user"] = request.user
        if request.plain:
            return body
        body.update(tools_fields(request))
        for name in ("frequency_penalty", "presence_penalty"):
            if value := getattr(request, name):
                body[name] = value
        if request.logit_bias:
            body["logit_bias"] = {str(k): v for k, v in request.logit_bias.items()}
        if request.logprobs is not None:
            body["logprobs"] = True
            if request.logprobs:
                body["top_logprobs"] = request.logprobs
        if request.reasoning_effort is not None:
            body["reasoning_effort"] = request.reasoning_effort
        return body

    def stream_url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def models_url(self) -> str:
        return f"{self.base_url}/models"

    def auth_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def read(self, event: SSEEvent, turn: Turn) -> str:
        if event.data == "[DONE]":
            turn.finish = turn.finish or "stop"
            return ""
        chunk = self.decode(_chunk, event)
        if chunk.error is not None:
            raise self.upstream.fail("upstream_error", f"failed mid-stream: {chunk.error.message}")
        if chunk.usage is not None:
            turn.prompt_tokens = chunk.usage.prompt_tokens
            turn.completion_tokens = chunk.usage.completion_tokens
        if not chunk.choices:
            return ""
        choice = chunk.choices[0]  # n=1
        if choice.finish_reason:
            turn.finish = FINISH.get(choice.finish_reason, "stop")
        if choice.logprobs is not None and choice.logprobs.content:
            turn.logprobs.extend(
                TokenLogprob(t.token, t.logprob, [TopLogprob(a.token, a.logprob) for a in t.top_logprobs])
                for t in choice.logprobs.content
            )
        delta = choice.delta
        if delta is None:
            return ""
        for call in delta.tool_calls or ():
            function = call.function or _Function()
            if call.id is not None:
                turn.called = max(turn.called, call.index + 1)
                turn.calls.append(ToolCallDelta(call.index, call.id, function.name or "", function.arguments or ""))
            elif function.arguments:
                turn.calls.append(ToolCallDelta(call.index, None, None, function.arguments))
        return delta.content or ""

    def refine(self, status: int, fault: Fault) -> str | None:
        return "content_filter" if status == 400 and fault.kinds & FILTER_KINDS else None
