"""Google Gemini (generativelanguage API) as a translator: contents, systemInstruction, generationConfig."""

from __future__ import annotations

from typing import Any

import msgspec

from contracts.llm import GenerateRequest
from services.llm.engines.remote import Fault, RemoteEngine, SSEEvent, Turn, conversation

FINISH = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
}
ROLES = {"user": "user", "assistant": "model"}


class _Part(msgspec.Struct):
    text: str | None = None
    thought: bool = False


class _Content(msgspec.Struct):
    parts: list[_Part] = []


class _Candidate(msgspec.Struct, rename="camel"):
    content: _Content | None = None
    finish_reason: str | None = None


class _Usage(msgspec.Struct, rename="camel"):
    prompt_token_count: int | None = None
    candidates_token_count: int | None = None
    thoughts_token_count: int = 0


class _Feedback(msgspec.Struct, rename="camel"):
    block_reason: str | None = None


class _Error(msgspec.Struct):
    message: str = ""
    status: str = ""


class _Chunk(msgspec.Struct, rename="camel"):
    candidates: list[_Candidate] = []
    usage_metadata: _Usage | None = None
    prompt_feedback: _Feedback | None = None
    error: _Error | None = None


_chunk = msgspec.json.Decoder(_Chunk)


class GeminiEngine(RemoteEngine):
    name = "gemini"
    default_base_url = "https://generativelanguage.googleapis.com"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.model = self.model.removeprefix("models/")

    def body(self, request: GenerateRequest) -> dict[str, Any]:
        turns = conversation(request)
        config: dict[str, Any] = {
            "temperature": request.temperature,
            "topP": request.top_p,
            "maxOutputTokens": request.max_tokens,
        }
        if request.stop:
            config["stopSequences"] = request.stop
        body: dict[str, Any] = {
            "contents": [{"role": ROLES[role], "parts": [{"text": text}]} for role, text in turns if role != "system"],
            "generationConfig": config,
        }
        if system := "\n\n".join(text for role, text in turns if role == "system"):
            body["systemInstruction"] = {"parts": [{"text": system}]}
        return body

    def stream_url(self) -> str:
        return f"{self.base_url}/v1beta/models/{self.model}:streamGenerateContent?alt=sse"

    def models_url(self) -> str:
        return f"{self.base_url}/v1beta/models"

    def auth_headers(self) -> dict[str, str]:
        # The header, never ?key=: a key in the URL ends up in logs and error messages.
        return {"x-goog-api-key": self.api_key} if self.api_key else {}

    def read(self, event: SSEEvent, turn: Turn) -> str:
        chunk = self.decode(_chunk, event)
        if chunk.error is not None:
            raise self.upstream.fail("upstream_error", f"failed mid-stream: {chunk.error.status} {chunk.error.message}")
        if chunk.prompt_feedback is not None and chunk.prompt_feedback.block_reason:
            raise self.upstream.fail("content_filter", f"blocked the prompt ({chunk.prompt_feedback.block_reason})")
        if (usage := chunk.usage_metadata) is not None:
            turn.prompt_tokens = usage.prompt_token_count
            if usage.candidates_token_count is not None:  # thinking tokens are billed as output
                turn.completion_tokens = usage.candidates_token_count + usage.thoughts_token_count
        if not chunk.candidates:
            return ""
        candidate = chunk.candidates[0]
        if candidate.finish_reason:
            turn.finish = FINISH.get(candidate.finish_reason, "stop")
        parts = candidate.content.parts if candidate.content else []
        return "".join(p.text for p in parts if p.text and not p.thought)

    def refine(self, status: int, fault: Fault) -> str | None:
        # Gemini answers a bad key with 400 INVALID_ARGUMENT, reason API_KEY_INVALID.
        return "upstream_auth_failed" if "API_KEY_INVALID" in fault.kinds else None
