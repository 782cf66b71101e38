"""Caller side of the streaming protocol: one muxed inbox, seq checks, timeouts, cancel on abandon."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncGenerator
from typing import Any

import msgspec

from contracts import headers as h
from contracts import subjects
from contracts.errors import InferBusError
from contracts.llm import (
    Bundle,
    Chunk,
    ErrorChunk,
    Final,
    GenerateRequest,
    Heartbeat,
    chunk_decoder,
    request_encoder,
)
from services.runtime import bus
from services.runtime.bus import Connection, Msg, direct
from services.runtime.sweep import Mailbox


def unbundle(decoder: msgspec.msgpack.Decoder[Any], data: bytes) -> list[Any]:
    """The chunks one reply message holds: itself, or a Bundle's items (raises stream_broken if undecodable)."""
    try:
        chunk = decoder.decode(data)
        if isinstance(chunk, Bundle):
            return [decoder.decode(item) for item in chunk.items]
    except msgspec.DecodeError:
        raise InferBusError("stream_broken", "undecodable chunk from worker") from None
    return [chunk]


class Pace:
    """Set by `StreamClient.open` before each chunk it yields: `more` when another one the caller will see
    is already in hand (the same bus message), so the caller can write them to its client in one go."""

    __slots__ = ("more",)

    def __init__(self) -> None:
        self.more = False


class StreamClient:
    """Opens generation streams on the bus. One wildcard inbox subscription serves every stream."""

    def __init__(self, nc: Connection, *, first_chunk_timeout: float = 3.0, idle_timeout: float = 1.5) -> None:
        self.nc = nc
        self.first_chunk_timeout = first_chunk_timeout
        self.idle_timeout = idle_timeout
        self._prefix = f"_INBOX.{secrets.token_hex(8)}"
        self._queues: dict[str, Mailbox[Msg]] = {}
        self._sub: object | None = None

    async def start(self) -> None:
        self._sub = await direct.subscribe(self.nc, self._prefix + ".*", self._route)
        await self.nc.flush()

    def _route(self, msg: Msg) -> None:
        inbox = self._queues.get(msg.subject[len(self._prefix) + 1 :])
        if inbox is not None:
            inbox.put(msg)

    async def stream(
        self,
        subject: str,
        request: GenerateRequest,
        *,
        deadline: float | None = None,
        extra_headers: dict[str, str] | None = None,
    ) -> AsyncGenerator[Chunk, None]:
        """An LLM generation: Accepted, Delta... then Final; see `open`."""
        chunks = self.open(
            subject,
            request_encoder.encode(request),
            request.request_id,
            what=repr(request.model),
            deadline=deadline,
            extra_headers=extra_headers,
        )
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()  # at once, not at garbage collection: it publishes the cancel

    async def open(
        self,
        subject: str,
        payload: bytes,
        request_id: str,
        *,
        decoder: msgspec.msgpack.Decoder[Any] = chunk_decoder,
        terminal: tuple[type, ...] = (Final,),
        what: str = "this model",
        deadline: float | None = None,
        extra_headers: dict[str, str] | None = None,
        pace: Pace | None = None,
    ) -> AsyncGenerator[Any, None]:
        """Publish one request and yield its chunks until a `terminal` one; raise on an error chunk.

        Chunks are decoded by `decoder` (a tagged union holding Accepted, Heartbeat and ErrorChunk
        from contracts.llm plus the kind's own chunks). `deadline` is absolute, in time.time()
        seconds. Leaving the iterator before the terminal chunk publishes a cancel for the request,
        which frees the worker's engine slot.
        """
        token = secrets.token_hex(8)
        inbox: Mailbox[Msg] = Mailbox()
        self._queues[token] = inbox
        hdrs = {h.REQUEST_ID: request_id, h.BUNDLE: "1"}
        if deadline is not None:
            hdrs[h.DEADLINE] = str(int(deadline * 1000))
        if extra_headers:
            hdrs.update(extra_headers)
        finished = False
        try:
            await bus.publish(self.nc, subject, payload, reply=f"{self._prefix}.{token}", headers=hdrs)
            expected = 0
            timeout = self.first_chunk_timeout
            while True:
                wait = timeout
                if deadline is not None:
                    left = deadline - time.time()
                    if left <= 0:
                        raise InferBusError("deadline_exceeded", "the request deadline passed")
                    wait = min(wait, left)
                try:
                    msg = await inbox.get(wait)
                except TimeoutError:
                    if deadline is not None and deadline - time.time() <= 0:
                        raise InferBusError("deadline_exceeded", "the request deadline passed") from None
                    if expected == 0:
                        raise InferBusError("worker_timeout", "no worker answered in time") from None
                    raise InferBusError("stream_broken", "the worker stopped answering mid-stream") from None
                if msg.headers and msg.headers.get(h.STATUS) == h.NO_RESPONDERS and not msg.data:
                    finished = True
                    raise InferBusError("no_worker", f"no worker is serving {what} right now")
                timeout = self.idle_timeout
                chunks = unbundle(decoder, msg.data)
                # The caller sees all but heartbeats: `more` while one of those is still in this message.
                last = len(chunks) - 1
                while last >= 0 and isinstance(chunks[last], Heartbeat):
                    last -= 1
                for index, chunk in enumerate(chunks):
                    if pace is not None:
                        pace.more = index < last
                    if chunk.seq != expected:
                        raise InferBusError("stream_broken", f"chunk gap: expected seq {expected}, got {chunk.seq}")
                    expected += 1
                    if isinstance(chunk, Heartbeat):
                        continue
                    if isinstance(chunk, ErrorChunk):
                        finished = True
                        raise chunk.to_error()
                    if isinstance(chunk, terminal):
                        finished = True
                        yield chunk
                        return
                    yield chunk
        finally:
            del self._queues[token]
            if not finished and not self.nc.is_closed:
                await self.nc.publish(subjects.cancel(request_id), b"")
