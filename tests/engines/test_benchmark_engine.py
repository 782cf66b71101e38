"""The benchmark engine's two faces agree: `feed` (what the worker uses: pieces from loop callbacks) gives the
pieces `generate` gives, unpaced (all of a short answer before it returns), in bursts, paced, after a prefill,
and stops when told."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from contracts.llm import GenerateRequest
from services.llm.engines.base import Piece
from services.llm.engines.benchmark import BURST, BenchmarkEngine


def _req(n: int) -> GenerateRequest:
    return GenerateRequest(request_id="b", model="m", max_tokens=n, prompt="one two three")


async def _generated(engine: BenchmarkEngine, req: GenerateRequest) -> list[Piece]:
    return [p async for p in engine.generate(engine.prepare(req), req)]


class Sink:
    def __init__(self) -> None:
        self.items: list[Piece | BaseException] = []
        self.ended = asyncio.get_running_loop().create_future()
        self.third = asyncio.get_running_loop().create_future()

    def put(self, item: Piece | BaseException) -> None:
        assert not self.ended.done(), "a piece after done"
        self.items.append(item)
        if len(self.items) == 3:
            self.third.set_result(None)

    def done(self) -> None:
        assert not self.ended.done(), "done twice"
        self.ended.set_result(None)


def _fed(engine: BenchmarkEngine, req: GenerateRequest, sink: Sink) -> Any:
    return engine.feed(engine.prepare(req), req, sink.put, sink.done)


async def test_a_short_unpaced_answer_is_all_there_when_feed_returns() -> None:
    engine, req, sink = BenchmarkEngine(token_text=" x"), _req(16), Sink()
    _fed(engine, req, sink)
    assert sink.ended.done() and sink.items == await _generated(engine, req)
    assert [p.finish_reason for p in sink.items if isinstance(p, Piece)] == [None] * 15 + ["length"]


async def test_a_long_answer_comes_in_bursts_that_let_the_loop_run() -> None:
    engine, req, sink = BenchmarkEngine(), _req(3 * BURST + 5), Sink()
    _fed(engine, req, sink)
    assert len(sink.items) == BURST and not sink.ended.done()  # the rest waits for the loop
    await sink.ended
    assert sink.items == await _generated(engine, req)


async def test_paced_tokens_and_a_prefill_come_from_timers_and_stop_when_told() -> None:
    engine, req, sink = BenchmarkEngine(tokens_per_s=2000, prefill_s=0.002), _req(8), Sink()
    _fed(engine, req, sink)
    assert sink.items == []  # the prefill first
    await sink.ended
    assert sink.items == await _generated(engine, req)

    slow, stopped = BenchmarkEngine(tokens_per_s=1000), Sink()
    stop = _fed(slow, _req(1000), stopped)
    await stopped.third
    stop()
    count = len(stopped.items)
    await asyncio.sleep(0.02)  # a window of 20 tokens' time (not a wait for anything): none may come
    assert len(stopped.items) == count and not stopped.ended.done()


@pytest.mark.parametrize("count", [1, BURST, BURST + 1])
async def test_burst_edges(count: int) -> None:
    engine, req, sink = BenchmarkEngine(), _req(count), Sink()
    _fed(engine, req, sink)
    await sink.ended
    assert sink.items == await _generated(engine, req)


@pytest.mark.parametrize("options", [{}, {"tokens_per_s": 20_000}, {"prefill_s": 0.001}])
async def test_a_fed_answer_leaves_nothing_for_the_cyclic_collector(options: dict[str, Any]) -> None:
    """Every request's feed is freed by reference count (services run with a high collector threshold, so
    cycles made per request would pile up between collections): no piece or callback of it is garbage."""
    engine = BenchmarkEngine(**options)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds unreachable stays in gc.garbage to be looked at
    try:
        for _ in range(10):
            sink = Sink()
            _fed(engine, _req(BURST + 3), sink)
            await sink.ended
            assert len(sink.items) == BURST + 3
        del sink
        gc.collect()
        ours = [o for o in gc.garbage if isinstance(o, Piece)
                or "BenchmarkEngine" in getattr(o, "__qualname__", "") or "_Feed" in type(o).__qualname__]
        assert ours == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
