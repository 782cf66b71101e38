"""A small pipelined Redis client for the per-request hot path (scripts), parsed by hiredis.

redis-py's asyncio client costs ~150-300 µs of Python per command on this machine class; the
gateway runs one script per request (admission) and one after it (settle), so it speaks RESP itself:
one connection, commands written as they come, replies matched to callers in order. Anything
that is not on the request path keeps using redis-py.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from typing import Any
from urllib.parse import urlparse

import hiredis

from services.runtime.sweep import sweep


class RedisUnavailable(ConnectionError):
    """Redis could not be reached, or did not answer in time."""


class ReplyError(Exception):
    """Redis answered with an error."""


def _pack(args: tuple[Any, ...]) -> bytes:
    """One command in RESP (hiredis's C packer where it has one: the same bytes, half the time)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


_pack_fast = getattr(hiredis, "pack_command", _pack)


class Resp:
    def __init__(self, url: str, *, timeout_s: float = 0.5) -> None:
        parsed = urlparse(url)
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 6379
        self.db = int((parsed.path or "/0").lstrip("/") or 0)
        self.password = parsed.password
        self.timeout_s = timeout_s
        self._writer: asyncio.StreamWriter | None = None
        self._pending: deque[asyncio.Future[Any]] = deque()
        self._reader_task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Lock = asyncio.Lock()
        # Commands issued in one loop iteration go out in one write (a socket write per command showed
        # as the largest cost of a limited key's admission under load).
        self._out: list[bytes] = []
        self._out_writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> asyncio.StreamWriter:
        async with self._connecting:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            try:
                async with asyncio.timeout(self.timeout_s):
                    reader, writer = await asyncio.open_connection(self.host, self.port)
            except (OSError, TimeoutError) as exc:
                raise RedisUnavailable(f"cannot connect to Redis at {self.host}:{self.port}: {exc!r}") from exc
            self._writer = writer
            self._reader_task = asyncio.create_task(self._read(reader))
            setup: list[tuple[Any, ...]] = []
            if self.password:
                setup.append(("AUTH", self.password))
            if self.db:
                setup.append(("SELECT", self.db))
            for command in setup:
                await self._send(writer, command)
            return writer

    def _enqueue(self, writer: asyncio.StreamWriter, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        """Queue a command for `writer` (its reply's future); `_write_out` sends what is queued in one write."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(future)
        if self._out and self._out_writer is not writer:
            self._write_out()
        self._out_writer = writer
        self._out.append(_pack_fast(args))
        return future

    async def _send(self, writer: asyncio.StreamWriter, args: tuple[Any, ...]) -> Any:
        future = self._enqueue(writer, args)
        self._write_out()  # a caller waits for this one: now, with the settles queued before it (in order)
        try:
            reply = await sweep().wait(future, self.timeout_s)  # no timer of its own: this is per request
        except TimeoutError as exc:
            self._drop(RedisUnavailable("Redis did not answer in time"))
            raise RedisUnavailable("Redis did not answer in time") from exc
        if isinstance(reply, hiredis.ReplyError):
            raise ReplyError(str(reply))
        return reply

    async def _read(self, reader: asyncio.StreamReader) -> None:
        parser = hiredis.Reader()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    raise RedisUnavailable("Redis closed the connection")
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    if self._pending:
                        future = self._pending.popleft()
                        if not future.done():
                            future.set_result(reply)
        except (OSError, RedisUnavailable) as exc:
            self._drop(exc if isinstance(exc, RedisUnavailable) else RedisUnavailable(repr(exc)))

    def _write_out(self) -> None:
        out, writer = self._out, self._out_writer
        self._out, self._out_writer = [], None
        if out and writer is not None and not writer.is_closing():
            writer.write(b"".join(out))

    def _drop(self, exc: BaseException) -> None:
        """The connection is unusable: fail everything in flight; the next call reconnects."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        while self._pending:
            future = self._pending.popleft()
            if not future.done():
                future.set_exception(exc)

    def call_nowait(self, *args: Any) -> asyncio.Future[Any]:
        """Queue a command now (so it reaches Redis before any command issued after this call) and return
        its reply's future; while disconnected it is sent after reconnecting, in a task."""
        writer = self._writer
        if writer is None or writer.is_closing():
            return asyncio.ensure_future(self.call(*args))
        if not self._out:
            asyncio.get_running_loop().call_soon(self._write_out)
        return self._enqueue(writer, args)

    def send_now(self, *args: Any) -> asyncio.Future[Any] | None:
        """Write a command at once (after those queued before it) and return its raw reply's future: a value,
        or a hiredis.ReplyError object; RedisUnavailable if the connection drops. None while disconnected."""
        writer = self._writer
        if writer is None or writer.is_closing():
            return None
        future = self._enqueue(writer, args)
        self._write_out()
        return future

    def drop(self, reason: str) -> None:
        """Give up on the connection (a reply did not come in time): what is in flight fails, the next call
        reconnects."""
        self._drop(RedisUnavailable(reason))

    async def call(self, *args: Any) -> Any:
        writer = self._writer
        if writer is None or writer.is_closing():
            writer = await self._connect()
        return await self._send(writer, args)

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)
        self._drop(RedisUnavailable("client closed"))


class Script:
    """EVALSHA with a one-time SCRIPT LOAD when the server does not know the script yet."""

    def __init__(self, client: Resp, source: str) -> None:
        self.client = client
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self.client.call("EVALSHA", self.sha, len(keys), *keys, *args)
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            await self.client.call("SCRIPT", "LOAD", self.source)
            return await self.client.call("EVALSHA", self.sha, len(keys), *keys, *args)
