"""The engine seam: what every LLM engine implements. The worker around it does policy."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import NamedTuple, Protocol

from contracts.llm import GenerateRequest, Message

Progress = Callable[[str, float], None]


class Prepared(NamedTuple):
    """A request rendered for the engine: prompt in the engine's own form, and its token count."""

    prompt: object
    prompt_tokens: int


class Piece(NamedTuple):
    text: str
    tokens: int
    finish_reason: str | None = None


class Engine(Protocol):
    name: str
    capacity: int  # generations it runs at once

    async def load(self, progress: Progress) -> None: ...

    def prepare(self, request: GenerateRequest) -> Prepared: ...

    def generate(self, prepared: Prepared, request: GenerateRequest) -> AsyncIterator[Piece]: ...

    async def close(self) -> None: ...


def with_system_prompt(messages: list[Message], system_prompt: str | None) -> list[dict[str, str]]:
    """Messages as template dicts; a deployment's default system prompt when the caller sent none."""
    rendered = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in messages]
    if system_prompt and not any(m["role"] == "system" for m in rendered):
        rendered.insert(0, {"role": "system", "content": system_prompt})
    return rendered
