"""OpenAI response shapes: chat and text completion objects and their SSE chunks.

A format turns the bus stream (Delta..., Final) into one API's bytes; `openai_routes.respond` drives any of
them (the Responses and Messages APIs have theirs in their own modules).
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

from contracts.errors import InferBusError
from contracts.llm import Delta, Final, TokenLogprob, ToolCallDelta, Usage

_encode = msgspec.json.encode
DONE = b"data: [DONE]\n\n"


def usage_body(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def sse(payload: object) -> bytes:
    return b"data: " + _encode(payload) + b"\n\n"


def named_sse(event: str, payload: object) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _encode(payload) + b"\n\n"


class ToolCalls:
    """Tool call deltas gathered into whole calls: [id, name, arguments] by index."""

    __slots__ = ("calls",)

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def add(self, deltas: list[ToolCallDelta]) -> None:
        for d in deltas:
            if d.index >= len(self.calls):
                self.calls.append([d.id or "", d.name or "", d.arguments])
            else:
                self.calls[d.index][2] += d.arguments

    def openai(self) -> list[dict[str, Any]]:
        return [{"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in self.calls]


class Outcome:
    """What a response has said so far (text, tool calls, logprobs) and how it went, for `whole` and the log."""

    __slots__ = ("error", "logprobs", "parts", "started", "tool_calls", "usage")

    def __init__(self) -> None:
        self.started = False  # the 200 and its headers went out (a stream's later error is an event)
        self.error: InferBusError | None = None
        self.usage: Usage | None = None
        self.parts: list[str] = []
        self.tool_calls: ToolCalls | None = None
        self.logprobs: list[TokenLogprob] | None = None

    def add(self, chunk: Delta) -> None:
        if chunk.text:
            self.parts.append(chunk.text)
        if chunk.tool_calls is not None:
            if self.tool_calls is None:
                self.tool_calls = ToolCalls()
            self.tool_calls.add(chunk.tool_calls)
        if chunk.logprobs is not None:
            self.logprobs = (self.logprobs or []) + chunk.logprobs

    @property
    def text(self) -> str:
        return "".join(self.parts)


class Format(Protocol):
    """One API's shape of a generation: a whole object, or the events of its stream."""

    include_usage: bool

    def served(self, model: str, provider: str | None, version: str) -> None: ...

    def start(self) -> bytes | None: ...

    def delta(self, chunk: Delta) -> bytes: ...

    def end(self, final: Final) -> bytes: ...

    def error(self, exc: InferBusError) -> bytes: ...

    def whole(self, outcome: Outcome, final: Final) -> dict[str, Any]: ...


def merged(deltas: list[ToolCallDelta]) -> list[dict[str, Any]]:
    """Tool call deltas in OpenAI's streamed shape, consecutive parts of one call merged."""
    out: list[dict[str, Any]] = []
    for d in deltas:
        if out and out[-1]["index"] == d.index and d.id is None:
            out[-1]["function"]["arguments"] += d.arguments
            continue
        entry: dict[str, Any] = {"index": d.index, "function": {"arguments": d.arguments}}
        if d.id is not None:
            entry["id"], entry["type"] = d.id, "function"
            entry["function"] = {"name": d.name, "arguments": d.arguments}
        out.append(entry)
    return out


def chat_logprobs(items: list[TokenLogprob]) -> dict[str, Any]:
    def one(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    content = [{**one(t.token, t.logprob), "top_logprobs": [one(a.token, a.logprob) for a in t.top]} for t in items]
    return {"content": content, "refusal": None}


def completion_logprobs(items: list[TokenLogprob], offset: int) -> dict[str, Any]:
    offsets = []
    for t in items:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in items],
        "token_logprobs": [t.logprob for t in items],
        "top_logprobs": [{a.token: a.logprob for a in t.top} for t in items],
        "text_offset": offsets,
    }


class _OpenAIFormat:
    """What both OpenAI shapes share: the per-request header fields, the usage chunk, the null usage field."""

    chunk_object = ""

    def __init__(self, request_id: str, model: str, created: int, include_usage: bool) -> None:
        # Until a worker answers nothing goes out; then `served` sets the fingerprint (a string, always).
        self.base: dict[str, Any] = {"id": request_id, "object": self.chunk_object, "created": created,
                                     "model": model, "system_fingerprint": "inferbus"}
        self.include_usage = include_usage

    def served(self, model: str, provider: str | None, version: str) -> None:
        """What served the request: `model` (another one's after a fallback) and the system fingerprint."""
        self.base["model"] = model
        self.base["system_fingerprint"] = f"{provider or 'inferbus'}:{version}"

    def _chunk(self, content: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> bytes:
        body = {**self.base, "choices": [{"index": 0, **content, "logprobs": logprobs, "finish_reason": finish}]}
        if self.include_usage:
            body["usage"] = None
        return sse(body)

    def usage(self, usage: Usage) -> bytes:
        return sse({**self.base, "choices": [], "usage": usage_body(usage)})

    def error(self, exc: InferBusError) -> bytes:
        return sse(exc.openai_body())

    def finish(self, reason: str) -> bytes:
        raise NotImplementedError

    def end(self, final: Final) -> bytes:
        tail = self.finish(final.finish_reason)
        if self.include_usage:
            tail += self.usage(final.usage)
        return tail + DONE


class ChatFormat(_OpenAIFormat):
    """chat.completion / chat.completion.chunk for one request."""

    chunk_object = "chat.completion.chunk"

    def start(self) -> bytes | None:
        return self._chunk({"delta": {"role": "assistant", "content": ""}})

    def delta(self, chunk: Delta) -> bytes:
        if chunk.tool_calls is None and chunk.logprobs is None:
            return self._chunk({"delta": {"content": chunk.text}}) if chunk.text else b""
        out = b""
        if chunk.text or chunk.logprobs:
            logprobs = chat_logprobs(chunk.logprobs) if chunk.logprobs else None
            out += self._chunk({"delta": {"content": chunk.text}}, logprobs=logprobs)
        if chunk.tool_calls:
            out += self._chunk({"delta": {"tool_calls": merged(chunk.tool_calls)}})
        return out

    def finish(self, reason: str) -> bytes:
        return self._chunk({"delta": {}}, reason)

    def whole(self, outcome: Outcome, final: Final) -> dict[str, Any]:
        text = outcome.text
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if outcome.tool_calls is not None:
            message["tool_calls"] = outcome.tool_calls.openai()
            message["content"] = text or None
        logprobs = chat_logprobs(outcome.logprobs) if outcome.logprobs is not None else None
        choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": final.finish_reason}
        return {**self.base, "object": "chat.completion", "choices": [choice], "usage": usage_body(final.usage)}


class CompletionFormat(_OpenAIFormat):
    """text_completion objects, streamed and whole."""

    chunk_object = "text_completion"

    def __init__(self, request_id: str, model: str, created: int, include_usage: bool) -> None:
        super().__init__(request_id, model, created, include_usage)
        self.offset = 0  # characters so far: logprobs' text_offset

    def start(self) -> bytes | None:
        return None

    def delta(self, chunk: Delta) -> bytes:
        if chunk.logprobs is None:
            return self._chunk({"text": chunk.text}) if chunk.text else b""
        logprobs = completion_logprobs(chunk.logprobs, self.offset)
        self.offset += len(chunk.text)
        return self._chunk({"text": chunk.text}, logprobs=logprobs)

    def finish(self, reason: str) -> bytes:
        return self._chunk({"text": ""}, reason)

    def whole(self, outcome: Outcome, final: Final) -> dict[str, Any]:
        logprobs = completion_logprobs(outcome.logprobs, 0) if outcome.logprobs is not None else None
        choice = {"index": 0, "text": outcome.text, "logprobs": logprobs, "finish_reason": final.finish_reason}
        return {**self.base, "choices": [choice], "usage": usage_body(final.usage)}
