"""A batch from `validating` to its end: checked, queued, run, expired or cancelled, finalized into files.

Every step is safe to repeat, so whatever dies (this process, the gateway, nats-server, PostgreSQL),
the next replica to look picks the batch up where it stands: a `validating` batch is validated and
queued again (work items are deduplicated by `Nats-Msg-Id`), an `in_progress` one keeps running from
its durable consumer, a `finalizing` or `cancelling` one is finalized again (files are rewritten whole).
Finalization runs under a PostgreSQL advisory lock, so one replica does it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from prometheus_client import Counter

from contracts.batch import TERMINAL, WEBHOOK_TYPES, Caller, WebhookData, WebhookEvent, work_encoder
from contracts.subjects import BATCH_STREAM, BATCH_WORK_ALL, batch_work
from services.batch.objects import Objects
from services.batch.runner import ResultWriter, Runner, batch_error_record
from services.batch.store import Active, Result, Store
from services.batch.validate import custom_ids, validate, work_items
from services.runtime import bus
from services.runtime import logging as log
from services.runtime.bus import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StreamConfig
from services.runtime.routing import PRESENCE_TTL

BATCHES = Counter("inferbus_batch_batches_total", "Batches that reached a terminal status", ["status"])
ENQUEUE_WINDOW = 256  # work item publishes awaiting their acks at once
STEPS = 3  # validations and finalizations running at once in one replica
MESSAGES = {
    "cancelled": ("batch_cancelled", "This request was not executed because the batch was cancelled."),
    "expired": ("batch_expired", "This request could not be executed before the completion window expired."),
}


async def ensure_stream(js: bus.JetStreamContext, max_age_s: float) -> None:
    await bus.ensure_stream(js, StreamConfig(
        name=BATCH_STREAM, subjects=[BATCH_WORK_ALL], retention=RetentionPolicy.WORK_QUEUE,
        duplicate_window=120.0, max_age=max_age_s, description="InferBus batch lines to run"))


def output_file_id(batch_id: str, ok: bool) -> str:
    return f"file-{batch_id.removeprefix('batch_')}{'o' if ok else 'e'}"


class Lifecycle:
    def __init__(self, nc: bus.Connection, store: Store, objects: Objects, runner: Runner, writer: ResultWriter,
                 cfg: Any, known: Any) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.store = store
        self.objects = objects
        self.runner = runner
        self.writer = writer
        self.cfg = cfg
        self.known = known
        self._busy: dict[str, asyncio.Task[None]] = {}  # batch id -> its validation or finalization here
        # Models are known from live workers' heartbeats too: a fresh process has heard all of them after this.
        self.warm_at = time.monotonic() + PRESENCE_TTL + 0.5
        # Validations and finalizations at once: each holds a database connection (its lock) while it runs, and
        # the result writer must always find one free.
        self._steps = asyncio.Semaphore(STEPS)
        self._wake = asyncio.Event()
        self.logger = log.get("batch")

    def poke(self) -> None:
        """Look at the batches again now (a cancel, a batch created or done)."""
        self._wake.set()

    def counts(self, counts: dict[str, tuple[int, int]]) -> None:
        """After a result commit: a batch with every line answered is finalized."""
        if any(done >= total > 0 for done, total in counts.values()):
            self.poke()

    async def loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.sync()
            except Exception as exc:  # PostgreSQL or the bus away: try again on the next round
                self.logger.warning("batch_sync_failed", error=repr(exc))
            try:
                async with asyncio.timeout(self.cfg.sync_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

    async def sync(self) -> None:
        now = time.time()
        active = await self.store.active()
        for batch in active:
            if batch.id in self._busy:
                continue
            expired = batch.status in ("validating", "in_progress") and now >= batch.expires_at
            if expired:
                await self.store.expire(now)
            if batch.status == "validating" and not expired:
                self._spawn(batch.id, self._queue(batch))
            elif batch.status == "in_progress" and not expired and batch.done < batch.total:
                self.runner.ensure(batch)
            else:  # every line answered, finalizing, cancelling or expired: no more lines here
                await self.runner.stop(batch.id)
                self._spawn(batch.id, self._finalize(batch))
        live = {b.id for b in active}
        for batch_id in [b for b in self.runner.runs if b not in live]:
            await self.runner.stop(batch_id)  # finished or cancelled elsewhere

    def _spawn(self, batch_id: str, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._busy[batch_id] = task

        def done(t: asyncio.Task[None]) -> None:
            self._busy.pop(batch_id, None)
            if not t.cancelled() and t.exception() is not None:
                self.logger.error("batch_step_failed", batch_id=batch_id, error=repr(t.exception()))
            self.poke()

        task.add_done_callback(done)

    async def close(self) -> None:
        tasks = list(self._busy.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- validating -> in_progress (or failed) -------------------------------------------------

    async def _queue(self, batch: Active) -> None:
        await asyncio.sleep(max(0.0, self.warm_at - time.monotonic()))
        async with self._steps, self.store.pool.acquire() as conn:
            if not await self.store.lock(conn, batch.id):
                return  # another replica is on it
            try:
                row = await self.store.row(batch.id)
                if row is None or row["status"] != "validating":
                    return
                caller = Caller(key_id=row["key_id"], tenant_id=row["tenant_id"], scopes=list(row["scopes"]))
                report = await validate(self.objects.read(row["input_file_id"]), row["endpoint"], caller, self.known)
                if report.errors:
                    await self.store.fail_validation(batch.id, report.errors)
                    self.logger.info("batch_invalid", batch_id=batch.id, errors=report.error_count)
                    await self._announce(batch.id, "failed")
                    return
                await self.store.validated(batch.id, report.requests, sorted(report.models))
                await self.js.add_consumer(BATCH_STREAM, ConsumerConfig(
                    name=batch.id, durable_name=batch.id, filter_subject=batch_work(batch.id),
                    ack_policy=AckPolicy.EXPLICIT, ack_wait=self.cfg.ack_wait_s, max_deliver=-1,
                    max_ack_pending=10_000, deliver_policy=DeliverPolicy.ALL,
                    description=f"InferBus batch {batch.id}"))
                await self._enqueue(batch.id, row["input_file_id"], row["enqueued"], row["endpoint"])
                if await self.store.start(batch.id):
                    self.logger.info("batch_started", batch_id=batch.id, requests=report.requests)
            finally:
                await self.store.unlock(conn, batch.id)

    async def _enqueue(self, batch_id: str, file_id: str, done_before: int, endpoint: str) -> None:
        """Every line onto the work queue (from where a crashed run left off; the server drops duplicates)."""
        subject = batch_work(batch_id)
        pending: list[Any] = []
        last = done_before
        async for item in work_items(self.objects.read(file_id), batch_id, endpoint):
            if item.line <= done_before:
                continue
            pending.append(self.js.publish(subject, work_encoder.encode(item),
                                           headers={"Nats-Msg-Id": f"{batch_id}:{item.line}"}))
            last = item.line
            if len(pending) >= ENQUEUE_WINDOW:
                await asyncio.gather(*pending)
                pending.clear()
                await self.store.enqueued(batch_id, last)
        await asyncio.gather(*pending)
        await self.store.enqueued(batch_id, last)

    # ---- finalization -----------------------------------------------------------------------------

    async def _finalize(self, batch: Active) -> None:
        async with self._steps, self.store.pool.acquire() as conn:
            if not await self.store.lock(conn, batch.id):
                return
            try:
                await self._finalize_locked(conn, batch.id)
            finally:
                await self.store.unlock(conn, batch.id)

    async def _finalize_locked(self, conn: Any, batch_id: str) -> None:
        row = await self.store.row(batch_id)
        if row is None or row["status"] in TERMINAL:
            return
        if row["status"] == "cancelling":
            status = "cancelled"
        elif row["status"] != "validating" and row["completed"] + row["failed"] >= row["total"] > 0:
            status = "completed"
        elif row["expired_at"] is not None:
            status = "expired"
        else:
            return  # still running: nothing to do yet
        if status == "completed":
            await self.store.finalizing(batch_id)
        else:
            await self.runner.stop(batch_id)
            await asyncio.sleep(self.cfg.stop_grace_s)  # other replicas stop their lines meanwhile
            await self._fill(batch_id, row["input_file_id"], status)
        await self.runner.stop(batch_id)
        await self._drop_queue(batch_id)
        ok, failed = await self.store.count_results(batch_id)
        output = await self._write_file(batch_id, row["tenant_id"], True) if ok else None
        errors = await self._write_file(batch_id, row["tenant_id"], False) if failed else None
        await self.store.finish(conn, batch_id, status, output, errors,
                                await self._delivery(row["key_id"], row["webhook_url"], batch_id, status))
        BATCHES.labels(status).inc()
        self.logger.info("batch_finished", batch_id=batch_id, status=status, completed=ok, failed=failed)

    async def _fill(self, batch_id: str, file_id: str, status: str) -> None:
        """Answer every line without a result as never run (batch_cancelled / batch_expired)."""
        code, message = MESSAGES[status]
        page: list[tuple[int, str]] = []

        async def flush() -> None:
            done = await self.store.done_lines(batch_id, [line for line, _ in page])
            results = [Result(batch_id, line, False, batch_error_record(batch_id, line, cid, code, message), 0, 0)
                       for line, cid in page if line not in done]
            if results:
                await self.writer.write_now(results)
            page.clear()

        async for line, cid in custom_ids(self.objects.read(file_id)):
            page.append((line, cid))
            if len(page) >= 500:
                await flush()
        if page:
            await flush()
        await self.store.pool.execute(
            "UPDATE batches SET total = greatest(total, completed + failed) WHERE id = $1", batch_id)

    async def _drop_queue(self, batch_id: str) -> None:
        try:
            await self.js.delete_consumer(BATCH_STREAM, batch_id)
        except bus.js_errors.NotFoundError:
            pass
        await self.js.purge_stream(BATCH_STREAM, subject=batch_work(batch_id))

    async def _write_file(self, batch_id: str, tenant_id: str, ok: bool) -> str:
        file_id = output_file_id(batch_id, ok)

        async def jsonl() -> AsyncIterator[bytes]:
            buffer = bytearray()
            async for record in self.store.records(batch_id, ok):
                buffer += record + b"\n"
                if len(buffer) >= 1 << 18:
                    yield bytes(buffer)
                    buffer.clear()
            if buffer:
                yield bytes(buffer)

        size = await self.objects.put(file_id, jsonl())
        name = f"{batch_id}_{'output' if ok else 'error'}.jsonl"
        expires = time.time() + self.cfg.file_expiry_s if self.cfg.file_expiry_s else None
        await self.store.add_file(file_id, None, tenant_id, name, "batch_output", size, expires)
        return file_id

    # ---- webhooks ----------------------------------------------------------------------------

    async def _delivery(self, key_id: str, url: str | None, batch_id: str,
                        status: str) -> tuple[str, str, bytes] | None:
        hook = await self.store.webhook(key_id)
        target = url or (hook[0] if hook else None)
        if hook is None or not target:
            return None
        event = WebhookEvent(id="evt_" + secrets.token_hex(12), type=WEBHOOK_TYPES[status],
                             created_at=int(time.time()), data=WebhookData(batch_id))
        return target, event.type, msgspec.json.encode(event)

    async def _announce(self, batch_id: str, status: str) -> None:
        """A failed validation: its webhook (the other terminal statuses owe theirs in `finish`)."""
        row = await self.store.row(batch_id)
        if row is None:
            return
        delivery = await self._delivery(row["key_id"], row["webhook_url"], batch_id, status)
        if delivery is not None:
            async with self.store.pool.acquire() as conn:
                await self.store.add_delivery(conn, batch_id, row["tenant_id"], row["key_id"], *delivery)
        BATCHES.labels(status).inc()

