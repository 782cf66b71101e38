"""Bridge a blocking token iterator (llama.cpp, torch) onto the event loop, stoppable between tokens."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from services.llm.engines.base import Piece

_DONE = object()


async def iterate_in_thread(
    executor: ThreadPoolExecutor, produce: Callable[[threading.Event], Iterator[Piece]]
) -> AsyncIterator[Piece]:
    """Run `produce(stop)` in `executor`; leaving early sets `stop` and waits for the thread to let go."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()
    stop = threading.Event()

    def post(item: object) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # loop closed during shutdown
            stop.set()

    def run() -> None:
        try:
            for piece in produce(stop):
                if stop.is_set():
                    break
                post(piece)
        except BaseException as exc:
            post(exc)
        finally:
            post(_DONE)

    future = loop.run_in_executor(executor, run)
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, Piece)
            yield item
    finally:
        stop.set()
        # The engine is single-tenant per slot: the slot is free only once the thread has stopped.
        await asyncio.shield(future)
