"""The USAGE stream's durable pull consumer: batches from JetStream into the ledger, acked only after the commit.

FastStream's batch loop fetches (up to `batch_size` messages or `batch_timeout_s`) and hands each batch
to a writer; while writers commit, the loop fetches the next. A batch PostgreSQL did not commit because
it is unavailable is not acked: the writer keeps it, marks it in progress (so JetStream does not hand it
to another replica) and tries again after a back-off, which also pauses fetching; waiting out an outage
therefore uses up no deliveries. A process that dies mid-batch leaves it unacked and JetStream redelivers
it after `ack_wait`; the ledger's (request id, attempt) key makes the second write a no-op.

One bad message never holds up the others: an undecodable message or an event outside the bounds
(contracts.usage) is moved to the dead-letter stream at decode (of a worker's message of several events,
only that event is copied there, the rest are written); a batch the database refuses (a data error, not
an outage) is split in halves until the event it refuses is alone, and that one is moved;
a message on its last delivery (`max_deliver`) that still fails is moved; and one JetStream stopped
delivering (every delivery crashed the consumer) is copied there from its advisory.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import msgspec
from faststream.message import StreamMessage
from faststream.middlewares import AckPolicy
from faststream.nats import JStream, NatsBroker, PullSub
from prometheus_client import Counter, Gauge, Histogram

from contracts import usage
from contracts.usage import UsageEvent, event_decoder
from services.metering import ledger
from services.metering.deadletters import DeadLetters, request_id_of
from services.runtime import logging as log
from services.runtime.bus import AckPolicy as JsAckPolicy
from services.runtime.bus import ConsumerConfig, DeliverPolicy, JetStreamContext, Msg, pull

EVENTS = Counter("inferbus_metering_events_total", "Usage events written to the ledger", ["kind", "shadow"])
DUPLICATES = Counter("inferbus_metering_duplicates_total", "Usage events already in the ledger (redeliveries)")
TOKENS = Counter("inferbus_metering_tokens_total", "Billed tokens written to the ledger", ["kind", "model", "type"])
COST = Counter("inferbus_metering_cost_usd_total", "Billed cost written to the ledger (USD)", ["kind", "model"])
BATCHES = Counter("inferbus_metering_batches_total", "Batches committed to PostgreSQL")
PG_ERRORS = Counter("inferbus_metering_pg_errors_total", "Batches PostgreSQL failed to commit (not acked)")
POISON = Counter("inferbus_metering_poison_total",
                 "Messages on the USAGE stream, or events of a worker's message, that are not valid usage events")
BATCH_SECONDS = Histogram(
    "inferbus_metering_batch_seconds",
    "Time to commit one batch",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BACKOFF = Gauge("inferbus_metering_backoff_seconds", "Current back-off after a failed commit (0 when healthy)")
# The database refuses these for what is in the batch, not because it is unavailable: retrying the
# same batch would fail the same way for ever, so the batch is split to find the event it refuses.
REFUSED = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, asyncpg.ProgramLimitExceededError)


async def ensure_consumer(
    js: JetStreamContext, durable: str, ack_wait_s: float, max_ack_pending: int, max_deliver: int
) -> None:
    """Create the durable consumer, or bring an existing one to these settings (all are editable)."""
    await js.add_consumer(usage.STREAM, consumer_config(durable, ack_wait_s, max_ack_pending, max_deliver))


def consumer_config(durable: str, ack_wait_s: float, max_ack_pending: int, max_deliver: int) -> ConsumerConfig:
    return ConsumerConfig(
        name=durable,
        durable_name=durable,
        description="InferBus metering: usage events into the PostgreSQL ledger",
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=JsAckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        max_ack_pending=max_ack_pending,
        max_deliver=max_deliver,
        filter_subject=usage.SUBJECTS,
    )


async def raw_messages(message: StreamMessage[list[Msg]]) -> list[Msg]:
    """FastStream decoder: hand the batch over as the NATS messages themselves (decoded here, in one pass)."""
    return message.raw_message


class Consumer:
    def __init__(
        self,
        pool: asyncpg.Pool,
        dead_letters: DeadLetters,
        *,
        durable: str,
        batch_size: int,
        batch_timeout_s: float,
        ack_wait_s: float,
        max_ack_pending: int,
        max_deliver: int,
        write_timeout_s: float,
        max_backoff_s: float,
        writers: int = 2,
    ) -> None:
        self.pool = pool
        self.dead_letters = dead_letters
        self.max_deliver = max_deliver
        self.durable = durable
        self.batch_size = batch_size
        self.batch_timeout_s = batch_timeout_s
        self.ack_wait_s = ack_wait_s
        self.max_ack_pending = max_ack_pending
        self.write_timeout_s = write_timeout_s
        self.max_backoff_s = max_backoff_s
        self.backoff = 0.0
        self.events_written = 0
        self.duplicates_skipped = 0
        self.batches = 0
        self.last_batch_size = 0
        self.last_batch_ms = 0.0
        self.pg_errors = 0
        self.poison = 0
        # Fetching overlaps committing, and `writers` batches commit at once (one connection each), so
        # one's commit wait and encoding overlap another's execution. They touch rollup rows in key
        # order, and events in request-id order, so they may wait for each other but never deadlock.
        self.writers = writers
        self._batches: asyncio.Queue[list[Msg]] = asyncio.Queue(maxsize=writers)
        self._tasks: list[asyncio.Task[None]] = []
        self.logger = log.get("metering")

    def subscribe(self, broker: NatsBroker) -> Any:
        """Register the batch handler; returns the FastStream subscriber (stop it before `stop`)."""
        subscriber = broker.subscriber(
            usage.SUBJECTS,
            stream=JStream(name=usage.STREAM, declare=False),  # created by services.runtime.usage
            durable=self.durable,
            config=consumer_config(self.durable, self.ack_wait_s, self.max_ack_pending, self.max_deliver),
            pull_sub=PullSub(batch_size=self.batch_size, timeout=self.batch_timeout_s, batch=True),
            ack_policy=AckPolicy.MANUAL,
            decoder=raw_messages,
        )
        subscriber(self.on_batch)
        start = subscriber.start

        async def start_with_fast_fetch() -> None:
            await start()  # returns before the consume task first runs: no fetch has been made yet
            subscription = getattr(subscriber, "subscription", None)
            if subscription is not None:
                pull.install(subscription)

        setattr(subscriber, "start", start_with_fast_fetch)  # noqa: B010
        return subscriber

    def stats(self) -> dict[str, Any]:
        return {
            "durable": self.durable,
            "events_written": self.events_written,
            "duplicates_skipped": self.duplicates_skipped,
            "batches": self.batches,
            "last_batch_size": self.last_batch_size,
            "last_batch_ms": round(self.last_batch_ms, 2),
            "pg_errors": self.pg_errors,
            "poison": self.poison,
            "dead_lettered": self.dead_letters.moved,
            "backoff_s": self.backoff,
        }

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._write_loop()) for _ in range(self.writers)]

    async def stop(self, grace_s: float) -> None:
        """Once fetching has stopped: commit and ack the batches in hand (the rest are redelivered)."""
        try:
            async with asyncio.timeout(grace_s):
                await self._batches.join()
        except TimeoutError:
            self.logger.warning("batches_left_unacked", batches=self._batches.qsize())
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def on_batch(self, msgs: list[Msg]) -> None:
        """FastStream's handler: hand the batch to a writer and go fetch the next while it commits."""
        await self._batches.put(msgs)  # waits while the writers are all busy and one batch waits: back-pressure

    async def _write_loop(self) -> None:
        while True:
            msgs = await self._batches.get()
            try:
                await self.write(msgs)
            except Exception as exc:  # a bug, not PostgreSQL: keep the loop; the batch is redelivered after ack_wait
                self.logger.exception("batch_failed", size=len(msgs))
                await self._last_chance(msgs, exc)
            finally:
                self._batches.task_done()

    async def write(self, msgs: list[Msg]) -> None:
        """Commit a fetch's valid events in transactions of at most `batch_size` events (whole messages each: a
        worker's message may carry many), acking each transaction's messages after it."""
        chunk: list[_Unit] = []
        size = 0
        for msg in msgs:
            unit = await self._decode(msg)
            if unit is None:
                continue
            if chunk and size + len(unit.events) > self.batch_size:
                await self._commit(chunk)
                chunk, size = [], 0
            chunk.append(unit)
            size += len(unit.events)
        if chunk:
            await self._commit(chunk)

    async def _decode(self, msg: Msg) -> _Unit | None:
        """The message's valid events; what is not one is moved to the dead letters (a whole message, or one event
        of a worker's batch). None when nothing is left to write (the message is settled, or left for redelivery)."""
        try:
            parts = usage.parts(msg.data)
        except msgspec.DecodeError as exc:
            await self._reject(msg, "undecodable", str(exc))
            return None
        if len(parts) == 1 and parts[0] is msg.data:  # one event, the message itself
            try:
                return _Unit(msg, [event_decoder.decode(msg.data)], [0], parts, batch=False)
            except msgspec.ValidationError as exc:  # a usage event, but outside the bounds
                await self._reject(msg, "invalid", str(exc), request_id_of(msg.data))
            except msgspec.DecodeError as exc:
                await self._reject(msg, "undecodable", str(exc))
            return None
        unit = _Unit(msg, [], [], parts, batch=True)
        for index, part in enumerate(parts):
            try:
                unit.events.append(event_decoder.decode(part))
                unit.indices.append(index)
                continue
            except msgspec.ValidationError as exc:
                reason, detail, rid = "invalid", str(exc), request_id_of(part)
            except msgspec.DecodeError as exc:
                reason, detail, rid = "undecodable", str(exc), None
            if not await self._reject_part(msg, index, len(parts), part, reason, detail, rid):
                unit.hold = True  # its good events are written; the message comes back for this one
        if not unit.events:  # every event moved aside (or left for the redelivery): nothing to write
            if not unit.hold:
                await self._ack([msg])
            return None
        return unit

    async def _commit(self, units: list[_Unit]) -> None:
        """Write and ack the units' events, waiting out a database outage; isolate what the database refuses."""
        events = units[0].events if len(units) == 1 else [e for unit in units for e in unit.events]
        refused = await self._write(events, [unit.msg for unit in units])
        if refused is not None:
            await self._isolate(units, refused)
            return
        await self._ack([unit.msg for unit in units if not unit.hold])

    async def _write(self, events: list[UsageEvent], msgs: list[Msg]) -> Exception | None:
        """Write `events` in one transaction, waiting out a database outage (`msgs` kept in progress meanwhile);
        None once committed, or the database's refusal of them (what is in them, not an outage)."""
        while True:
            started = time.perf_counter()
            try:
                written = await ledger.write(self.pool, events, limit_s=self.write_timeout_s)
            except asyncio.CancelledError:
                raise
            except REFUSED as exc:
                refusal: Exception = exc  # asyncpg's exceptions are untyped
                return refusal
            except Exception as exc:  # PostgreSQL down, restarting, timing out: keep the batch, try again
                await self._wait_for_database(msgs, exc)
                continue
            self._recovered()
            self._count(written, time.perf_counter() - started)
            return None

    def _recovered(self) -> None:
        if self.backoff:
            self.logger.info("ledger_write_recovered", pg_errors=self.pg_errors)
            self.backoff = 0.0
            BACKOFF.set(0)

    async def _isolate(self, units: list[_Unit], exc: Exception) -> None:
        if len(units) > 1:
            half = len(units) // 2
            await self._commit(units[:half])
            await self._commit(units[half:])
            return
        unit = units[0]
        if not unit.batch:
            await self._reject(unit.msg, "refused", f"{type(exc).__name__}: {exc}", unit.events[0].request_id)
            return
        # A worker's batch: write its events in halves down to the one the database refuses, which alone is moved;
        # the message is acked once every event of it is written or moved.
        if await self._settle_parts(unit, list(zip(unit.indices, unit.events, strict=True)), exc) and not unit.hold:
            await self._ack([unit.msg])

    async def _settle_parts(self, unit: _Unit, parts: list[tuple[int, UsageEvent]], exc: Exception) -> bool:
        """Write `parts` of a refused batch message, moving the events the database refuses; False when one could
        not be moved (the message is then left unacked and comes back)."""
        if len(parts) == 1:
            index, event = parts[0]
            return await self._reject_part(unit.msg, index, len(unit.parts), unit.parts[index], "refused",
                                           f"{type(exc).__name__}: {exc}", event.request_id)
        half = len(parts) // 2
        settled = True
        for piece in (parts[:half], parts[half:]):
            refused = await self._write([e for _, e in piece], [unit.msg])
            if refused is not None:
                settled = await self._settle_parts(unit, piece, refused) and settled
        return settled

    def _count(self, written: ledger.Written, elapsed: float) -> None:
        self.batches += 1
        self.last_batch_size = written.received
        self.last_batch_ms = elapsed * 1000
        self.events_written += written.events
        self.duplicates_skipped += written.duplicates
        BATCHES.inc()
        BATCH_SECONDS.observe(elapsed)
        if written.duplicates:
            DUPLICATES.inc(written.duplicates)
        for g in written.inserted:
            EVENTS.labels(g.kind, str(g.shadow).lower()).inc(g.events)
            if not g.shadow:
                TOKENS.labels(g.kind, g.model, "prompt").inc(g.prompt_tokens)
                TOKENS.labels(g.kind, g.model, "completion").inc(g.completion_tokens)
                COST.labels(g.kind, g.model).inc(g.cost_usd)

    async def _wait_for_database(self, msgs: list[Msg], exc: Exception) -> None:
        self.pg_errors += 1
        PG_ERRORS.inc()
        self.backoff = min(max(self.backoff * 2, 0.1), self.max_backoff_s)
        BACKOFF.set(self.backoff)
        self.logger.warning(
            "ledger_write_failed", error=repr(exc), events=len(msgs), retry_in_s=self.backoff, pg_errors=self.pg_errors
        )
        try:
            for msg in msgs:
                await msg.in_progress()  # still ours: JetStream restarts its ack_wait, counts no delivery
        except Exception as progress_exc:  # NATS gone too: JetStream redelivers after ack_wait anyway
            self.logger.warning("in_progress_failed", error=repr(progress_exc))
        await asyncio.sleep(self.backoff)

    async def _last_chance(self, msgs: list[Msg], exc: Exception) -> None:
        """Messages on their last delivery that failed for an unforeseen reason go to the dead letters."""
        for msg in msgs:
            try:
                last = msg.metadata.num_delivered >= self.max_deliver > 0
            except Exception:  # not a JetStream delivery: nothing to decide
                continue
            if last:
                await self._reject(msg, "max_deliver", f"{type(exc).__name__}: {exc}", request_id_of(msg.data))

    async def _ack(self, msgs: list[Msg]) -> None:
        try:
            for msg in msgs:
                await msg.ack()
        except Exception as exc:  # committed but not acked: redelivered later, then skipped as duplicates
            self.logger.warning("ack_failed", error=repr(exc), events=len(msgs))

    async def _reject(self, msg: Msg, reason: str, detail: str, request_id: str | None = None) -> None:
        """Move one message to the dead letters; left unacked (so redelivered) when that fails."""
        self.poison += 1
        POISON.inc()
        await self.dead_letters.move(msg, reason, detail, request_id)

    async def _reject_part(
        self, msg: Msg, index: int, size: int, data: bytes, reason: str, detail: str, request_id: str | None
    ) -> bool:
        """Copy one event of a batch message to the dead letters (the message itself is acked with the rest)."""
        self.poison += 1
        POISON.inc()
        return await self.dead_letters.copy_part(msg, index, size, data, reason, detail, request_id)


class _Unit:
    """One USAGE message and the valid events in it (their places among the message's encoded `parts`: `indices`)."""

    __slots__ = ("batch", "events", "hold", "indices", "msg", "parts")

    def __init__(
        self, msg: Msg, events: list[UsageEvent], indices: list[int], parts: list[bytes], *, batch: bool
    ) -> None:
        self.msg = msg
        self.events = events
        self.indices = indices
        self.parts = parts
        self.batch = batch  # a worker's batch (a msgpack array), not one event
        self.hold = False  # a bad event of it could not be moved: not acked, so it comes back (its good events
        # are written now, and again as duplicates the ledger's key drops)
