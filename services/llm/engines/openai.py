"""OpenAI chat completions (and any OpenAI-compatible server: vLLM, llama.cpp) as a translator."""

from __future__ import annotations

from typing import Any

import msgspec

from contracts.llm import GenerateRequest
from services.llm.engines.remote import Fault, RemoteEngine, SSEEvent, Turn, conversation

FINISH = {"stop": "stop", "length": "length", "content_filter": "content_filter"}
FILTER_KINDS = frozenset({"content_filter", "content_policy_violation"})


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: str | None = None


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


class OpenAIEngine(RemoteEngine):
    name = "openai"
    default_base_url = "https://api.openai.com/v1"

    def __init__(self, *, max_tokens_field: str = "max_tokens", **options: Any) -> None:
        """`max_tokens_field`: "max_completion_tokens" for OpenAI's reasoning models, which refuse max_tokens."""
        if max_tokens_field not in ("max_tokens", "max_completion_tokens"):
            raise ValueError("max_tokens_field must be max_tokens or max_completion_tokens")
        super().__init__(**options)
        self.max_tokens_field = max_tokens_field

    def body(self, request: GenerateRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": role, "content": text} for role, text in conversation(request)],
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
        return (choice.delta.content or "") if choice.delta else ""

    def refine(self, status: int, fault: Fault) -> str | None:
        return "content_filter" if status == 400 and fault.kinds & FILTER_KINDS else None
