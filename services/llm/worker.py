"""LLM worker: admission, streaming replies with seq, heartbeats, cancellation, token accounting."""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any

import msgspec
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge, Histogram

from contracts import headers as h
from contracts import subjects
from contracts.control import WorkerLoad, load_encoder
from contracts.errors import InferBusError
from contracts.llm import (
    Accepted,
    Delta,
    ErrorChunk,
    Final,
    GenerateRequest,
    Heartbeat,
    Usage,
    chunk_encoder,
    request_decoder,
)
from contracts.usage import UsageEvent
from services.llm.engines import Engine, Piece
from services.llm.stops import StopScanner
from services.runtime import logging as log
from services.runtime.bus import Connection
from services.runtime.replies import ReplyStream, deadline_in, trace_id
from services.runtime.usage import UsagePublisher

REQUESTS = Counter("inferbus_llm_requests_total", "Generations by outcome", ["model", "version", "outcome"])
TOKENS = Counter(
    "inferbus_llm_tokens_total",
    "Tokens counted by the engine tokenizer; traffic=shadow marks shadow copies (never billed)",
    ["model", "version", "type", "traffic"],
)
IN_FLIGHT = Gauge("inferbus_llm_in_flight", "Generations running or queued", ["model", "version"])
TTFT = Histogram("inferbus_llm_ttft_seconds", "Request receipt to first token", ["model", "version"])
DURATION = Histogram("inferbus_llm_request_seconds", "Request receipt to terminal chunk", ["model", "version"])

_DONE = object()


class Tally:
    """Tokens of one request so far: what its usage event reports, however the request ends."""

    __slots__ = ("completion", "prompt")

    def __init__(self) -> None:
        self.prompt = 0
        self.completion = 0


class WorkerSettings(msgspec.Struct, kw_only=True):
    model: str
    version: str
    worker_id: str
    max_queue: int = 256
    heartbeat_s: float = 0.5
    coalesce_ms: float = 0.0
    coalesce_tokens: int = 64
    # Fault injection, for testing rollouts only: fail this fraction of requests / add this delay.
    fault_error_rate: float = 0.0
    fault_delay_ms: float = 0.0


class LLMWorker:
    def __init__(
        self, nc: Connection, engine: Engine, settings: WorkerSettings, usage: UsagePublisher | None = None
    ) -> None:
        self.nc = nc
        self.usage = usage
        self.engine = engine
        self.s = settings
        self.slots = asyncio.Semaphore(engine.capacity)
        self.active: dict[str, asyncio.Task[None]] = {}
        self.queued = 0
        self.served = 0
        self.cancelled = 0
        self.shadow_served = 0
        self.shadow_tokens = 0
        self.faults = 0
        self.ready = False
        self._tokens_window: list[tuple[float, int]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._subs: list[Any] = []
        self._labels = (settings.model, settings.version)
        self.logger = log.get("llm")

    # ---- lifecycle ----------------------------------------------------------------------------

    @property
    def subject(self) -> str:
        return subjects.infer("llm", self.s.model, self.s.version)

    async def start(self) -> None:
        s = self.s
        queue = subjects.queue_group("llm", s.model, s.version)
        self._subs = [
            await self.nc.subscribe(self.subject, queue=queue, cb=self._on_request),
            await self.nc.subscribe(subjects.infer("llm", s.model, s.version, s.worker_id), cb=self._on_request),
            await self.nc.subscribe(subjects.CANCEL_ALL, cb=self._on_cancel),
        ]
        await self.nc.flush()
        self.ready = True
        self._tasks.add(asyncio.create_task(self._heartbeat_loop()))

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking work, let running generations finish for `grace` s, then cancel the rest."""
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
        for task in self._tasks:
            task.cancel()

    def stats(self) -> dict[str, Any]:
        return {
            "kind": "llm",
            "model": self.s.model,
            "version": self.s.version,
            "worker_id": self.s.worker_id,
            "pid": os.getpid(),
            "engine": self.engine.name,
            "ready": self.ready,
            "in_flight": len(self.active),
            "queued": self.queued,
            "capacity": self.engine.capacity,
            "served": self.served,
            "cancelled": self.cancelled,
            "shadow_served": self.shadow_served,
            "shadow_tokens": self.shadow_tokens,
            "faults_injected": self.faults,
            "tokens_per_s": round(self._tokens_per_s(), 1),
        }

    def _tokens_per_s(self) -> float:
        now = time.monotonic()
        self._tokens_window = [(t, n) for t, n in self._tokens_window if now - t < 5.0]
        return sum(n for _, n in self._tokens_window) / 5.0

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._publish_load()
            await asyncio.sleep(1.0)

    async def _publish_load(self) -> None:
        s = self.s
        load = WorkerLoad(
            worker_id=s.worker_id,
            kind="llm",
            model=s.model,
            version=s.version,
            engine=self.engine.name,
            in_flight=len(self.active) - self.queued,
            queued=self.queued,
            capacity=self.engine.capacity,
            tokens_per_s=self._tokens_per_s(),
            ready=self.ready,
        )
        await self.nc.publish(subjects.heartbeat("llm", s.model, s.version, s.worker_id), load_encoder.encode(load))

    # ---- bus callbacks (one at a time per subscription: hand off at once) --------------------

    async def _on_request(self, msg: Msg) -> None:
        if not msg.reply:
            self.logger.warning("request_without_reply", subject=msg.subject)
            return
        task = asyncio.create_task(self._serve(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_cancel(self, msg: Msg) -> None:
        task = self.active.get(msg.subject.split(".", 2)[2])
        if task is not None:
            task.cancel()

    # ---- one request --------------------------------------------------------------------------

    async def _serve(self, msg: Msg) -> None:
        assert msg.reply
        out = ReplyStream(self.nc, msg.reply, chunk_encoder, (Final, ErrorChunk))
        received = time.monotonic()
        started_at = time.time()
        try:
            request = request_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            await out.send(ErrorChunk, "invalid_request", f"undecodable request: {exc}")
            return
        rid = request.request_id
        if rid in self.active:
            await out.send(ErrorChunk, "invalid_request", f"request id {rid!r} is already running")
            return
        task = asyncio.current_task()
        assert task is not None
        self.active[rid] = task
        IN_FLIGHT.labels(*self._labels).inc()
        outcome = "ok"
        tally = Tally()
        with log.bound(request_id=rid, trace_id=trace_id(msg)):
            try:
                await out.send(Accepted, self.s.worker_id, self.s.version)
                async with asyncio.timeout(deadline_in(msg)):
                    await self._admit_and_generate(request, out, received, tally)
            except asyncio.CancelledError:
                outcome = "cancelled"
                self.cancelled += 1
                await self._send_error(out, "cancelled", "the generation was cancelled")
            except TimeoutError:
                outcome = "deadline_exceeded"
                await self._send_error(out, "deadline_exceeded", "the request deadline passed")
            except InferBusError as exc:
                outcome = exc.code
                await self._send_error(out, exc.code, exc.message)
            except Exception as exc:
                outcome = "engine_error"
                self.logger.exception("generation_failed")
                await self._send_error(out, "engine_error", f"the engine failed: {type(exc).__name__}")
            finally:
                del self.active[rid]
                self.served += 1
                IN_FLIGHT.labels(*self._labels).dec()
                REQUESTS.labels(*self._labels, outcome).inc()
                DURATION.labels(*self._labels).observe(time.monotonic() - received)
                if self.usage is not None:
                    self.usage.publish(self._usage_event(request, msg, outcome, tally, started_at))

    def _usage_event(
        self, request: GenerateRequest, msg: Msg, outcome: str, tally: Tally, started: float
    ) -> UsageEvent:
        hdrs = msg.headers or {}
        return UsageEvent(
            request_id=request.request_id,
            kind="llm",
            model=self.s.model,
            version=self.s.version,
            worker_id=self.s.worker_id,
            outcome=outcome,
            started_at=started,
            finished_at=time.time(),
            key_id=hdrs.get(h.KEY_ID),
            tenant_id=hdrs.get(h.TENANT),
            prompt_tokens=tally.prompt,
            completion_tokens=tally.completion,
            shadow=request.shadow,
        )

    async def _send_error(self, out: ReplyStream, code: str, message: str) -> None:
        if not out.closed and not self.nc.is_closed:
            await out.send(ErrorChunk, code, message)

    async def _admit_and_generate(
        self, request: GenerateRequest, out: ReplyStream, received: float, tally: Tally
    ) -> None:
        prepared = self.engine.prepare(request)
        if self.s.fault_delay_ms > 0:
            await asyncio.sleep(self.s.fault_delay_ms / 1000)
        if self.s.fault_error_rate > 0 and random.random() < self.s.fault_error_rate:
            self.faults += 1
            raise InferBusError("engine_error", "injected fault (the worker's fault_error_rate setting)")
        if self.queued >= self.s.max_queue:
            raise InferBusError("overloaded", "the worker's queue is full; retry shortly")
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
        try:
            await self._generate(request, prepared, out, received, tally)
        finally:
            self.slots.release()

    async def _generate(
        self, request: GenerateRequest, prepared: Any, out: ReplyStream, received: float, tally: Tally
    ) -> None:
        tally.prompt = prepared.prompt_tokens
        queue: asyncio.Queue[object] = asyncio.Queue()
        pump = asyncio.create_task(self._pump(self.engine.generate(prepared, request), queue))
        scanner = StopScanner(request.stop)
        completion = 0
        finish = "length"
        first = True
        try:
            while True:
                try:
                    async with asyncio.timeout(self.s.heartbeat_s):
                        item = await queue.get()
                except TimeoutError:
                    await out.send(Heartbeat)
                    continue
                batch = [item]
                await self._coalesce(queue, batch)
                text_parts: list[str] = []
                tokens = 0
                done = False
                for piece in batch:
                    if piece is _DONE:
                        done = True
                        break
                    if isinstance(piece, BaseException):
                        raise piece
                    assert isinstance(piece, Piece)
                    tokens += piece.tokens
                    text_parts.append(scanner.feed(piece.text))
                    if scanner.stopped:
                        finish, done = "stop", True
                        break
                    if piece.finish_reason:
                        finish, done = piece.finish_reason, True
                        break
                if done and not scanner.stopped:
                    text_parts.append(scanner.flush())
                completion += tokens
                tally.completion = completion
                text = "".join(text_parts)
                if text or tokens:
                    if first:
                        TTFT.labels(*self._labels).observe(time.monotonic() - received)
                        first = False
                    await out.send(Delta, text, tokens)
                if done:
                    break
        finally:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        self._tokens_window.append((time.monotonic(), completion))
        traffic = "shadow" if request.shadow else "live"
        if request.shadow:
            self.shadow_served += 1
            self.shadow_tokens += prepared.prompt_tokens + completion
        TOKENS.labels(*self._labels, "prompt", traffic).inc(prepared.prompt_tokens)
        TOKENS.labels(*self._labels, "completion", traffic).inc(completion)
        await out.send(Final, finish, Usage(prepared.prompt_tokens, completion), self.s.version)

    async def _coalesce(self, queue: asyncio.Queue[object], batch: list[object]) -> None:
        """Take what is already queued; optionally wait `coalesce_ms` for more, up to a token cap."""
        limit = self.s.coalesce_tokens
        deadline = time.monotonic() + self.s.coalesce_ms / 1000
        while len(batch) < limit and batch[-1] is not _DONE:
            try:
                batch.append(queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                async with asyncio.timeout(left):
                    batch.append(await queue.get())
            except TimeoutError:
                return

    @staticmethod
    async def _pump(pieces: Any, queue: asyncio.Queue[object]) -> None:
        try:
            async for piece in pieces:
                queue.put_nowait(piece)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            queue.put_nowait(exc)
        finally:
            await pieces.aclose()
        queue.put_nowait(_DONE)
