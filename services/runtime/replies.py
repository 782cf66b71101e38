"""The worker's end of a reply stream, and what a worker reads from a request's headers."""

from __future__ import annotations

import time
from typing import Any

import msgspec

from contracts import headers as h
from services.runtime.bus import Connection, Msg


class ReplyStream:
    """Numbers every chunk (`seq` from 0) and publishes it to the caller's inbox; closed after a terminal one."""

    def __init__(
        self, nc: Connection, reply: str, encoder: msgspec.msgpack.Encoder, terminal: tuple[type, ...]
    ) -> None:
        self.nc = nc
        self.reply = reply
        self.encoder = encoder
        self.terminal = terminal
        self.seq = 0
        self.closed = False

    async def send(self, make: Any, *fields: Any) -> None:
        chunk = make(self.seq, *fields)
        self.seq += 1
        if isinstance(chunk, self.terminal):
            self.closed = True
        await self.nc.publish(self.reply, self.encoder.encode(chunk))


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
