"""The worker side of the usage ledger: publish every usage event to JetStream until it is acknowledged.

Publishing never sits on the reply path: events go to an in-memory queue and a background task
publishes them with `Nats-Msg-Id` = request id, retrying with backoff while JetStream is unreachable.
On shutdown the queue is drained (bounded by the drain grace) before the connection closes.
"""

from __future__ import annotations

import asyncio
from collections import deque

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from prometheus_client import Counter, Gauge

from contracts import usage
from contracts.usage import UsageEvent, event_encoder
from services.runtime import logging as log

PUBLISHED = Counter("inferbus_usage_published_total", "Usage events acknowledged by JetStream", ["kind"])
RETRIES = Counter("inferbus_usage_publish_retries_total", "Usage publishes that failed and were retried")
PENDING = Gauge("inferbus_usage_pending", "Usage events waiting for a JetStream acknowledgement")


async def ensure_stream(js: JetStreamContext) -> None:
    """Create the USAGE stream if it does not exist (idempotent; several services may race to it)."""
    config = StreamConfig(
        name=usage.STREAM,
        subjects=[usage.SUBJECTS],
        duplicate_window=usage.DUPLICATE_WINDOW_S,
        max_age=usage.MAX_AGE_S,
        description="InferBus usage events (dedup on Nats-Msg-Id = request id)",
    )
    try:
        await js.stream_info(usage.STREAM)
    except nats.js.errors.NotFoundError:
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError:  # created meanwhile by another service
            await js.stream_info(usage.STREAM)


class UsagePublisher:
    def __init__(self, js: JetStreamContext, *, window: int = 64, max_backoff_s: float = 2.0) -> None:
        self.js = js
        self.window = window  # publishes in flight at once
        self.max_backoff_s = max_backoff_s
        self.pending: deque[UsageEvent] = deque()
        self.published = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self.logger = log.get("usage")

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def publish(self, event: UsageEvent) -> None:
        self.pending.append(event)
        PENDING.set(len(self.pending))
        self._idle.clear()
        self._wake.set()

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            if not self.pending:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = [self.pending.popleft() for _ in range(min(len(self.pending), self.window))]
            results = await asyncio.gather(*(self._send(e) for e in batch), return_exceptions=True)
            failed = [e for e, r in zip(batch, results, strict=True) if isinstance(r, BaseException)]
            self.published += len(batch) - len(failed)
            if failed:  # JetStream or NATS unreachable: keep them (in front), retry after a pause
                RETRIES.inc(len(failed))
                self.pending.extendleft(reversed(failed))
                self.logger.warning(
                    "usage_publish_retry",
                    failed=len(failed),
                    pending=len(self.pending),
                    error=repr(next(r for r in results if isinstance(r, BaseException))),
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
            else:
                backoff = 0.05
            PENDING.set(len(self.pending))

    async def _send(self, event: UsageEvent) -> None:
        await self.js.publish(
            usage.subject(event.kind, event.model),
            event_encoder.encode(event),
            timeout=2.0,
            headers={"Nats-Msg-Id": event.request_id},
        )
        PUBLISHED.labels(event.kind).inc()

    async def drain(self, grace_s: float) -> None:
        """Wait until every queued event is acknowledged (or `grace_s` passes: then log what is left)."""
        try:
            async with asyncio.timeout(grace_s):
                await self._idle.wait()
        except TimeoutError:
            self.logger.error(
                "usage_events_unpublished",
                count=len(self.pending),
                request_ids=[e.request_id for e in self.pending][:50],
            )
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
