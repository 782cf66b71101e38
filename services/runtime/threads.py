"""Bridge a blocking iterator (an engine's decode loop) onto the event loop, stoppable between items."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar, cast

T = TypeVar("T")
_DONE = object()


async def iterate_in_thread(
    executor: ThreadPoolExecutor, produce: Callable[[threading.Event], Iterator[T]]
) -> AsyncGenerator[T, None]:
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
            for item in produce(stop):
                if stop.is_set():
                    break
                post(item)
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
            yield cast(T, item)
    finally:
        stop.set()
        # An engine slot is free only once its thread has stopped.
        await asyncio.shield(future)
