"""Deterministic benchmark engine: no model, fixed tokens at a fixed rate. For overhead benchmarks only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from contracts.llm import GenerateRequest
from services.llm.engines.base import Piece, Prepared, Progress, Put

BURST = 32  # tokens made at once before other work gets the loop (when not paced)


class BenchmarkEngine:
    name = "benchmark"

    def __init__(
        self, *, tokens_per_s: float = 0.0, capacity: int = 4096, token_text: str = " tok", prefill_s: float = 0.0
    ) -> None:
        self.tokens_per_s = tokens_per_s
        self.capacity = capacity
        self.token_text = token_text
        self.prefill_s = prefill_s  # time before the first token (a long prompt's prefill), e.g. to fail a worker in it

    async def load(self, progress: Progress) -> None:
        progress("benchmark engine ready (no model)", 1.0)

    def prepare(self, request: GenerateRequest) -> Prepared:
        text = request.prompt if request.prompt is not None else " ".join(m.content for m in request.messages or [])
        return Prepared(prompt=None, prompt_tokens=len(text.split()))

    async def generate(self, prepared: Prepared, request: GenerateRequest) -> AsyncIterator[Piece]:
        if self.prefill_s > 0:
            await asyncio.sleep(self.prefill_s)  # the prefill's duration, not a wait for anything
        loop = asyncio.get_running_loop()
        start = loop.time()
        count = request.max_tokens
        for i in range(count):
            if self.tokens_per_s > 0:
                delay = start + (i + 1) / self.tokens_per_s - loop.time()
                await asyncio.sleep(max(delay, 0))
            elif i % BURST == BURST - 1:
                await asyncio.sleep(0)
            yield Piece(self.token_text, 1, "length" if i == count - 1 else None)

    def feed(self, prepared: Prepared, request: GenerateRequest, put: Put,
             done: Callable[[], None]) -> Callable[[], None]:
        """`generate`'s pieces from loop callbacks (what the worker uses): a short unpaced answer is all there
        before this returns, with no task, generator or loop iteration of its own; paced tokens come one per
        callback at their times (a loop turn each, as `generate`'s sleeps)."""
        loop = asyncio.get_running_loop()
        count = request.max_tokens
        rate = self.tokens_per_s
        start = loop.time() + self.prefill_s
        made = 0
        handle: asyncio.Handle | None = None
        token, last = Piece(self.token_text, 1, None), Piece(self.token_text, 1, "length")  # immutable: shared

        def piece() -> Piece:
            nonlocal made
            made += 1
            return last if made == count else token

        def paced() -> None:
            nonlocal handle
            handle = None
            put(piece())
            if made < count:
                handle = loop.call_at(start + (made + 1) / rate, paced)
            else:
                done()

        def burst() -> None:
            nonlocal handle
            handle = None
            for _ in range(min(BURST, count - made)):
                put(piece())
            if made < count:
                handle = loop.call_soon(burst)
            else:
                done()

        if count <= 0:
            done()
        elif rate > 0:
            handle = loop.call_at(start + 1 / rate, paced)
        elif self.prefill_s > 0:
            handle = loop.call_at(start, burst)
        else:
            burst()

        def stop() -> None:
            if handle is not None:
                handle.cancel()

        return stop

    async def close(self) -> None:
        return None
