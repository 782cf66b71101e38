"""The worker's end of a reply stream, and what a worker reads from a request's headers."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec

from contracts import headers as h
from contracts.llm import Accepted, Bundle, Heartbeat
from services.runtime.bus import Connection, Msg, publish, publish_nowait
from services.runtime.sweep import sweep


class ReplyStream:
    """Numbers every chunk (`seq` from 0) and publishes it to the caller's inbox; closed after a terminal one.

    With `bundle` (the caller sent `Inferbus-Bundle: 1`) chunks wait to be sent together: a terminal one
    sends everything at once; a progress one (a token) at the end of this loop iteration, or, while
    tokens come faster than one per `COALESCE_S`, once that much time has passed since the last
    message (a fast stream goes out a few tokens per message, a slow one token by token); anything
    else (Accepted, Heartbeat) with the next or within `HOLD_S` (to a sweep tick). So a short answer is one message.
    """

    HOLD_S = 0.002
    # 2 ms, not 0.5: with 64 fast streams a worker's loop turn takes ~0.5 ms, so at 0.5 ms every token went
    # alone and the gateway wrote each as its own SSE event (bench floor, streaming c=64, side by side: 1,714 vs
    # 1,126 streams/s, 0.85 vs 1.25 ms CPU per stream; c=1 p50 unchanged). Real engines' tokens (an engine step
    # apart, 10 ms and more) still go one by one; the first token of a stream always goes at once.
    COALESCE_S = 0.002

    def __init__(
        self,
        nc: Connection,
        reply: str,
        encoder: msgspec.msgpack.Encoder,
        terminal: tuple[type, ...],
        *,
        bundle: bool = False,
    ) -> None:
        self.nc = nc
        self.reply = reply
        self.encoder = encoder
        self.terminal = terminal
        self.bundle = bundle
        self.seq = 0
        self.closed = False
        self._pending: list[bytes] = []
        self._first_seq = 0
        self._timer: asyncio.TimerHandle | None = None
        self._soon = False
        self._held = False  # an Accepted or Heartbeat waits on the sweep for company
        self._last_flush = 0.0

    async def send(self, make: Any, *fields: Any, more: bool = False) -> None:
        """`more`: the caller sends another chunk right after this one (the terminal): hold it for that."""
        chunk = make(self.seq, *fields)
        self.seq += 1
        data = self.encoder.encode(chunk)
        terminal = isinstance(chunk, self.terminal)
        if terminal:
            self.closed = True
        if not self.bundle:
            await publish(self.nc, self.reply, data)
            return
        if not self._pending:
            self._first_seq = chunk.seq
        self._pending.append(data)
        if terminal:
            await self.flush()
        elif more:
            return
        elif not isinstance(chunk, Accepted | Heartbeat):
            if not self._soon:
                self._soon = True
                loop = asyncio.get_running_loop()
                wait = self._last_flush + self.COALESCE_S - loop.time()
                if wait > 0:  # a fast stream: gather what comes in the next millisecond or two
                    if self._timer is not None:
                        self._timer.cancel()
                    self._timer = loop.call_later(wait, self._flush_later)
                else:
                    loop.call_soon(self._flush_later)
        elif self._timer is None and not self._soon and not self._held:
            self._held = True  # on the sweep, not a timer of its own: almost every hold ends by a flush first
            timeouts = sweep()
            timeouts.at(self, timeouts.loop.time() + self.HOLD_S, self._flush_later)

    def _flush_later(self) -> None:
        if not self._pending:
            self._reset()
        elif not self._flush_nowait():  # only nats-py's awaited path may send now (reconnecting, say)
            task = asyncio.ensure_future(self.flush())
            _flushing.add(task)
            task.add_done_callback(_flushing.discard)

    def _reset(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._held:
            self._held = False
            sweep().cancel(self)
        self._soon = False

    def _packed(self) -> bytes:
        """What is pending as one message: one chunk as itself, several as a Bundle."""
        pending = self._pending
        if len(pending) == 1:
            return pending[0]
        return self.encoder.encode(Bundle(self._first_seq, [msgspec.Raw(p) for p in pending]))

    def _flush_nowait(self) -> bool:
        """Send what is pending without awaiting (from a loop callback: no task); False if it must be awaited."""
        if not self.nc.is_closed and not publish_nowait(self.nc, self.reply, self._packed()):
            return False
        self._pending = []  # sent, or dropped with the connection (as `flush` does)
        self._reset()
        self._last_flush = asyncio.get_running_loop().time()
        return True

    async def flush(self) -> None:
        """Send what is pending: one chunk as itself, several as one Bundle."""
        self._reset()
        if not self._pending or self.nc.is_closed:
            self._pending = []
            return
        data = self._packed()
        self._pending = []
        self._last_flush = asyncio.get_running_loop().time()
        await publish(self.nc, self.reply, data)  # in the outbound buffer before it yields: order is kept


_flushing: set[asyncio.Future[None]] = set()  # flushes scheduled from callbacks, kept until done


def wants_bundles(msg: Msg) -> bool:
    return msg.headers is not None and msg.headers.get(h.BUNDLE) == "1"


def deadline_in(msg: Msg) -> float | None:
    """Seconds left until the request's deadline header (None: no deadline)."""
    raw = msg.headers.get(h.DEADLINE) if msg.headers else None
    if raw is None:
        return None
    return max(int(raw) / 1000 - time.time(), 0.0)


def trace_id(msg: Msg) -> str | None:
    parent = msg.headers.get(h.TRACEPARENT) if msg.headers else None
    parts = parent.split("-") if parent else []
    return parts[1] if len(parts) == 4 else None
