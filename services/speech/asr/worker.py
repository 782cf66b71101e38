"""ASR worker: fetch and decode the audio, admission, segments as they are decoded, heartbeats, cancellation, usage."""

from __future__ import annotations

import asyncio
import io
import os
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import msgspec
import nats.js.errors
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge, Histogram

from contracts import headers as h
from contracts import subjects
from contracts.control import WorkerLoad, load_encoder
from contracts.errors import InferBusError, invalid
from contracts.llm import Accepted, ErrorChunk, Heartbeat
from contracts.speech import (
    MEDIA_BUCKET,
    Segment,
    TranscribeRequest,
    Transcript,
    asr_encoder,
    asr_request_decoder,
)
from contracts.usage import UsageEvent
from services.runtime import logging as log
from services.runtime.bus import Connection
from services.runtime.replies import ReplyStream, deadline_in, trace_id
from services.runtime.usage import UsagePublisher
from services.speech.asr import audio as audio_io
from services.speech.asr.engines import Detected, Engine, Options, Span

REQUESTS = Counter("inferbus_asr_requests_total", "Transcriptions by outcome", ["model", "version", "outcome"])
AUDIO_SECONDS = Counter("inferbus_asr_audio_seconds_total", "Seconds of audio decoded", ["model", "version"])
IN_FLIGHT = Gauge("inferbus_asr_in_flight", "Transcriptions running or queued", ["model", "version"])
DURATION = Histogram("inferbus_asr_request_seconds", "Request receipt to terminal chunk", ["model", "version"])
RTF = Histogram(
    "inferbus_asr_real_time_factor",
    "Engine time over audio duration, per transcription",
    ["model", "version"],
    buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
)
# Where to point a client that asks an English-only model to translate.
MULTILINGUAL_HINT = "whisper-base"
T = TypeVar("T")


class Tally:
    """Seconds of audio of one request, once decoded: what its usage event reports, however it ends."""

    __slots__ = ("audio_seconds", "fetched")

    def __init__(self) -> None:
        self.audio_seconds = 0.0
        self.fetched = False  # its object in the media store was read (and so deleted)


class WorkerSettings(msgspec.Struct, kw_only=True):
    model: str
    version: str
    worker_id: str
    max_queue: int = 64
    heartbeat_s: float = 0.5
    max_audio_seconds: float = 900.0


class ASRWorker:
    def __init__(
        self, nc: Connection, engine: Engine, settings: WorkerSettings, usage: UsagePublisher | None = None
    ) -> None:
        self.nc = nc
        self.engine = engine
        self.s = settings
        self.usage = usage
        self.slots = asyncio.Semaphore(engine.capacity)
        self.active: dict[str, asyncio.Task[None]] = {}
        self.queued = 0
        self.served = 0
        self.cancelled = 0
        self.failed = 0
        self.audio_seconds = 0.0
        self.ready = False
        self._window: list[tuple[float, float]] = []  # (finished at, audio seconds) for the load report
        self._tasks: set[asyncio.Task[None]] = set()
        self._subs: list[Any] = []
        self._labels = (settings.model, settings.version)
        self.logger = log.get("asr")

    # ---- lifecycle ----------------------------------------------------------------------------

    @property
    def subject(self) -> str:
        return subjects.infer("asr", self.s.model, self.s.version)

    async def start(self) -> None:
        s = self.s
        queue = subjects.queue_group("asr", s.model, s.version)
        self._subs = [
            await self.nc.subscribe(self.subject, queue=queue, cb=self._on_request),
            await self.nc.subscribe(subjects.infer("asr", s.model, s.version, s.worker_id), cb=self._on_request),
            await self.nc.subscribe(subjects.CANCEL_ALL, cb=self._on_cancel),
        ]
        await self.nc.flush()
        self.ready = True
        self._spawn(self._heartbeat_loop())

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking work, let running transcriptions finish for `grace` s, then cancel the rest."""
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
            "kind": "asr",
            "model": self.s.model,
            "version": self.s.version,
            "worker_id": self.s.worker_id,
            "pid": os.getpid(),
            "engine": self.engine.name,
            "multilingual": self.engine.multilingual,
            "ready": self.ready,
            "in_flight": len(self.active),
            "queued": self.queued,
            "capacity": self.engine.capacity,
            "served": self.served,
            "cancelled": self.cancelled,
            "failed": self.failed,
            "audio_seconds": round(self.audio_seconds, 3),
            "audio_seconds_per_s": round(self._audio_per_s(), 2),
        }

    def _audio_per_s(self) -> float:
        now = time.monotonic()
        self._window = [(t, s) for t, s in self._window if now - t < 5.0]
        return sum(s for _, s in self._window) / 5.0

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
            kind="asr",
            model=s.model,
            version=s.version,
            engine=self.engine.name,
            in_flight=len(self.active) - self.queued,
            queued=self.queued,
            capacity=self.engine.capacity,
            tokens_per_s=self._audio_per_s(),  # ASR's throughput: seconds of audio per second
            ready=self.ready,
        )
        await self.nc.publish(subjects.heartbeat("asr", s.model, s.version, s.worker_id), load_encoder.encode(load))

    # ---- bus callbacks (one at a time per subscription: hand off at once) --------------------

    async def _on_request(self, msg: Msg) -> None:
        if not msg.reply:
            self.logger.warning("request_without_reply", subject=msg.subject)
            return
        self._spawn(self._serve(msg))

    async def _on_cancel(self, msg: Msg) -> None:
        task = self.active.get(msg.subject.split(".", 2)[2])
        if task is not None:
            task.cancel()

    # ---- one request --------------------------------------------------------------------------

    async def _serve(self, msg: Msg) -> None:
        assert msg.reply
        out = ReplyStream(self.nc, msg.reply, asr_encoder, (Transcript, ErrorChunk))
        received = time.monotonic()
        started_at = time.time()
        try:
            request = asr_request_decoder.decode(msg.data)
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
                    await self._transcribe(request, out, tally)
            except asyncio.CancelledError:
                outcome = "cancelled"
                self.cancelled += 1
                await self._send_error(out, "cancelled", "the transcription was cancelled")
            except TimeoutError:
                outcome = "deadline_exceeded"
                await self._send_error(out, "deadline_exceeded", "the request deadline passed")
            except InferBusError as exc:
                outcome = exc.code
                await self._send_error(out, exc.code, exc.message)
            except Exception as exc:
                outcome = "engine_error"
                self.logger.exception("transcription_failed")
                await self._send_error(out, "engine_error", f"the engine failed: {type(exc).__name__}")
            finally:
                del self.active[rid]
                self.served += 1
                if outcome not in ("ok", "cancelled"):
                    self.failed += 1
                IN_FLIGHT.labels(*self._labels).dec()
                REQUESTS.labels(*self._labels, outcome).inc()
                DURATION.labels(*self._labels).observe(time.monotonic() - received)
                if self.usage is not None:
                    self.usage.publish(self._usage_event(request, msg, outcome, tally, started_at))
                if request.object_name and not tally.fetched:
                    self._spawn(self._discard(request.object_name))  # refused before reading: do not leave it

    def _usage_event(
        self, request: TranscribeRequest, msg: Msg, outcome: str, tally: Tally, started: float
    ) -> UsageEvent:
        hdrs = msg.headers or {}
        return UsageEvent(
            request_id=request.request_id,
            kind="asr",
            model=self.s.model,
            version=self.s.version,
            worker_id=self.s.worker_id,
            outcome=outcome,
            started_at=started,
            finished_at=time.time(),
            key_id=hdrs.get(h.KEY_ID),
            tenant_id=hdrs.get(h.TENANT),
            audio_seconds_in=round(tally.audio_seconds, 3),
        )

    async def _send_error(self, out: ReplyStream, code: str, message: str) -> None:
        if not out.closed and not self.nc.is_closed:
            await out.send(ErrorChunk, code, message)

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

    def _options(self, request: TranscribeRequest) -> Options:
        """The request checked against what the engine can do, before any audio is touched."""
        if (request.audio is None) == (request.object_name is None):
            raise invalid("send the audio inline or name its object in the media store, exactly one of them")
        if not 0.0 <= request.temperature <= 1.0:
            raise invalid("temperature must be between 0 and 1", "temperature")
        model = self.s.model
        if request.task == "translate" and not self.engine.multilingual:
            raise invalid(
                f"The model '{model}' is English-only and cannot translate; "
                f"use a multilingual model such as '{MULTILINGUAL_HINT}'",
                "model",
            )
        language = request.language.strip().lower() if request.language else None
        if language and language not in self.engine.languages:
            if not self.engine.multilingual:
                raise invalid(
                    f"The model '{model}' is English-only: language must be 'en' or omitted; "
                    f"use a multilingual model such as '{MULTILINGUAL_HINT}' for '{language}'",
                    "language",
                )
            raise invalid(f"Unsupported language '{language}': use an ISO-639-1 code such as 'en'", "language")
        return Options(request.task, language, request.prompt, request.temperature, request.word_timestamps)

    async def _transcribe(self, request: TranscribeRequest, out: ReplyStream, tally: Tally) -> None:
        options = self._options(request)
        data = request.audio
        if data is None:
            assert request.object_name is not None
            data = await self._beating(self._fetch(request.object_name), out)
            tally.fetched = True
        audio = await self._beating(
            asyncio.to_thread(audio_io.decode, data, self.s.max_audio_seconds, request.filename), out
        )
        del data
        tally.audio_seconds = audio_io.duration(audio)
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
            await self._run(audio, options, out, tally)
        finally:
            self.slots.release()

    async def _run(self, audio: audio_io.Audio, options: Options, out: ReplyStream, tally: Tally) -> None:
        started = time.monotonic()
        items = self.engine.transcribe(audio, options)
        language = options.language or "en"
        texts: list[str] = []
        try:
            while (item := await self._beating(anext(items, None), out)) is not None:
                if isinstance(item, Detected):
                    language = item.language
                    continue
                assert isinstance(item, Span)
                texts.append(item.text)
                await out.send(
                    Segment,
                    len(texts) - 1,
                    round(item.start, 3),
                    round(item.end, 3),
                    item.text,
                    item.words,
                    item.avg_logprob,
                    item.no_speech_prob,
                )
        finally:
            await items.aclose()  # stops the engine thread (cancel, error) before the slot is released
        seconds = tally.audio_seconds
        elapsed = time.monotonic() - started
        self.audio_seconds += seconds
        self._window.append((time.monotonic(), seconds))
        AUDIO_SECONDS.labels(*self._labels).inc(seconds)
        RTF.labels(*self._labels).observe(elapsed / max(seconds, 1e-3))
        self.logger.info("transcribed", audio_s=round(seconds, 2), rtf=round(elapsed / max(seconds, 1e-3), 3))
        await out.send(Transcript, "".join(texts).strip(), language, round(seconds, 3), self.s.version)

    async def _fetch(self, name: str) -> bytes:
        """The audio from the media object store; deleted once read (it served its one request)."""
        buf = io.BytesIO()
        try:
            store = await self.nc.jetstream().object_store(MEDIA_BUCKET)
            await store.get(name, writeinto=buf)
        except nats.js.errors.NotFoundError:
            raise invalid(f"The audio object '{name}' is not in the media store (expired or never stored)") from None
        finally:
            self._spawn(self._discard(name))
        return buf.getvalue()

    async def _discard(self, name: str) -> None:
        try:
            store = await self.nc.jetstream().object_store(MEDIA_BUCKET)
            await store.delete(name)
        except nats.js.errors.NotFoundError:
            pass
        except Exception as exc:  # the bucket's TTL removes it later
            self.logger.warning("media_delete_failed", object=name, error=repr(exc))

