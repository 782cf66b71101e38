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

    async def close(self) -> None:
        return None

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
        return _Feed(self, request.max_tokens, put, done).stop


class _Feed:
    """One request's pieces from loop callbacks. An object, not closures that call themselves again: a nested
    function that schedules itself is a reference cycle, garbage for the cyclic collector after every request;
    this is freed by reference count once its last callback ran."""

    __slots__ = ("count", "done", "handle", "last", "loop", "made", "put", "rate", "start", "token")

    def __init__(self, engine: BenchmarkEngine, count: int, put: Put, done: Callable[[], None]) -> None:
        self.loop = loop = asyncio.get_running_loop()
        self.count = count
        self.put, self.done = put, done
        self.rate = rate = engine.tokens_per_s
        self.start = loop.time() + engine.prefill_s
        self.made = 0
        self.handle: asyncio.Handle | None = None
        # Immutable: shared by every piece of the answer.
        self.token, self.last = Piece(engine.token_text, 1, None), Piece(engine.token_text, 1, "length")
        if count <= 0:
            done()
        elif rate > 0:
            self.handle = loop.call_at(self.start + 1 / rate, self._paced)
        elif engine.prefill_s > 0:
            self.handle = loop.call_at(self.start, self._burst)
        else:
            self._burst()

    def _piece(self) -> Piece:
        self.made += 1
        return self.last if self.made == self.count else self.token

    def _paced(self) -> None:
        self.handle = None
        self.put(self._piece())
        if self.made < self.count:
            self.handle = self.loop.call_at(self.start + (self.made + 1) / self.rate, self._paced)
        else:
            self.done()

    def _burst(self) -> None:
        self.handle = None
        for _ in range(min(BURST, self.count - self.made)):
            self.put(self._piece())
        if self.made < self.count:
            self.handle = self.loop.call_soon(self._burst)
        else:
            self.done()

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
