"""OpenAI response shapes: chat and text completion objects and their SSE chunks."""

from __future__ import annotations

from typing import Any

import msgspec

from contracts.llm import Usage

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


class ChatFormat:
    """chat.completion / chat.completion.chunk for one request."""

    def __init__(self, request_id: str, model: str, created: int, include_usage: bool) -> None:
        self.base: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                                     "model": model, "system_fingerprint": None}
        self.include_usage = include_usage

    def _chunk(self, delta: dict[str, Any], finish: str | None) -> bytes:
        body = {**self.base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if self.include_usage:
            body["usage"] = None
        return sse(body)

    def start(self) -> bytes:
        return self._chunk({"role": "assistant", "content": ""}, None)

    def delta(self, text: str) -> bytes:
        return self._chunk({"content": text}, None)

    def finish(self, reason: str) -> bytes:
        return self._chunk({}, reason)

    def usage(self, usage: Usage) -> bytes:
        return sse({**self.base, "choices": [], "usage": usage_body(usage)})

    def whole(self, text: str, reason: str, usage: Usage) -> dict[str, Any]:
        return {
            **self.base,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": reason}],
            "usage": usage_body(usage),
        }


class CompletionFormat:
    """text_completion objects, streamed and whole."""

    def __init__(self, request_id: str, model: str, created: int, include_usage: bool) -> None:
        self.base: dict[str, Any] = {"id": request_id, "object": "text_completion", "created": created,
                                     "model": model, "system_fingerprint": None}
        self.include_usage = include_usage

    def _chunk(self, text: str, finish: str | None) -> bytes:
        body = {**self.base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        if self.include_usage:
            body["usage"] = None
        return sse(body)

    def start(self) -> bytes | None:
        return None

    def delta(self, text: str) -> bytes:
        return self._chunk(text, None)

    def finish(self, reason: str) -> bytes:
        return self._chunk("", reason)

    def usage(self, usage: Usage) -> bytes:
        return sse({**self.base, "choices": [], "usage": usage_body(usage)})

    def whole(self, text: str, reason: str, usage: Usage) -> dict[str, Any]:
        return {
            **self.base,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
            "usage": usage_body(usage),
        }


def error_event(body: dict[str, Any]) -> bytes:
    return sse(body)
