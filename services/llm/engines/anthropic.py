"""Anthropic Messages API as a translator: system on top, max_tokens required, named stream events."""

from __future__ import annotations

from typing import Any

import msgspec

from contracts.llm import GenerateRequest
from services.llm.engines.remote import RemoteEngine, SSEEvent, Turn, conversation

FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "refusal": "content_filter",
}


class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None

    def prompt(self) -> int | None:
        if self.input_tokens is None:
            return None
        return self.input_tokens + (self.cache_creation_input_tokens or 0) + (self.cache_read_input_tokens or 0)


class _Message(msgspec.Struct):
    usage: _Usage | None = None


class _MessageStart(msgspec.Struct):
    message: _Message


class _TextDelta(msgspec.Struct):
    type: str
    text: str = ""


class _BlockDelta(msgspec.Struct):
    delta: _TextDelta


class _StopDelta(msgspec.Struct):
    stop_reason: str | None = None


class _MessageDelta(msgspec.Struct):
    delta: _StopDelta
    usage: _Usage | None = None


class _ErrorDetail(msgspec.Struct):
    type: str = "error"
    message: str = ""


class _ErrorEvent(msgspec.Struct):
    error: _ErrorDetail


_start = msgspec.json.Decoder(_MessageStart)
_block = msgspec.json.Decoder(_BlockDelta)
_message_delta = msgspec.json.Decoder(_MessageDelta)
_error = msgspec.json.Decoder(_ErrorEvent)


class AnthropicEngine(RemoteEngine):
    name = "anthropic"
    default_base_url = "https://api.anthropic.com"

    def __init__(self, *, anthropic_version: str = "2023-06-01", **options: Any) -> None:
        super().__init__(**options)
        self.anthropic_version = anthropic_version

    def body(self, request: GenerateRequest) -> dict[str, Any]:
        turns = conversation(request)
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": request.max_tokens,
            "messages": [{"role": role, "content": text} for role, text in turns if role != "system"],
            "stream": True,
        }
        if system := "\n\n".join(text for role, text in turns if role == "system"):
            body["system"] = system
        # Anthropic's range is 0..1 and newer models refuse temperature and top_p together: send only
        # what differs from the shared default (1.0).
        if request.temperature != 1.0:
            body["temperature"] = min(request.temperature, 1.0)
        if request.top_p != 1.0:
            body["top_p"] = request.top_p
        if request.stop:
            body["stop_sequences"] = request.stop
        if request.user is not None:
            body["metadata"] = {"user_id": request.user}
        return body

    def stream_url(self) -> str:
        return f"{self.base_url}/v1/messages"

    def models_url(self) -> str:
        return f"{self.base_url}/v1/models"

    def auth_headers(self) -> dict[str, str]:
        headers = {"anthropic-version": self.anthropic_version}
        if self.api_key:
            headers["x-api-key"] = self.api_key
        return headers

    def read(self, event: SSEEvent, turn: Turn) -> str:
        if event.event == "content_block_delta":
            delta = self.decode(_block, event).delta
            return delta.text if delta.type == "text_delta" else ""
        if event.event == "message_start":
            usage = self.decode(_start, event).message.usage
            if usage is not None:
                turn.prompt_tokens = usage.prompt()
                turn.completion_tokens = usage.output_tokens
        elif event.event == "message_delta":
            message = self.decode(_message_delta, event)
            if message.delta.stop_reason:
                turn.finish = FINISH.get(message.delta.stop_reason, "stop")
            if message.usage is not None:
                turn.prompt_tokens = message.usage.prompt() or turn.prompt_tokens
                if message.usage.output_tokens is not None:
                    turn.completion_tokens = message.usage.output_tokens
        elif event.event == "error":
            error = self.decode(_error, event).error
            raise self.upstream.fail("upstream_error", f"failed mid-stream: {error.type}: {error.message}")
        return ""  # ping, content_block_start/stop, message_stop, and event types added later
