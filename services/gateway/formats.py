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


class _Format:
    """What both shapes share: the per-request header fields, the usage chunk, the null usage field."""

    chunk_object = ""

    def __init__(self, request_id: str, model: str, created: int, include_usage: bool) -> None:
        self.base: dict[str, Any] = {"id": request_id, "object": self.chunk_object, "created": created,
                                     "model": model, "system_fingerprint": None}
        self.include_usage = include_usage

    def served(self, model: str, provider: str | None, version: str) -> None:
        """What served the request: `model` (another one's after a fallback) and the system fingerprint."""
        self.base["model"] = model
        self.base["system_fingerprint"] = f"{provider or 'inferbus'}:{version}"

    def _chunk(self, content: dict[str, Any], finish: str | None = None) -> bytes:
        body = {**self.base, "choices": [{"index": 0, **content, "logprobs": None, "finish_reason": finish}]}
        if self.include_usage:
            body["usage"] = None
        return sse(body)

    def usage(self, usage: Usage) -> bytes:
        return sse({**self.base, "choices": [], "usage": usage_body(usage)})


class ChatFormat(_Format):
    """chat.completion / chat.completion.chunk for one request."""

    chunk_object = "chat.completion.chunk"

    def start(self) -> bytes | None:
        return self._chunk({"delta": {"role": "assistant", "content": ""}})

    def delta(self, text: str) -> bytes:
        return self._chunk({"delta": {"content": text}})

    def finish(self, reason: str) -> bytes:
        return self._chunk({"delta": {}}, reason)

    def whole(self, text: str, reason: str, usage: Usage) -> dict[str, Any]:
        message = {"role": "assistant", "content": text, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
        return {**self.base, "object": "chat.completion", "choices": [choice], "usage": usage_body(usage)}


class CompletionFormat(_Format):
    """text_completion objects, streamed and whole."""

    chunk_object = "text_completion"

    def start(self) -> bytes | None:
        return None

    def delta(self, text: str) -> bytes:
        return self._chunk({"text": text})

    def finish(self, reason: str) -> bytes:
        return self._chunk({"text": ""}, reason)

    def whole(self, text: str, reason: str, usage: Usage) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {**self.base, "choices": [choice], "usage": usage_body(usage)}
