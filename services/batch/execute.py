"""Lines sent to a gateway to run (`batch.exec`, any replica), their replies on one wildcard inbox.

A gateway answers ExecAlive every ALIVE_S while the line runs, then one ExecResult. No gateway
(the server's no-responders status) or a silent one is `Lost`: the line's fate is unknown, so it is run
again later under the same request id and attempt, and the ledger keeps whichever run it heard first.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable

import msgspec

from contracts import headers as h
from contracts.batch import ExecLine, ExecResult, exec_encoder, exec_reply_decoder
from contracts.subjects import BATCH_EXEC
from services.runtime import bus, tracing


class Lost(Exception):
    """The line's run did not report back (no gateway, a gateway that went silent, the bus away)."""


class ExecClient:
    def __init__(self, nc: bus.Connection, *, silence_s: float = 5.0) -> None:
        self.nc = nc
        self.silence_s = silence_s
        self.prefix = nc.new_inbox()
        self._waiting: dict[str, asyncio.Queue[bus.Msg]] = {}
        self._sub: object | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self.prefix + ".*", cb=self._on_reply)
        await self.nc.flush()

    async def _on_reply(self, msg: bus.Msg) -> None:
        queue = self._waiting.get(msg.subject.rsplit(".", 1)[1])
        if queue is not None:
            queue.put_nowait(msg)

    async def run(self, line: ExecLine, keepalive: Callable[[], Awaitable[None]]) -> ExecResult:
        """Run one line; `keepalive` is awaited at every sign of life (the work item's in-progress ack)."""
        if tracing.tracer is None:
            return await self._run(line, keepalive, None)
        # The line's trace starts here: the gateway's span for it (and the worker's) are its children.
        span = tracing.start(f"batch line {line.endpoint}", None, {
            tracing.BATCH_ID: line.batch_id, "inferbus.request.id": line.request_id, "inferbus.attempt": line.attempt})
        code: str | None = "lost"
        try:
            result = await self._run(line, keepalive, span.headers(None))
            code = result.code
            return result
        finally:
            span.end(code)

    async def _run(
        self, line: ExecLine, keepalive: Callable[[], Awaitable[None]], headers: dict[str, str] | None
    ) -> ExecResult:
        token = secrets.token_hex(8)
        queue: asyncio.Queue[bus.Msg] = asyncio.Queue()
        self._waiting[token] = queue
        try:
            try:
                await self.nc.publish(BATCH_EXEC, exec_encoder.encode(line), reply=f"{self.prefix}.{token}",
                                      headers=headers)
            except Exception as exc:  # disconnected: publish buffers, but a closed or draining connection refuses
                raise Lost(f"the bus refused the line: {exc!r}") from exc
            loop = asyncio.get_running_loop()
            deadline = loop.time() + line.timeout_s + self.silence_s
            while True:
                wait = min(self.silence_s, deadline - loop.time())
                if wait <= 0:
                    raise Lost("the line ran past its deadline without a result")
                try:
                    msg = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    raise Lost("the gateway running the line went silent") from None
                if msg.headers and msg.headers.get(h.STATUS) == h.NO_RESPONDERS:
                    raise Lost("no gateway is serving batch lines")
                try:
                    reply = exec_reply_decoder.decode(msg.data)
                except msgspec.DecodeError as exc:
                    raise Lost(f"undecodable reply from the gateway: {exc}") from None
                if isinstance(reply, ExecResult):
                    return reply
                await keepalive()
        finally:
            del self._waiting[token]
