"""Runs lines: off each batch's work-queue consumer, into the room workers leave free, through a gateway, into results.

- `Capacity` says how many lines may run per model: what live workers' heartbeats leave free of
  interactive traffic (a worker with someone queued gets no new line), so batch work fills spare capacity.
- `Runner` keeps one pull loop per running batch, within per-batch, per-tenant and overall limits.
- `ResultWriter` commits results in groups and acks their work items only after the commit: a crash
  anywhere re-runs the line, and the results table's key keeps its first answer.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from prometheus_client import Counter, Gauge

from contracts import subjects
from contracts.batch import ENDPOINT_KINDS, ExecLine, ExecResult, WorkItem, line_item_id, request_id, work_decoder
from contracts.control import WorkerLoad
from contracts.llm import MAX_ATTEMPT
from contracts.subjects import BATCH_STREAM
from services.batch.execute import ExecClient, Lost
from services.batch.store import Active, Result, Store
from services.runtime import bus
from services.runtime import logging as log
from services.runtime.bus import pull
from services.runtime.routing import Presence

LINES = Counter("inferbus_batch_lines_total", "Batch lines answered", ["outcome"])
RETRIES = Counter("inferbus_batch_retries_total", "Batch line runs retried", ["reason"])
RUNNING = Gauge("inferbus_batch_lines_running", "Batch lines running or waiting for capacity")
# Errors worth another run (the line is fine; the platform was not, for now).
RETRY_CODES = frozenset({"rate_limited", "overloaded", "deferred", "no_worker", "worker_timeout", "stream_broken",
                         "engine_error", "internal_error", "upstream_error", "upstream_timeout", "circuit_open",
                         "limiter_unavailable", "deadline_exceeded"})
# Failures the gateway saw, not the worker: the worker may still have finished (and counted) the attempt, so the
# next run keeps its attempt number and the ledger keeps one row for it, whichever run it heard first.
UNKNOWN_FATE = frozenset({"stream_broken", "worker_timeout", "deadline_exceeded"})
_ENC = msgspec.json.encode


def ok_record(batch_id: str, item: WorkItem, rid: str, body: bytes) -> bytes:
    return b"".join((b'{"id":', _ENC(line_item_id(batch_id, item.line)), b',"custom_id":', _ENC(item.custom_id),
                     b',"response":{"status_code":200,"request_id":', _ENC(rid), b',"body":', body,
                     b'},"error":null}'))


def error_record(batch_id: str, item: WorkItem, rid: str, status: int, body: bytes) -> bytes:
    return b"".join((b'{"id":', _ENC(line_item_id(batch_id, item.line)), b',"custom_id":', _ENC(item.custom_id),
                     b',"response":{"status_code":', str(status).encode(), b',"request_id":', _ENC(rid),
                     b',"body":', body, b'},"error":null}'))


def batch_error_record(batch_id: str, line: int, custom_id: str, code: str, message: str) -> bytes:
    """A line the batch never ran (cancelled, expired): OpenAI's `error` instead of a response."""
    return _ENC({"id": line_item_id(batch_id, line), "custom_id": custom_id, "response": None,
                 "error": {"code": code, "message": message}})


class Capacity:
    """Lines each model may take now: its live workers' capacity less what others use (from heartbeats); a model
    is a (kind, name) pair (an LLM, an embedding model, a vision model)."""

    def __init__(self) -> None:
        self.presence = Presence()
        self.ours: collections.Counter[tuple[str, str]] = collections.Counter()
        self._ours_then: dict[tuple[str, str], int] = {}  # our lines of the model when its last heartbeat came
        self.changed = asyncio.Event()

    def heard(self, load: WorkerLoad) -> None:
        self.presence.heard(load)
        model = (load.kind, load.model)
        self._ours_then[model] = self.ours[model]
        self._wake()

    def room(self, kind: str, model: str) -> int:
        workers = [w for w in self.presence.live(kind, model) if w.ready]
        if not workers:
            return 0
        busy = sum(w.in_flight + w.queued for w in workers)  # ours among them, as of the heartbeats
        others = max(0, busy - self._ours_then.get((kind, model), 0))
        # What batch lines may use of each worker (it keeps the rest for interactive requests).
        usable = sum(w.capacity if w.batch_capacity is None else w.batch_capacity for w in workers)
        return usable - others - self.ours[kind, model]

    async def take(self, kind: str, model: str, keepalive: Callable[[], Awaitable[None]]) -> None:
        """Wait for room for one line of `model` (calling `keepalive`, which paces itself, meanwhile)."""
        while self.room(kind, model) <= 0:
            changed = self.changed
            try:
                async with asyncio.timeout(2.0):
                    await changed.wait()
            except TimeoutError:
                pass
            await keepalive()
        self.ours[kind, model] += 1

    def give(self, kind: str, model: str) -> None:
        self.ours[kind, model] -= 1
        self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class ResultWriter:
    """Results in group commits; each one's work item acked (or a retry nak'd) only after its commit."""

    def __init__(self, store: Store, on_counts: Callable[[dict[str, tuple[int, int]]], None],
                 *, max_group: int = 500, window_s: float = 0.02) -> None:
        self.store = store
        self.on_counts = on_counts
        self.max_group = max_group
        self.window_s = window_s
        self._pending: list[tuple[Result, bus.Msg | None]] = []
        self._busy = False  # a group is being committed
        self._idle = asyncio.Event()  # set whenever everything handed in is committed
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.logger = log.get("batch-writer")

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="batch-results")

    def add(self, result: Result, msg: bus.Msg | None) -> None:
        self._pending.append((result, msg))
        self._wake.set()

    async def write_now(self, results: list[Result]) -> dict[str, tuple[int, int]]:
        """Write at once (finalization's own results), outside the group commit."""
        counts = await self.store.write(results)
        self.on_counts(counts)
        return counts

    async def _loop(self) -> None:
        backoff = 0.1
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.window_s)  # gather what else finishes meanwhile
            while self._pending:
                group, self._pending = self._pending[: self.max_group], self._pending[self.max_group:]
                self._busy = True
                try:
                    counts = await self.store.write([r for r, _ in group])
                except Exception as exc:  # PostgreSQL away: keep them (their items are redelivered if we die)
                    self.logger.warning("results_write_failed", error=repr(exc), results=len(group))
                    self._pending[:0] = group
                    self._busy = False
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                backoff = 0.1
                for result, msg in group:
                    LINES.labels("ok" if result.ok else "failed").inc()
                    if msg is not None:
                        await _settle(msg.ack())
                self._busy = False
                self.on_counts(counts)
            self._idle.set()

    async def flush(self, limit_s: float) -> None:
        """Wait (up to `limit_s`) until every result handed in so far is committed."""
        if not (self._pending or self._busy):
            return
        self._idle.clear()
        try:
            async with asyncio.timeout(limit_s):
                await self._idle.wait()
        except TimeoutError:
            self.logger.warning("results_unwritten", results=len(self._pending))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def _settle(ack: Awaitable[Any]) -> None:
    try:
        await ack
    except Exception:  # the bus is away: the item comes back after ack_wait and its result is already kept
        pass


@dataclass
class Run:
    """One batch being executed by this replica."""

    batch: Active
    task: asyncio.Task[None] | None = None
    lines: dict[str, asyncio.Task[None]] = field(default_factory=dict)  # request id -> line task
    stopped: bool = False
    cancel_workers: bool = True  # stopped for good (cancel, expiry): the workers stop its lines too


class Runner:
    def __init__(self, nc: bus.Connection, store: Store, execs: ExecClient, capacity: Capacity,
                 writer: ResultWriter, cfg: Any) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.store = store
        self.execs = execs
        self.capacity = capacity
        self.writer = writer
        self.cfg = cfg
        self.runs: dict[str, Run] = {}
        self.inflight = 0
        self.by_tenant: collections.Counter[str] = collections.Counter()
        self._freed = asyncio.Event()
        self.draining = False
        self._lost_lines: dict[str, tuple[int, float]] = {}  # batch id -> (lines lost since logged, logged at)
        self.logger = log.get("batch-runner")

    def ensure(self, batch: Active) -> None:
        if self.draining:
            return
        run = self.runs.get(batch.id)
        if run is None or (run.task is not None and run.task.done()):
            run = Run(batch)
            self.runs[batch.id] = run
            run.task = asyncio.create_task(self._pull(run), name=f"batch-{batch.id}")
        else:
            run.batch = batch

    async def stop(self, batch_id: str, *, cancel_workers: bool = True) -> None:
        """Stop a batch's lines here: no new ones; running ones cancelled (on their workers too, unless this
        process is only shutting down: then they finish there, and their re-run's usage is counted once)."""
        run = self.runs.pop(batch_id, None)
        if run is None:
            return
        run.stopped = True
        run.cancel_workers = cancel_workers
        tasks = [t for t in (run.task, *run.lines.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def drain(self, grace_s: float) -> None:
        """Take no new lines; give running ones `grace_s` to finish and their results to be written."""
        self.draining = True
        lines = [t for r in self.runs.values() for t in r.lines.values()]
        if lines:
            await asyncio.wait(lines, timeout=grace_s)
        await self.writer.flush(grace_s)

    async def close(self) -> None:
        for batch_id in list(self.runs):
            await self.stop(batch_id, cancel_workers=False)

    def running(self) -> int:
        return sum(len(r.lines) for r in self.runs.values())

    def _lost(self, batch_id: str, error: str, delay: float) -> None:
        """Lines whose run was lost, logged once per batch every 5 s (a gateway outage loses many at once)."""
        now = time.monotonic()
        count, since = self._lost_lines.get(batch_id, (0, 0.0))
        if now - since >= 5.0:
            self.logger.info("batch_lines_lost", batch_id=batch_id, error=error, lines=count + 1, retry_in=delay)
            self._lost_lines[batch_id] = (0, now)
        else:
            self._lost_lines[batch_id] = (count + 1, since)

    def _room(self, run: Run) -> int:
        cfg = self.cfg
        tenant = cfg.tenant_concurrency - self.by_tenant[run.batch.tenant_id]
        return int(min(cfg.batch_concurrency - len(run.lines), tenant, cfg.max_concurrency - self.inflight))

    async def _pull(self, run: Run) -> None:
        batch = run.batch
        while not run.stopped:
            try:
                sub = await self.js.pull_subscribe_bind(durable=batch.id, stream=BATCH_STREAM)
                pull.install(sub)  # a fetch that costs little per message, with one kind of timeout
                break
            except Exception as exc:  # the bus is away, or the consumer is not made yet
                self.logger.warning("batch_consumer_unavailable", batch_id=batch.id, error=repr(exc))
                await asyncio.sleep(1.0)
        try:
            while not run.stopped and not self.draining:
                room = self._room(run)
                if room <= 0:
                    freed = self._freed
                    try:
                        async with asyncio.timeout(1.0):
                            await freed.wait()
                    except TimeoutError:
                        pass
                    continue
                try:
                    # What is there now, at once; else wait up to 1 s for lines (a retry, a redelivery).
                    msgs = await pull.ready(sub, room) or await sub.fetch(room, timeout=1.0)
                except (bus.errors.TimeoutError, TimeoutError):  # nothing to run now
                    continue
                except Exception as exc:  # disconnected, consumer gone: try again shortly
                    self.logger.warning("batch_fetch_failed", batch_id=batch.id, error=repr(exc))
                    await asyncio.sleep(1.0)
                    continue
                await self._start_lines(run, msgs)
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # closed with the connection
                pass

    async def _start_lines(self, run: Run, msgs: list[bus.Msg]) -> None:
        items: list[tuple[bus.Msg, WorkItem]] = []
        for msg in msgs:
            try:
                items.append((msg, work_decoder.decode(msg.data)))
            except msgspec.DecodeError:
                self.logger.error("bad_work_item", subject=msg.subject)
                await _settle(msg.term())
        if not items:
            return
        lines = [item.line for _, item in items]
        done = await self.store.done_lines(run.batch.id, lines)  # answered by an earlier run that died before acking
        redelivered = [item.line for msg, item in items if msg.metadata.num_delivered > 1]
        retries = await self.store.retries(run.batch.id, redelivered) if redelivered else {}
        for msg, item in items:
            if item.line in done:
                await _settle(msg.ack())
                continue
            tries, attempt = retries.get(item.line, (0, 0))
            rid = request_id(run.batch.endpoint, run.batch.id, item.line)
            if rid in run.lines:  # redelivered while it still runs here: it comes back, and is found done, later
                continue
            self.inflight += 1
            self.by_tenant[run.batch.tenant_id] += 1
            RUNNING.inc()
            run.lines[rid] = asyncio.create_task(self._line(run, msg, item, rid, tries, attempt))

    async def _line(self, run: Run, msg: bus.Msg, item: WorkItem, rid: str, tries: int, attempt: int) -> None:
        batch = run.batch
        last_progress = time.monotonic()

        async def keepalive() -> None:
            nonlocal last_progress
            if time.monotonic() - last_progress > self.cfg.ack_wait_s / 3:
                last_progress = time.monotonic()
                await _settle(msg.in_progress())

        kind = ENDPOINT_KINDS[batch.endpoint]
        try:
            await self.capacity.take(kind, item.model, keepalive)
            try:
                timeout = max(1.0, min(self.cfg.line_timeout_s, batch.expires_at - time.time()))
                line = ExecLine(request_id=rid, batch_id=batch.id, key_id=batch.key_id, endpoint=batch.endpoint,
                                body=item.body, attempt=min(attempt, MAX_ATTEMPT), timeout_s=timeout)
                result = await self.execs.run(line, keepalive)
            finally:
                self.capacity.give(kind, item.model)
            await self._answer(run, msg, item, rid, result, tries, attempt)
        except Lost as exc:
            RETRIES.labels("lost").inc()
            delay = min(30.0, 0.5 * 2 ** min(msg.metadata.num_delivered, 6))
            self._lost(batch.id, str(exc), delay)
            await _settle(msg.nak(delay=delay))
        except asyncio.CancelledError:
            if run.cancel_workers and not self.nc.is_closed:  # cancelled or expired: free the worker's slot now
                await _settle(self.nc.publish(subjects.cancel(rid), b""))
            raise
        except Exception:
            self.logger.exception("batch_line_failed", batch_id=batch.id, line=item.line)
            await _settle(msg.nak(delay=5.0))
        finally:
            run.lines.pop(rid, None)
            self.inflight -= 1
            self.by_tenant[batch.tenant_id] -= 1
            RUNNING.dec()
            self._freed.set()
            self._freed = asyncio.Event()

    async def _answer(self, run: Run, msg: bus.Msg, item: WorkItem, rid: str, result: ExecResult, tries: int,
                      attempt: int) -> None:
        batch_id = run.batch.id
        if result.status_code == 200:
            record = ok_record(batch_id, item, rid, result.body)
            self.writer.add(Result(batch_id, item.line, True, record, result.prompt_tokens, result.completion_tokens),
                            msg)
            return
        # model_not_found on a line that passed validation: a gateway that has not heard its workers yet, or a
        # model being redeployed; worth a few tries, not forever.
        counted = result.code == "model_not_found"
        retryable = result.retryable or result.code in RETRY_CODES or counted
        if (retryable and not counted and result.worker_attempts == 0) or (
                result.code == "invalid_request" and b"already running" in result.body):
            # Nothing took it (no worker now, a rate limit, an earlier run of it still going): it waits, and
            # this is not one of its tries.
            RETRIES.labels(result.code or "error").inc()
            delay = result.retry_after or min(30.0, 0.5 * 2 ** min(msg.metadata.num_delivered, 6))
            await _settle(msg.nak(delay=delay))
            return
        if retryable and tries + 1 < self.cfg.max_tries:
            # A worker took it and reported a failure, leaving a usage row for its attempt: the next run counts on
            # from there (a dispatch sends at most twice per route).
            RETRIES.labels(result.code or "error").inc()
            bump = 0 if result.code in UNKNOWN_FATE else 2 * result.worker_attempts
            await self.store.retried(batch_id, item.line, tries + 1, attempt + bump)
            await _settle(msg.nak(delay=result.retry_after or min(60.0, 2.0 ** (tries + 1))))
            return
        record = error_record(batch_id, item, rid, result.status_code, result.body)
        self.writer.add(Result(batch_id, item.line, False, record, result.prompt_tokens, result.completion_tokens), msg)
