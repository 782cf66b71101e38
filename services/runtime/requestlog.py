"""The edge side of the request log: records batched off the response path into the JetStream REQUESTS stream.

`add` appends to a bounded in-memory buffer and returns; a background task publishes every
`interval_s` (or as soon as `max_batch` records wait) one msgpack list per kind on `requestlog.<kind>`,
each message with its own `Nats-Msg-Id`, and keeps a message it could not get acknowledged to send
again as it was (JetStream drops the copy if the first had landed; the metering service's key drops
it after the duplicate window). The request log is not billing: while JetStream is away the buffer
fills, and past `max_buffer` records the oldest are dropped and counted, never the response delayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import deque
from typing import Any, NamedTuple

import msgspec
from prometheus_client import Counter, Gauge

from contracts import requestlog, subjects
from contracts.requestlog import RequestRecord, records_encoder
from contracts.usage import array_chunks, msgpack_array
from services.runtime import bus
from services.runtime import logging as log

PUBLISHED = Counter("inferbus_requestlog_published_total", "Request log records acknowledged by JetStream")
DROPPED = Counter("inferbus_requestlog_dropped_total", "Request log records dropped (buffer full, or invalid)")
RETRIES = Counter("inferbus_requestlog_publish_retries_total", "Request log messages that failed and were retried")
PENDING = Gauge("inferbus_requestlog_pending", "Request log records waiting for a JetStream acknowledgement")
WARN_EVERY_S = 10.0


async def ensure_stream(js: bus.JetStreamContext) -> None:
    """Create the REQUESTS stream if it does not exist (the edge and metering may race to it)."""
    config = bus.StreamConfig(
        name=subjects.REQUEST_LOG_STREAM,
        subjects=[subjects.REQUEST_LOG_ALL],
        retention=bus.RetentionPolicy.LIMITS,
        max_age=requestlog.MAX_AGE_S,
        duplicate_window=requestlog.DUPLICATE_WINDOW_S,
        description="InferBus request log: lists of request records from the edge (dedup on Nats-Msg-Id)",
    )
    await bus.ensure_stream(js, config)


class Envelope(NamedTuple):
    subject: str
    payload: bytes
    msg_id: str
    records: int


def fit(record: RequestRecord) -> RequestRecord:
    """The record within the stream's bounds: bodies cut to MAX_BODY_CHARS."""
    limit = requestlog.MAX_BODY_CHARS
    request, response = record.request_body, record.response_body
    if (request is None or len(request) <= limit) and (response is None or len(response) <= limit):
        return record
    return msgspec.structs.replace(
        record,
        request_body=request[:limit] if request is not None else None,
        response_body=response[:limit] if response is not None else None,
        bodies_truncated=True,
    )


class RequestLogPublisher:
    def __init__(
        self,
        nc: bus.Connection,
        *,
        interval_s: float = 0.05,
        max_batch: int = 256,
        max_buffer: int = 50_000,
        ack_timeout_s: float = 2.0,
        max_backoff_s: float = 2.0,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.interval_s = interval_s
        self.max_batch = max_batch
        self.max_buffer = max_buffer
        self.ack_timeout_s = ack_timeout_s
        self.max_backoff_s = max_backoff_s
        self.buffer: deque[RequestRecord] = deque()
        self.outbox: list[Envelope] = []  # encoded, not yet acknowledged: sent again as they are
        self.published = 0
        self.dropped = 0
        self._origin = secrets.token_hex(8)  # this publisher's message ids: <origin>:<n>
        self._sent = 0
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._hurry = False
        self._task: asyncio.Task[None] | None = None
        self._warned_at = {"drop": 0.0, "retry": 0.0}
        self.logger = log.get("requestlog")

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="requestlog-publisher")

    def add(self, record: RequestRecord) -> None:
        """Queue one record (never waits; drops the oldest when the buffer is full)."""
        if record.kind not in subjects.KINDS:
            self._drop(1, "unknown_kind")
            return
        if len(self.buffer) >= self.max_buffer:
            self.buffer.popleft()
            self._drop(1, "buffer_full")
        self.buffer.append(record)
        self._idle.clear()
        if len(self.buffer) >= self.max_batch:
            self._full.set()
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self.buffer) + sum(e.records for e in self.outbox)

    def stats(self) -> dict[str, Any]:
        return {"requestlog_pending": self.pending, "requestlog_published": self.published,
                "requestlog_dropped": self.dropped}

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109  # a grace period, not a request timeout
        """Publish what is queued (at once, not after `interval_s`) for up to `timeout` s, then stop."""
        self._hurry = True
        self._full.set()
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            self.logger.warning("requestlog_records_lost", count=self.pending)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            if not self.outbox:
                if not self.buffer:
                    self._idle.set()
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if len(self.buffer) < self.max_batch and not self._hurry:
                    with contextlib.suppress(TimeoutError):  # gather what arrives meanwhile into this flush
                        async with asyncio.timeout(self.interval_s):
                            await self._full.wait()
                self._full.clear()
                batch = [self.buffer.popleft() for _ in range(min(len(self.buffer), self.max_batch))]
                try:
                    self.outbox = self._pack(batch)
                except Exception:  # a bug: lose this batch, not the publisher
                    self.logger.exception("requestlog_pack_failed", records=len(batch))
                    self._drop(len(batch), "unencodable")
                    continue
            failed, error = await self._send(self.outbox)
            self.outbox = failed
            PENDING.set(self.pending)
            if failed:
                RETRIES.inc(len(failed))
                self._warn("retry", "requestlog_publish_retry", messages=len(failed), pending=self.pending,
                           error=repr(error))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
            else:
                backoff = 0.05

    def _pack(self, records: list[RequestRecord]) -> list[Envelope]:
        """One message per kind, split where a message would pass the server's max payload."""
        limit = max(self.nc.max_payload - bus.HEADROOM, 4096)
        by_subject: dict[str, list[bytes]] = {}
        for record in records:
            encoded = records_encoder.encode(fit(record))
            if len(encoded) > limit:  # the bodies alone are too much for one message: keep the rest
                record = msgspec.structs.replace(record, request_body=None, response_body=None, bodies_truncated=True)
                encoded = records_encoder.encode(record)
            by_subject.setdefault(subjects.request_log(record.kind), []).append(encoded)
        return [self._envelope(subject, chunk)
                for subject, items in by_subject.items() for chunk in array_chunks(items, len, limit)]

    def _envelope(self, subject: str, items: list[bytes]) -> Envelope:
        self._sent += 1
        return Envelope(subject, msgpack_array(items), f"{self._origin}:{self._sent}", len(items))

    async def _send(self, envelopes: list[Envelope]) -> tuple[list[Envelope], BaseException | None]:
        """Publish without waiting in between, then collect the acks under one timer: (the failed, an error)."""
        futures: list[asyncio.Future[Any] | BaseException] = []
        for env in envelopes:
            try:
                futures.append(
                    await self.js.publish_async(env.subject, env.payload, headers={"Nats-Msg-Id": env.msg_id})
                )
            except Exception as exc:  # not connected: this one (and likely the rest) is retried
                futures.append(exc)
        waiting = [f for f in futures if isinstance(f, asyncio.Future)]
        if waiting:
            await asyncio.wait(waiting, timeout=self.ack_timeout_s)
        failed: list[Envelope] = []
        error: BaseException | None = None
        for env, f in zip(envelopes, futures, strict=True):
            if isinstance(f, asyncio.Future):
                if not f.done():
                    f.cancel()
                    f = TimeoutError(f"no JetStream acknowledgement within {self.ack_timeout_s} s")
                elif f.cancelled():
                    f = TimeoutError("publish cancelled")
                elif f.exception() is None:
                    self.published += env.records
                    PUBLISHED.inc(env.records)
                    continue
                else:
                    f = f.exception() or TimeoutError()
            failed.append(env)
            error = f
        return failed, error

    def _drop(self, n: int, reason: str) -> None:
        self.dropped += n
        DROPPED.inc(n)
        self._warn("drop", "requestlog_records_dropped", reason=reason, dropped_total=self.dropped,
                   buffered=len(self.buffer))

    def _warn(self, what: str, event: str, **fields: Any) -> None:
        """At most one warning per WARN_EVERY_S per kind of trouble: an outage must not flood the log."""
        now = time.monotonic()
        if now - self._warned_at[what] >= WARN_EVERY_S:
            self._warned_at[what] = now
            self.logger.warning(event, **fields)
