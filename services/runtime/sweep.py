"""Coarse timeouts without a timer per wait: one task per event loop fires what is due every TICK_S.

`asyncio.timeout` costs a timer handle, its rescheduling and the task's cancel bookkeeping on every
use (tens of microseconds on uvloop); the request path waits several times per request (a reply, a
heartbeat interval, a deadline). Here a wait registers its due time in a dict and one sweeper task,
alive only while something is registered, fires the expired ones. A timeout fires up to one tick
late, which no timeout on the request path (seconds) notices.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

TICK_S = 0.01


class Sweep:
    def __init__(self, loop: asyncio.AbstractEventLoop, tick_s: float = TICK_S) -> None:
        self.loop = loop
        self.tick_s = tick_s
        self._due: dict[object, tuple[float, Callable[[], Any]]] = {}
        self._task: asyncio.Task[None] | None = None

    def at(self, key: object, when: float, fire: Callable[[], Any]) -> None:
        """Call `fire` once at about `when` (loop.time()) unless `cancel(key)` comes first."""
        self._due[key] = (when, fire)
        if self._task is None:
            self._task = self.loop.create_task(self._run())

    def cancel(self, key: object) -> None:
        self._due.pop(key, None)

    async def wait(self, future: asyncio.Future[Any], timeout_s: float) -> Any:
        """`await future`, raising TimeoutError if it is not done within about `timeout_s`."""
        self.at(future, self.loop.time() + timeout_s, lambda: _time_out(future))
        try:
            return await future
        finally:
            self._due.pop(future, None)

    async def _run(self) -> None:
        try:
            while self._due:
                await asyncio.sleep(self.tick_s)
                now = self.loop.time()
                expired = [key for key, (when, _) in self._due.items() if when <= now]
                for key in expired:
                    entry = self._due.pop(key, None)
                    if entry is None:
                        continue
                    try:
                        entry[1]()
                    except Exception as exc:  # one bad callback must not stop the others' timeouts
                        self.loop.call_exception_handler({"message": "sweep callback failed", "exception": exc})
        finally:
            self._task = None


def _time_out(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


_sweeps: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Sweep] = weakref.WeakKeyDictionary()


_last: tuple[weakref.ref[asyncio.AbstractEventLoop], Sweep] | None = None  # the last loop asked about, and its sweep


def sweep() -> Sweep:
    """The running loop's sweep (a process has one loop, so the last one asked about is cached: a
    WeakKeyDictionary lookup makes a weak reference per call, and this is called per request and per token)."""
    global _last
    loop = asyncio.get_running_loop()
    last = _last
    if last is not None and last[0]() is loop:
        return last[1]
    found = _sweeps.get(loop)
    if found is None:
        found = _sweeps[loop] = Sweep(loop)
    _last = (weakref.ref(loop), found)
    return found


class Mailbox(Generic[T]):
    """Items for one consumer: a deque and at most one waiter, timed out on the sweep (an asyncio.Queue and an
    asyncio.timeout per wait cost more than the rest of a short request's handling)."""

    __slots__ = ("items", "timeouts", "waiter")

    def __init__(self) -> None:
        self.items: deque[T] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.timeouts: Sweep | None = None  # the loop's sweep, looked up at the first wait (a stream waits per token)

    def put(self, item: T) -> None:
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def get_nowait(self) -> T:
        if not self.items:
            raise asyncio.QueueEmpty
        return self.items.popleft()

    async def get(self, wait_s: float, *, precise: bool = False) -> T:
        """The next item; TimeoutError after about `wait_s` (to the millisecond if `precise`, else to a tick)."""
        while not self.items:
            timeouts = self.timeouts
            if timeouts is None:
                timeouts = self.timeouts = sweep()
            self.waiter = waiter = timeouts.loop.create_future()
            try:
                if precise:
                    async with asyncio.timeout(wait_s):
                        await waiter
                else:  # the sweep entry inline, keyed by the mailbox: no coroutine or closure per wait (per token)
                    timeouts.at(self, timeouts.loop.time() + wait_s, self._time_out)
                    try:
                        await waiter
                    finally:
                        timeouts.cancel(self)
            finally:
                self.waiter = None
        return self.items.popleft()

    def _time_out(self) -> None:
        if self.waiter is not None:
            _time_out(self.waiter)
