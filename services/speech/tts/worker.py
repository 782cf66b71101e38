"""TTS worker: admission, sentence-by-sentence synthesis streamed as PCM chunks, heartbeats, cancellation, usage."""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import numpy as np
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge, Histogram

from contracts import headers as h
from contracts import subjects
from contracts.control import WorkerLoad, load_encoder
from contracts.errors import InferBusError, invalid
from contracts.llm import Accepted, ErrorChunk, Heartbeat
from contracts.speech import (
    AUDIO_CHUNK,
    PCM_WIDTH,
    AudioChunk,
    SpeechDone,
    SpeechRequest,
    asr_encoder,
    tts_request_decoder,
)
from contracts.usage import UsageEvent
from services.runtime import logging as log
from services.runtime.bus import Connection
from services.runtime.replies import ReplyStream, deadline_in, trace_id
from services.runtime.usage import UsagePublisher
from services.speech.tts import sentences
from services.speech.tts.engines import Engine

MIN_SPEED = 0.25
MAX_SPEED = 4.0
_TERMINAL = (SpeechDone, ErrorChunk)
chunk_encoder = asr_encoder  # a plain msgpack encoder: any TTS chunk

REQUESTS = Counter("inferbus_tts_requests_total", "Syntheses by outcome", ["model", "version", "outcome"])
CHARACTERS = Counter("inferbus_tts_characters_total", "Input characters synthesized", ["model", "version"])
AUDIO_SECONDS = Counter("inferbus_tts_audio_seconds_total", "Seconds of audio produced", ["model", "version"])
IN_FLIGHT = Gauge("inferbus_tts_in_flight", "Syntheses running or queued", ["model", "version"])
FIRST_AUDIO = Histogram(
    "inferbus_tts_first_audio_seconds",
    "Request receipt to first audio chunk published",
    ["model", "version"],
    buckets=(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0),
)
DURATION = Histogram("inferbus_tts_request_seconds", "Request receipt to terminal chunk", ["model", "version"])


class Tally:
    """What one request produced so far: its usage event reports it, however the request ends."""

    __slots__ = ("characters", "sample_rate", "samples")

    def __init__(self, sample_rate: int) -> None:
        self.characters = 0
        self.samples = 0
        self.sample_rate = sample_rate

    @property
    def seconds(self) -> float:
        return self.samples / self.sample_rate


class WorkerSettings(msgspec.Struct, kw_only=True):
    model: str
    version: str
    worker_id: str
    max_queue: int = 64
    heartbeat_s: float = 0.5
    max_chars: int = 4096
    max_sentence_chars: int = 300
    # A longer first sentence is cut at a clause break within this many characters: earlier first audio.
    first_sentence_chars: int = 80


def pcm16(audio: Any) -> bytes:
    """Mono audio (float in -1..1, or int16) as 16-bit little-endian PCM bytes."""
    samples = np.asarray(audio)
    if samples.dtype != np.int16:
        samples = (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)
    return samples.astype("<i2", copy=False).tobytes()


class TTSWorker:
    def __init__(
        self, nc: Connection, engine: Engine, settings: WorkerSettings, usage: UsagePublisher | None = None
    ) -> None:
        self.nc = nc
        self.engine = engine
        self.usage = usage
        self.s = settings
        self.slots = asyncio.Semaphore(engine.capacity)
        self.executor = ThreadPoolExecutor(engine.capacity, thread_name_prefix="tts-engine")
        self.voices: frozenset[str] = frozenset()
        self.active: dict[str, asyncio.Task[None]] = {}
        self.queued = 0
        self.served = 0
        self.cancelled = 0
        self.characters_out = 0
        self.audio_seconds_out = 0.0
        self.ready = False
        self._window: list[tuple[float, int]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._subs: list[Any] = []
        self._labels = (settings.model, settings.version)
        self.logger = log.get("tts")

    # ---- lifecycle ----------------------------------------------------------------------------

    @property
    def subject(self) -> str:
        return subjects.infer("tts", self.s.model, self.s.version)

    async def start(self) -> None:
        s = self.s
        self.voices = frozenset(self.engine.voices())
        queue = subjects.queue_group("tts", s.model, s.version)
        self._subs = [
            await self.nc.subscribe(self.subject, queue=queue, cb=self._on_request),
            await self.nc.subscribe(subjects.infer("tts", s.model, s.version, s.worker_id), cb=self._on_request),
            await self.nc.subscribe(subjects.CANCEL_ALL, cb=self._on_cancel),
        ]
        await self.nc.flush()
        self.ready = True
        self._tasks.add(asyncio.create_task(self._heartbeat_loop()))

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking work, let running syntheses finish for `grace` s, then cancel the rest."""
        self.ready = False
        await self._publish_load()
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
        self.executor.shutdown(wait=True, cancel_futures=True)

    def stats(self) -> dict[str, Any]:
        return {
            "kind": "tts",
            "model": self.s.model,
            "version": self.s.version,
            "worker_id": self.s.worker_id,
            "pid": os.getpid(),
            "engine": self.engine.name,
            "voices": sorted(self.voices),
            "default_voice": self.engine.default_voice,
            "sample_rate": self.engine.sample_rate,
            "ready": self.ready,
            "in_flight": len(self.active),
            "queued": self.queued,
            "capacity": self.engine.capacity,
            "served": self.served,
            "cancelled": self.cancelled,
            "characters_out": self.characters_out,
            "audio_seconds_out": round(self.audio_seconds_out, 3),
            "characters_per_s": round(self._characters_per_s(), 1),
        }

    def _characters_per_s(self) -> float:
        now = time.monotonic()
        self._window = [(t, n) for t, n in self._window if now - t < 5.0]
        return sum(n for _, n in self._window) / 5.0

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._publish_load()
            await asyncio.sleep(1.0)

    async def _publish_load(self) -> None:
        s = self.s
        load = WorkerLoad(
            worker_id=s.worker_id,
            kind="tts",
            model=s.model,
            version=s.version,
            engine=self.engine.name,
            in_flight=len(self.active) - self.queued,
            queued=self.queued,
            capacity=self.engine.capacity,
            tokens_per_s=self._characters_per_s(),  # TTS throughput: input characters per second
            ready=self.ready,
        )
        await self.nc.publish(subjects.heartbeat("tts", s.model, s.version, s.worker_id), load_encoder.encode(load))

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
        out = ReplyStream(self.nc, msg.reply, chunk_encoder, _TERMINAL)
        received = time.monotonic()
        started_at = time.time()
        try:
            request = tts_request_decoder.decode(msg.data)
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
        tally = Tally(self.engine.sample_rate)
        with log.bound(request_id=rid, trace_id=trace_id(msg)):
            try:
                await out.send(Accepted, self.s.worker_id, self.s.version)
                async with asyncio.timeout(deadline_in(msg)):
                    await self._admit_and_synthesize(request, out, received, tally)
            except asyncio.CancelledError:
                outcome = "cancelled"
                self.cancelled += 1
                await self._send_error(out, "cancelled", "the synthesis was cancelled")
            except TimeoutError:
                outcome = "deadline_exceeded"
                await self._send_error(out, "deadline_exceeded", "the request deadline passed")
            except InferBusError as exc:
                outcome = exc.code
                await self._send_error(out, exc.code, exc.message)
            except Exception as exc:
                outcome = "engine_error"
                self.logger.exception("synthesis_failed")
                await self._send_error(out, "engine_error", f"the engine failed: {type(exc).__name__}")
            finally:
                del self.active[rid]
                self.served += 1
                self.characters_out += tally.characters
                self.audio_seconds_out += tally.seconds
                IN_FLIGHT.labels(*self._labels).dec()
                REQUESTS.labels(*self._labels, outcome).inc()
                CHARACTERS.labels(*self._labels).inc(tally.characters)
                AUDIO_SECONDS.labels(*self._labels).inc(tally.seconds)
                DURATION.labels(*self._labels).observe(time.monotonic() - received)
                if self.usage is not None:
                    self.usage.publish(self._usage_event(request, msg, outcome, tally, started_at))

    def _usage_event(self, request: SpeechRequest, msg: Msg, outcome: str, tally: Tally, started: float) -> UsageEvent:
        hdrs = msg.headers or {}
        return UsageEvent(
            request_id=request.request_id,
            kind="tts",
            model=self.s.model,
            version=self.s.version,
            worker_id=self.s.worker_id,
            outcome=outcome,
            started_at=started,
            finished_at=time.time(),
            key_id=hdrs.get(h.KEY_ID),
            tenant_id=hdrs.get(h.TENANT),
            characters_out=tally.characters,
            audio_seconds_out=tally.seconds,
        )

    async def _send_error(self, out: ReplyStream, code: str, message: str) -> None:
        if not out.closed and not self.nc.is_closed:
            await out.send(ErrorChunk, code, message)

    def _validate(self, request: SpeechRequest) -> tuple[list[str], str]:
        """The request's sentences and voice; bad input is refused here and never reaches the engine."""
        text = request.input
        if len(text) > self.s.max_chars:
            raise invalid(f"input is {len(text)} characters; the limit is {self.s.max_chars}", "input")
        parts = sentences.split(text, self.s.max_sentence_chars, self.s.first_sentence_chars)
        if not parts:
            raise invalid("input must not be empty", "input")
        voice = request.voice or self.engine.default_voice
        if voice not in self.voices:
            raise invalid(f"unknown voice {voice!r}; this model has: {', '.join(sorted(self.voices))}", "voice")
        if not MIN_SPEED <= request.speed <= MAX_SPEED:
            raise invalid(f"speed must be between {MIN_SPEED} and {MAX_SPEED}, got {request.speed}", "speed")
        return parts, voice

    async def _admit_and_synthesize(
        self, request: SpeechRequest, out: ReplyStream, received: float, tally: Tally
    ) -> None:
        parts, voice = self._validate(request)
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
            await self._synthesize(request, parts, voice, out, received, tally)
        finally:
            self.slots.release()

    async def _synthesize(
        self, request: SpeechRequest, parts: list[str], voice: str, out: ReplyStream, received: float, tally: Tally
    ) -> None:
        rate = self.engine.sample_rate
        for index, sentence in enumerate(parts):
            pcm = await self._in_thread(out, sentence, voice, request.speed)
            tally.characters += len(sentence)  # produced: counted even if the caller leaves while it goes out
            tally.samples += len(pcm) // PCM_WIDTH
            if index == 0:
                FIRST_AUDIO.labels(*self._labels).observe(time.monotonic() - received)
            for offset in range(0, len(pcm), AUDIO_CHUNK):
                await out.send(AudioChunk, pcm[offset : offset + AUDIO_CHUNK], rate, index)
                await asyncio.sleep(0)  # let other streams publish too
        tally.characters = len(request.input)  # all of it was spoken: bill the input as sent
        self._window.append((time.monotonic(), tally.characters))
        await out.send(SpeechDone, tally.characters, tally.seconds, self.s.version)

    async def _in_thread(self, out: ReplyStream, sentence: str, voice: str, speed: float) -> bytes:
        """One sentence synthesized in the engine's thread, with heartbeats while it runs."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.executor, self._pcm, sentence, voice, speed)
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=self.s.heartbeat_s)
                if done:
                    return future.result()
                await out.send(Heartbeat)
        except asyncio.CancelledError:
            future.cancel()  # a sentence not yet started never starts; a running one ends in its thread
            raise

    def _pcm(self, sentence: str, voice: str, speed: float) -> bytes:
        return pcm16(self.engine.synthesize(sentence, voice, speed))
