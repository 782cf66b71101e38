"""ASR worker: admission, then fetch and decode the audio; segments as decoded, heartbeats, cancellation, usage."""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from contracts.errors import invalid
from contracts.llm import ErrorChunk
from contracts.speech import (
    MEDIA_BUCKET,
    Segment,
    TranscribeRequest,
    Transcript,
    asr_encoder,
    asr_request_decoder,
)
from services.runtime import bus, worker
from services.runtime.bus import Connection
from services.runtime.replies import ReplyStream
from services.runtime.usage import UsagePublisher
from services.runtime.worker import Metrics, Worker
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


class Tally:
    """Seconds of audio of one request, once decoded: what its usage event reports, however it ends."""

    __slots__ = ("audio_seconds", "fetched")

    def __init__(self) -> None:
        self.audio_seconds = 0.0
        self.fetched = False  # its object in the media store was read (and so deleted)


class WorkerSettings(worker.WorkerSettings, kw_only=True):
    max_audio_seconds: float = 900.0


class ASRWorker(Worker[TranscribeRequest, Tally]):
    kind = "asr"
    noun = "transcription"
    decoder = asr_request_decoder
    encoder = asr_encoder
    terminal = (Transcript, ErrorChunk)
    metrics = Metrics(REQUESTS, IN_FLIGHT, DURATION)

    engine: Engine
    s: WorkerSettings

    def __init__(
        self, nc: Connection, engine: Engine, settings: WorkerSettings, usage: UsagePublisher | None = None
    ) -> None:
        super().__init__(nc, engine, settings, usage)
        self.failed = 0
        self.audio_seconds = 0.0

    def _engine_stats(self) -> dict[str, Any]:
        return {"multilingual": self.engine.multilingual}

    def _kind_stats(self) -> dict[str, Any]:
        return {
            "failed": self.failed,
            "audio_seconds": round(self.audio_seconds, 3),
            "audio_seconds_per_s": round(self._per_s(), 2),
        }

    def _new_tally(self) -> Tally:
        return Tally()

    def _usage_fields(self, request: TranscribeRequest, tally: Tally) -> dict[str, Any]:
        return {"audio_seconds_in": round(tally.audio_seconds, 3)}

    def _finished(self, request: TranscribeRequest, outcome: str, tally: Tally) -> None:
        if outcome not in ("ok", "cancelled"):
            self.failed += 1
        if request.object_name and not tally.fetched:
            self._spawn(self._discard(request.object_name))  # refused before reading: do not leave it

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

    async def _handle(self, request: TranscribeRequest, out: ReplyStream, received: float, tally: Tally) -> None:
        options = self._options(request)
        # Fetch and decode only once admitted: the engine's slots (and the queue limit ahead of them) bound
        # the threads and the memory decoded audio takes, and a request that leaves while queued used nothing.
        async with self._admitted(out):
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
            await self._run(audio, options, out, tally)

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
        self._record(seconds)
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
        except bus.js_errors.NotFoundError:
            raise invalid(f"The audio object '{name}' is not in the media store (expired or never stored)") from None
        finally:
            self._spawn(self._discard(name))
        return buf.getvalue()

    async def _discard(self, name: str) -> None:
        try:
            store = await self.nc.jetstream().object_store(MEDIA_BUCKET)
            await store.delete(name)
        except bus.js_errors.NotFoundError:
            pass
        except Exception as exc:  # the bucket's TTL removes it later
            self.logger.warning("media_delete_failed", object=name, error=repr(exc))

