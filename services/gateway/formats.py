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
_MARK = "\x00inferbus-text\x00"  # where a token's text goes in a prepared event (`_text_chunk`)
_ENCODED_MARK = _encode(_MARK)


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


class ChoiceDelta(Delta, frozen=True, array_like=True):
    """A Delta of choice `index` when a request asks for n > 1 (the gateway's merge of its choices; never on
    the bus)."""

    index: int = 0


class ChoiceEnd(msgspec.Struct, frozen=True):
    """Choice `index` finished (n > 1): its finish reason; the request's Final follows the last one."""

    index: int
    finish_reason: str


class Outcome:
    """What a response has said so far (text, tool calls, logprobs) and how it went, for `whole` and the log.
    With n > 1 choices this is the first one's, and `others` holds the rest."""

    __slots__ = ("error", "finishes", "logprobs", "others", "parts", "started", "tool_calls", "usage")

    def __init__(self) -> None:
        self.started = False  # the 200 and its headers went out (a stream's later error is an event)
        self.error: InferBusError | None = None
        self.usage: Usage | None = None
        self.parts: list[str] = []
        self.tool_calls: ToolCalls | None = None
        self.logprobs: list[TokenLogprob] | None = None
        self.others: dict[int, Outcome] | None = None  # choices 1.. when n > 1
        self.finishes: dict[int, str] = {}  # each choice's finish reason when n > 1

    def add(self, chunk: Delta) -> None:
        if type(chunk) is ChoiceDelta and chunk.index:
            if self.others is None:
                self.others = {}
            if chunk.index not in self.others:
                self.others[chunk.index] = Outcome()
            self.others[chunk.index]._take(chunk)
        else:
            self._take(chunk)

    def _take(self, chunk: Delta) -> None:
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

    def choices(self, final: Final) -> list[tuple[int, Outcome, str]]:
        """(index, what it said, finish reason) for every choice, in order."""
        if not self.finishes:
            return [(0, self, final.finish_reason)]
        return [(i, self if i == 0 else (self.others or {}).get(i) or Outcome(), reason)
                for i, reason in sorted(self.finishes.items())]


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


class OpenAIFormat:
    """What both OpenAI shapes share: the per-request header fields, the usage chunk, the null usage field."""

    chunk_object = ""

    def __init__(self, request_id: str, model: str, created: int, include_usage: bool, n: int = 1) -> None:
        # Until a worker answers nothing goes out; then `served` sets the fingerprint (a string, always).
        self.base: dict[str, Any] = {"id": request_id, "object": self.chunk_object, "created": created,
                                     "model": model, "system_fingerprint": "inferbus"}
        self.include_usage = include_usage
        self.n = n  # choices: with more than one, each finishes on its own (`finish`), and `end` only closes
        self._text: tuple[bytes, bytes] | None = None  # a plain text delta's event around its encoded text

    def served(self, model: str, provider: str | None, version: str) -> None:
        """What served the request: `model` (another one's after a fallback) and the system fingerprint."""
        self.base["model"] = model
        self.base["system_fingerprint"] = f"{provider or 'inferbus'}:{version}"
        self._text = None

    def _content(self, text: str) -> dict[str, Any]:
        """A text piece as this shape's choice content."""
        raise NotImplementedError

    def _text_chunk(self, text: str, index: int) -> bytes:
        """`_chunk(self._content(text), index=index)`: a plain token, most of a stream's events. Choice 0's event
        bytes are made once, with a marker where the text goes; each token's encoded text is put in its place."""
        if index:
            return self._chunk(self._content(text), index=index)
        parts = self._text
        if parts is None:
            head, marker, tail = self._chunk(self._content(_MARK)).partition(_ENCODED_MARK)
            assert marker and _ENCODED_MARK not in tail
            parts = self._text = (head, tail)
        return parts[0] + _encode(text) + parts[1]

    def _chunk(self, content: dict[str, Any], finish: str | None = None, logprobs: Any = None, index: int = 0) -> bytes:
        body = {**self.base, "choices": [{"index": index, **content, "logprobs": logprobs, "finish_reason": finish}]}
        if self.include_usage:
            body["usage"] = None
        return sse(body)

    def usage(self, usage: Usage) -> bytes:
        return sse({**self.base, "choices": [], "usage": usage_body(usage)})

    def error(self, exc: InferBusError) -> bytes:
        return sse(exc.openai_body())

    def finish(self, reason: str, index: int = 0) -> bytes:
        raise NotImplementedError

    def end(self, final: Final) -> bytes:
        tail = self.finish(final.finish_reason) if self.n == 1 else b""  # n > 1: each choice's went out already
        if self.include_usage:
            tail += self.usage(final.usage)
        return tail + DONE


class ChatFormat(OpenAIFormat):
    """chat.completion / chat.completion.chunk for one request."""

    chunk_object = "chat.completion.chunk"

    def start(self) -> bytes | None:
        return b"".join(self._chunk({"delta": {"role": "assistant", "content": ""}}, index=i) for i in range(self.n))

    def delta(self, chunk: Delta) -> bytes:
        index = chunk.index if type(chunk) is ChoiceDelta else 0
        if chunk.tool_calls is None and chunk.logprobs is None:
            return self._text_chunk(chunk.text, index) if chunk.text else b""
        out = b""
        if chunk.text or chunk.logprobs:
            logprobs = chat_logprobs(chunk.logprobs) if chunk.logprobs else None
            out += self._chunk(self._content(chunk.text), logprobs=logprobs, index=index)
        if chunk.tool_calls:
            out += self._chunk({"delta": {"tool_calls": merged(chunk.tool_calls)}}, index=index)
        return out

    def _content(self, text: str) -> dict[str, Any]:
        return {"delta": {"content": text}}

    def finish(self, reason: str, index: int = 0) -> bytes:
        return self._chunk({"delta": {}}, reason, index=index)

    def whole(self, outcome: Outcome, final: Final) -> dict[str, Any]:
        choices = []
        for index, said, reason in outcome.choices(final):
            text = said.text
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            if said.tool_calls is not None:
                message["tool_calls"] = said.tool_calls.openai()
                message["content"] = text or None
            logprobs = chat_logprobs(said.logprobs) if said.logprobs is not None else None
            choices.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason})
        return {**self.base, "object": "chat.completion", "choices": choices, "usage": usage_body(final.usage)}


class CompletionFormat(OpenAIFormat):
    """text_completion objects, streamed and whole."""

    chunk_object = "text_completion"

    def __init__(self, request_id: str, model: str, created: int, include_usage: bool, n: int = 1) -> None:
        super().__init__(request_id, model, created, include_usage, n)
        self.offsets = [0] * n  # each choice's characters so far: logprobs' text_offset

    def start(self) -> bytes | None:
        return None

    def delta(self, chunk: Delta) -> bytes:
        index = chunk.index if type(chunk) is ChoiceDelta else 0
        if chunk.logprobs is None:
            return self._text_chunk(chunk.text, index) if chunk.text else b""
        logprobs = completion_logprobs(chunk.logprobs, self.offsets[index])
        self.offsets[index] += len(chunk.text)
        return self._chunk(self._content(chunk.text), logprobs=logprobs, index=index)

    def _content(self, text: str) -> dict[str, Any]:
        return {"text": text}

    def finish(self, reason: str, index: int = 0) -> bytes:
        return self._chunk({"text": ""}, reason, index=index)

    def whole(self, outcome: Outcome, final: Final) -> dict[str, Any]:
        choices = []
        for index, said, reason in outcome.choices(final):
            logprobs = completion_logprobs(said.logprobs, 0) if said.logprobs is not None else None
            choices.append({"index": index, "text": said.text, "logprobs": logprobs, "finish_reason": reason})
        return {**self.base, "choices": choices, "usage": usage_body(final.usage)}
