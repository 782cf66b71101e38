"""The inference worker skeleton every kind shares: subjects, admission, cancellation, heartbeats, drain, metering."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import msgspec
from prometheus_client import Counter, Gauge, Histogram

from contracts import headers as h
from contracts import subjects
from contracts.batch import BATCH_HEADER
from contracts.control import WorkerLoad, load_encoder
from contracts.errors import InferBusError
from contracts.llm import Accepted, ErrorChunk, Heartbeat
from contracts.usage import MAX_ID_CHARS, UsageEvent
from services.runtime import logging as log
from services.runtime import tracing
from services.runtime.bus import Connection, Msg, direct
from services.runtime.replies import ReplyStream, deadline_in, trace_id, wants_bundles
from services.runtime.sweep import sweep
from services.runtime.usage import UsagePublisher

T = TypeVar("T")
THROUGHPUT_WINDOW_S = 5.0
# The bus headers of the request the current task serves (`_serve` runs each request in a task of its own): what
# an engine or a worker kind reads of them (a batch line's mark, an ASR hand-off).
REQUEST_HEADERS: ContextVar[dict[str, str] | None] = ContextVar("inferbus_request_headers", default=None)


def request_header(name: str) -> str | None:
    """A header of the request the current task serves (None: not there, or no request)."""
    headers = REQUEST_HEADERS.get()
    return headers.get(name) if headers else None


def batch_line() -> bool:
    """The current task serves a batch line (header Inferbus-Batch): an engine that schedules its own work
    (llama.cpp's continuous batching) runs it below interactive requests."""
    return request_header(BATCH_HEADER) is not None


class Request(Protocol):
    @property
    def request_id(self) -> str: ...
    @property
    def attempt(self) -> int: ...


RequestT = TypeVar("RequestT", bound=Request)
TallyT = TypeVar("TallyT")


class WorkerSettings(msgspec.Struct, kw_only=True):
    """What the skeleton reads of a worker's settings; a kind's settings add its own."""

    model: str
    version: str
    worker_id: str
    max_queue: int = 64
    heartbeat_s: float = 0.5
    # Slots a batch line never takes (services/batch): interactive requests find them free. -1: a quarter of
    # the engine's capacity (at least 1), none for a one-slot engine (which takes a batch line only when idle)
    # nor for an engine that preempts batch work (llama.cpp: an interactive request takes a batch line's slot).
    batch_reserve: int = -1


class Engine(Protocol):
    """What the skeleton and the process around it use of a kind's engine."""

    @property
    def name(self) -> str: ...
    @property
    def capacity(self) -> int: ...
    async def load(self, progress: Callable[[str, float], None]) -> None: ...
    async def close(self) -> None: ...


@dataclass(frozen=True)
class Metrics:
    """A kind's own Prometheus metrics the skeleton keeps, all labelled with the model and the version (in that
    order; the LLM's duration is vLLM's, whose model label is `model_name`)."""

    requests: Counter  # ... and outcome
    in_flight: Gauge
    duration: Histogram


class Admission:
    """`async with worker._admitted(out)`: one of the engine's slots for the block (a class, not a generator:
    it is entered once per request)."""

    __slots__ = ("batch", "out", "worker")

    def __init__(self, worker: Worker[Any, Any], out: ReplyStream) -> None:
        self.worker = worker
        self.out = out
        # A batch line on an engine that preempts batch work takes no interactive slot: it already waited for
        # room (`_room_for_batch`), and an interactive request may take its place in the engine.
        self.batch = worker.preempting and batch_line()

    async def __aenter__(self) -> None:
        if self.batch:
            self.worker.batch_running += 1
        else:
            await self.worker._admit(self.out)

    async def __aexit__(self, *exc: object) -> None:
        if self.batch:
            self.worker.batch_running -= 1
        else:
            self.worker.slots.release()


class Worker(Generic[RequestT, TallyT]):
    """Serves one model version of one kind; a subclass decodes, checks and runs its requests."""

    kind: ClassVar[str]
    noun: ClassVar[str]  # "generation": what a request's work is called in errors and logs
    decoder: ClassVar[msgspec.msgpack.Decoder[Any]]
    encoder: ClassVar[msgspec.msgpack.Encoder]
    terminal: ClassVar[tuple[type, ...]]
    metrics: ClassVar[Metrics]

    engine: Engine
    s: WorkerSettings

    def __init__(self, nc: Connection, engine: Engine, settings: WorkerSettings, usage: UsagePublisher | None) -> None:
        self.nc = nc
        self.engine = engine
        self.s = settings
        self.usage = usage
        self.slots = asyncio.Semaphore(engine.capacity)
        self.preempting = bool(getattr(engine, "preempts_batch", False))  # see Admission
        self.batch_running = 0  # batch lines in a preempting engine (they hold no slot of `slots`)
        self.active: dict[str, asyncio.Task[None]] = {}
        # Cancels arrive on `infer.cancel.<token(request id)>`: the subject token each running id is heard by.
        self._cancel_tokens: dict[str, set[str]] = {}
        self._expired: set[asyncio.Task[None]] = set()  # cancelled by their deadline
        self.queued = 0
        self.served = 0
        self.cancelled = 0
        self.batch_deferred = 0  # batch lines turned away to keep room for interactive requests
        self.ready = False
        self.upstream: str | None = None  # a remote engine's last health check, reported with the load
        self._window: list[tuple[float, float]] = []  # (finished at, amount) for the throughput report
        self._tasks: set[asyncio.Task[None]] = set()
        self._subs: list[Any] = []
        self._labels = (settings.model, settings.version)
        # Children bound once: a label lookup per request per metric shows in profiles.
        self.metrics.in_flight.labels(*self._labels).set_function(lambda: len(self.active))  # read at scrape time
        self._duration = self.metrics.duration.labels(*self._labels)
        self._by_outcome: dict[str, Any] = {}
        self.logger = log.get(self.kind)

    # ---- what a kind provides -----------------------------------------------------------------

    def _new_tally(self) -> TallyT:
        raise NotImplementedError

    async def _handle(self, request: RequestT, out: ReplyStream, received: float, tally: TallyT) -> None:
        """Check, admit (`_admitted`) and run one request, ending its stream with the terminal chunk."""
        raise NotImplementedError

    def _usage_fields(self, request: RequestT, tally: TallyT) -> dict[str, Any]:
        raise NotImplementedError

    def _finished(self, request: RequestT, outcome: str, tally: TallyT) -> None:
        """Kind-specific accounting once a request has ended, however it ended."""

    def _operation(self, request: RequestT) -> str:
        """What the request asks for, as its span's `gen_ai.operation.name`."""
        return self.noun

    def _span_attributes(self, request: RequestT, tally: TallyT) -> dict[str, Any]:
        """What the request's span records once it has ended (tracing on only)."""
        return {}

    def _engine_stats(self) -> dict[str, Any]:
        return {}

    def _kind_stats(self) -> dict[str, Any]:
        return {}

    def ready_fields(self) -> dict[str, Any]:
        """Extra fields of the worker_ready log line."""
        return {}

    # ---- lifecycle ----------------------------------------------------------------------------

    @property
    def subject(self) -> str:
        return subjects.infer(self.kind, self.s.model, self.s.version)

    async def start(self) -> None:
        s = self.s
        queue = subjects.queue_group(self.kind, s.model, s.version)
        # Direct: a request goes from the read loop to its own task, a cancel to its task, with no queue between.
        self._subs = [
            await direct.subscribe(self.nc, self.subject, self._on_request, queue=queue),
            await direct.subscribe(
                self.nc, subjects.infer(self.kind, s.model, s.version, s.worker_id), self._on_request
            ),
            await direct.subscribe(self.nc, subjects.CANCEL_ALL, self._on_cancel),
        ]
        await self.nc.flush()
        self.ready = True
        self._spawn(self._heartbeat_loop())

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking work, let running requests finish for `grace` s, then cancel the rest."""
        self.ready = False
        await self._publish_load()  # out of routing now, not when heartbeats stop
        for sub in self._subs:
            await sub.unsubscribe()
        running = list(self.active.values())
        if running:
            _, pending = await asyncio.wait(running, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()

    def stats(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": self.s.model,
            "version": self.s.version,
            "worker_id": self.s.worker_id,
            "pid": os.getpid(),
            "engine": self.engine.name,
            **self._engine_stats(),
            "ready": self.ready,
            "in_flight": len(self.active),
            "queued": self.queued,
            "capacity": self.engine.capacity,
            "served": self.served,
            "cancelled": self.cancelled,
            "batch_deferred": self.batch_deferred,
            "usage_unacked": self.usage.unacked if self.usage is not None else 0,
            **self._kind_stats(),
        }

    def _record(self, amount: float) -> None:
        """Count `amount` (tokens, audio seconds, characters) as done now, for the throughput report.

        In tenth-of-a-second buckets: a busy worker records thousands of requests a second."""
        bucket = int(time.monotonic() * 10) / 10
        if self._window and self._window[-1][0] == bucket:
            self._window[-1] = (bucket, self._window[-1][1] + amount)
        else:
            self._window.append((bucket, amount))

    def _per_s(self) -> float:
        now = time.monotonic()
        self._window = [(t, n) for t, n in self._window if now - t < THROUGHPUT_WINDOW_S]
        return sum(n for _, n in self._window) / THROUGHPUT_WINDOW_S

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._publish_load()
            await asyncio.sleep(1.0)

    async def _publish_load(self) -> None:
        s = self.s
        load = WorkerLoad(
            worker_id=s.worker_id,
            kind=self.kind,
            model=s.model,
            version=s.version,
            engine=self.engine.name,
            in_flight=len(self.active) - self.queued,
            queued=self.queued,
            capacity=self.engine.capacity,
            tokens_per_s=self._per_s(),  # the kind's throughput: tokens, audio seconds or characters
            ready=self.ready and not self._usage_full(),
            upstream=self.upstream,
            batch_capacity=self.batch_capacity,
        )
        subject = subjects.heartbeat(self.kind, s.model, s.version, s.worker_id)
        await self.nc.publish(subject, load_encoder.encode(load))

    # ---- bus callbacks (one at a time per subscription: hand off at once) --------------------

    def _on_request(self, msg: Msg) -> None:
        if not msg.reply:
            self.logger.warning("request_without_reply", subject=msg.subject)
            return
        self._spawn(self._serve(msg))

    def _on_cancel(self, msg: Msg) -> None:
        # Ids that differ only in '.', '*', '>' or spaces share a token: a cancel stops all of them.
        for rid in self._cancel_tokens.get(msg.subject.split(".", 2)[2], ()):
            self.active[rid].cancel()

    # ---- one request --------------------------------------------------------------------------

    async def _serve(self, msg: Msg) -> None:
        assert msg.reply
        out = ReplyStream(self.nc, msg.reply, self.encoder, self.terminal, bundle=wants_bundles(msg))
        received = time.monotonic()
        started_at = time.time()
        try:
            request: RequestT = self.decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            await out.send(ErrorChunk, "invalid_request", f"undecodable request: {exc}")
            return
        rid = request.request_id
        if not rid.strip() or len(rid) > MAX_ID_CHARS:
            await out.send(ErrorChunk, "invalid_request", f"request_id must be 1-{MAX_ID_CHARS} characters, not blank")
            return
        if rid in self.active:
            await out.send(ErrorChunk, "invalid_request", f"request id {rid!r} is already running")
            return
        if msg.headers:
            REQUEST_HEADERS.set(msg.headers)  # this request's own task: its context ends with it
            if BATCH_HEADER in msg.headers and not self._room_for_batch():
                # Before Accepted: the caller sees that no worker took it (not a try of the line; no usage row).
                self.batch_deferred += 1
                await out.send(ErrorChunk, "deferred", "this worker keeps its free slots for interactive requests;"
                               " the batch line waits", 0.25)
                return
        task = asyncio.current_task()
        assert task is not None
        self.active[rid] = task
        cancel_token = subjects.token(rid)
        self._cancel_tokens.setdefault(cancel_token, set()).add(rid)
        outcome = "ok"
        tally = self._new_tally()
        left = deadline_in(msg)
        timeouts = sweep()
        span = None if tracing.tracer is None else self._span(request, msg)
        with log.bound(request_id=rid, trace_id=trace_id(msg)):
            try:
                await out.send(Accepted, self.s.worker_id, self.s.version)
                if left is not None:
                    if left <= 0:
                        raise TimeoutError
                    timeouts.at(task, timeouts.loop.time() + left, lambda: self._expire(task))
                try:
                    await self._handle(request, out, received, tally)
                finally:
                    timeouts.cancel(task)
            except asyncio.CancelledError:
                if task in self._expired:  # the deadline's cancel, not the caller's
                    self._expired.discard(task)
                    task.uncancel()
                    outcome = "deadline_exceeded"
                    await self._send_error(out, "deadline_exceeded", "the request deadline passed")
                else:
                    outcome = "cancelled"
                    self.cancelled += 1
                    await self._send_error(out, "cancelled", f"the {self.noun} was cancelled")
            except TimeoutError:
                outcome = "deadline_exceeded"
                await self._send_error(out, "deadline_exceeded", "the request deadline passed")
            except InferBusError as exc:
                outcome = exc.code
                await self._send_error(out, exc.code, exc.message, exc.retry_after, exc.param)
            except Exception as exc:
                outcome = "engine_error"
                self.logger.exception(f"{self.noun}_failed")
                await self._send_error(out, "engine_error", f"the engine failed: {type(exc).__name__}")
            finally:
                del self.active[rid]
                self._cancel_tokens[cancel_token].discard(rid)
                if not self._cancel_tokens[cancel_token]:
                    del self._cancel_tokens[cancel_token]
                self.served += 1
                counter = self._by_outcome.get(outcome)
                if counter is None:
                    counter = self._by_outcome[outcome] = self.metrics.requests.labels(*self._labels, outcome)
                counter.inc()
                self._duration.observe(time.monotonic() - received)
                if self.usage is not None:
                    self.usage.publish(self._usage_event(request, msg, outcome, tally, started_at))
                self._finished(request, outcome, tally)
                if span is not None:
                    span.end(outcome, self._span_attributes(request, tally))

    def _span(self, request: RequestT, msg: Msg) -> tracing.Active:
        """The request's span, a child of the caller's `traceparent`, current while the request runs."""
        s = self.s
        operation = self._operation(request)
        attributes: dict[str, Any] = {
            tracing.OPERATION: operation, tracing.REQUEST_MODEL: s.model, tracing.RESPONSE_MODEL: s.model,
            tracing.VERSION: s.version, tracing.PROVIDER: self.engine.name, "inferbus.worker.id": s.worker_id,
            "inferbus.request.id": request.request_id, "inferbus.attempt": request.attempt,
        }
        batch = msg.headers.get(BATCH_HEADER) if msg.headers else None
        if batch:
            attributes[tracing.BATCH_ID] = batch
        return tracing.start(f"{operation} {s.model}", msg.headers, attributes)

    @property
    def batch_capacity(self) -> int:
        """Slots batch lines may use: all but `batch_reserve` (heartbeats tell the batch service). An engine that
        preempts batch work for interactive requests keeps none back, and takes a quarter more lines than it has
        slots: they wait inside the engine, which starts one the step a slot frees (not a round trip through the
        batch service later)."""
        capacity = self.engine.capacity
        reserve = self.s.batch_reserve
        if self.preempting and reserve < 0:
            return capacity + max(1, capacity // 4)
        if reserve < 0:
            reserve = 0 if capacity <= 1 else max(1, capacity // 4)
        return max(capacity - reserve, 1)

    def _room_for_batch(self) -> bool:
        """A batch line may start: nothing waits for a slot and `batch_reserve` slots stay free after it."""
        return self.queued == 0 and len(self.active) + 1 <= self.batch_capacity

    def _expire(self, task: asyncio.Task[None]) -> None:
        """A request's deadline passed: cancel it, marked so `_serve` answers deadline_exceeded."""
        if not task.done():
            self._expired.add(task)
            task.cancel()

    def _usage_event(self, request: RequestT, msg: Msg, outcome: str, tally: TallyT, started: float) -> UsageEvent:
        hdrs = msg.headers or {}
        return UsageEvent(
            request_id=request.request_id,
            kind=self.kind,
            model=self.s.model,
            version=self.s.version,
            worker_id=self.s.worker_id,
            outcome=outcome,
            started_at=started,
            finished_at=time.time(),
            key_id=hdrs.get(h.KEY_ID),
            tenant_id=hdrs.get(h.TENANT),
            attempt=request.attempt,
            batch_id=hdrs.get(BATCH_HEADER),  # a batch line (services/batch): its batch
            **self._usage_fields(request, tally),
        )

    async def _send_error(
        self, out: ReplyStream, code: str, message: str, retry_after: float | None = None, param: str | None = None
    ) -> None:
        if not out.closed and not self.nc.is_closed:
            await out.send(ErrorChunk, code, message, retry_after, param)

    def _admitted(self, out: ReplyStream) -> Admission:
        """Hold one of the engine's slots (`async with`); wait for it in a queue of max_queue, sending Heartbeats
        meanwhile."""
        return Admission(self, out)

    async def _admit(self, out: ReplyStream) -> None:
        if self.queued >= self.s.max_queue:
            raise InferBusError("overloaded", "the worker's queue is full; retry shortly")
        if self._usage_full():
            raise InferBusError(
                "overloaded", "the worker cannot reach the usage ledger (JetStream) and holds as many unpublished"
                " usage events as it may; it admits new requests once they are acknowledged"
            )
        if not self.slots.locked():
            await self.slots.acquire()  # a free slot: no queue, no timer
        else:
            self.queued += 1
            try:
                while True:
                    try:
                        async with asyncio.timeout(self.s.heartbeat_s):
                            await self.slots.acquire()
                        break
                    except TimeoutError:
                        await out.send(Heartbeat)
            finally:
                self.queued -= 1

    def _usage_full(self) -> bool:
        return self.usage is not None and self.usage.full

    async def _beating(self, work: Awaitable[T], out: ReplyStream) -> T:
        """Await `work`, sending a Heartbeat every heartbeat_s meanwhile (the caller's idle timeout)."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.s.heartbeat_s)
                if done:
                    return task.result()
                await out.send(Heartbeat)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
