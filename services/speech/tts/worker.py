"""TTS worker: admission, sentence-by-sentence synthesis streamed as PCM chunks, heartbeats, cancellation, usage."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from contracts.errors import invalid
from contracts.llm import ErrorChunk
from contracts.speech import (
    AUDIO_CHUNK,
    PCM_WIDTH,
    AudioChunk,
    SpeechDone,
    SpeechRequest,
    asr_encoder,
    tts_request_decoder,
)
from services.runtime import worker
from services.runtime.bus import Connection
from services.runtime.replies import ReplyStream
from services.runtime.usage import UsagePublisher
from services.runtime.worker import Metrics, Worker
from services.speech.tts import sentences, style
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


class WorkerSettings(worker.WorkerSettings, kw_only=True):
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


class TTSWorker(Worker[SpeechRequest, Tally]):
    kind = "tts"
    noun = "synthesis"
    decoder = tts_request_decoder
    encoder = chunk_encoder
    terminal = _TERMINAL
    metrics = Metrics(REQUESTS, IN_FLIGHT, DURATION)

    engine: Engine
    s: WorkerSettings

    def __init__(
        self, nc: Connection, engine: Engine, settings: WorkerSettings, usage: UsagePublisher | None = None
    ) -> None:
        super().__init__(nc, engine, settings, usage)
        self.executor = ThreadPoolExecutor(engine.capacity, thread_name_prefix="tts-engine")
        self.voices: frozenset[str] = frozenset()
        self.characters_out = 0
        self.audio_seconds_out = 0.0

    async def start(self) -> None:
        self.voices = frozenset(self.engine.voices())
        await super().start()

    async def stop(self, grace: float = 10.0) -> None:
        await super().stop(grace)
        self.executor.shutdown(wait=True, cancel_futures=True)

    def _engine_stats(self) -> dict[str, Any]:
        return {
            "voices": sorted(self.voices),
            "voice_info": {voice: self.engine.describe(voice) for voice in sorted(self.voices)},
            "default_voice": self.engine.default_voice,
            "sample_rate": self.engine.sample_rate,
        }

    def _kind_stats(self) -> dict[str, Any]:
        return {
            "characters_out": self.characters_out,
            "audio_seconds_out": round(self.audio_seconds_out, 3),
            "characters_per_s": round(self._per_s(), 1),
        }

    def ready_fields(self) -> dict[str, Any]:
        return {"voices": sorted(self.voices), "sample_rate": self.engine.sample_rate}

    def _new_tally(self) -> Tally:
        return Tally(self.engine.sample_rate)

    def _usage_fields(self, request: SpeechRequest, tally: Tally) -> dict[str, Any]:
        return {"characters_out": tally.characters, "audio_seconds_out": tally.seconds}

    def _finished(self, request: SpeechRequest, outcome: str, tally: Tally) -> None:
        self.characters_out += tally.characters
        self.audio_seconds_out += tally.seconds
        CHARACTERS.labels(*self._labels).inc(tally.characters)
        AUDIO_SECONDS.labels(*self._labels).inc(tally.seconds)

    def _validate(self, request: SpeechRequest) -> tuple[list[style.Piece], str, style.Style]:
        """The request's sentences, pauses (seconds) and emphasized sentences, voice and style; bad input is
        refused here and never reaches the engine."""
        text = request.input
        if len(text) > self.s.max_chars:
            raise invalid(f"input is {len(text)} characters; the limit is {self.s.max_chars}", "input")
        if request.instructions is not None and len(request.instructions) > self.s.max_chars:
            raise invalid(f"instructions are {len(request.instructions)} characters; the limit is "
                          f"{self.s.max_chars}", "instructions")
        parts: list[style.Piece] = []
        limit = self.s.max_sentence_chars
        for piece in style.segments(text):
            if isinstance(piece, float):
                parts.append(piece)
                continue
            first = None if any(not isinstance(p, float) for p in parts) else self.s.first_sentence_chars
            if isinstance(piece, style.Emphasis):
                parts.extend(style.Emphasis(s, piece.level) for s in sentences.split(piece.text, limit, first))
            else:
                parts.extend(sentences.split(piece, limit, first))
        if all(isinstance(p, float) for p in parts):
            raise invalid("input must not be empty", "input")
        voice = request.voice or self.engine.default_voice
        if voice not in self.voices:
            raise invalid(f"unknown voice {voice!r}; this model has: {', '.join(sorted(self.voices))}", "voice")
        if not MIN_SPEED <= request.speed <= MAX_SPEED:
            raise invalid(f"speed must be between {MIN_SPEED} and {MAX_SPEED}, got {request.speed}", "speed")
        return parts, voice, style.parse(request.instructions)

    async def _handle(self, request: SpeechRequest, out: ReplyStream, received: float, tally: Tally) -> None:
        parts, voice, how = self._validate(request)
        async with self._admitted(out):
            await self._synthesize(request, parts, voice, how, out, received, tally)

    async def _synthesize(
        self, request: SpeechRequest, parts: list[style.Piece], voice: str, how: style.Style, out: ReplyStream,
        received: float, tally: Tally,
    ) -> None:
        rate = self.engine.sample_rate
        for index, part in enumerate(parts):
            if isinstance(part, float):
                pcm = bytes(int(part * rate) * PCM_WIDTH)  # an inline <break>
            else:
                if isinstance(part, style.Emphasis):
                    sentence, said = part.text, style.emphasized(how, part.level)
                else:
                    sentence, said = part, how
                pcm = await self._in_thread(out, sentence, voice, request.speed, said)
                tally.characters += len(sentence)  # produced: counted even if the caller leaves while it goes out
                if how.pause_s and _sentence_ends(parts, index):
                    pcm += bytes(int(how.pause_s * rate) * PCM_WIDTH)
            tally.samples += len(pcm) // PCM_WIDTH
            if index == 0:
                FIRST_AUDIO.labels(*self._labels).observe(time.monotonic() - received)
            for offset in range(0, len(pcm), AUDIO_CHUNK):
                await out.send(AudioChunk, pcm[offset : offset + AUDIO_CHUNK], rate, index)
                await asyncio.sleep(0)  # let other streams publish too
        tally.characters = len(request.input)  # all of it was spoken: bill the input as sent
        self._record(tally.characters)
        await out.send(SpeechDone, tally.characters, tally.seconds, self.s.version)

    async def _in_thread(self, out: ReplyStream, sentence: str, voice: str, speed: float, how: style.Style) -> bytes:
        """One sentence synthesized in the engine's thread, with heartbeats while it runs."""
        loop = asyncio.get_running_loop()
        # Cancelled, a sentence not yet started never starts; a running one ends in its thread.
        return await self._beating(
            loop.run_in_executor(self.executor, self._pcm, sentence, voice, speed, how), out
        )

    def _pcm(self, sentence: str, voice: str, speed: float, how: style.Style) -> bytes:
        if how.neutral:
            return pcm16(self.engine.synthesize(sentence, voice, speed))
        # Made slower by the pitch ratio, then read faster by it: the pitch moves, the length does not.
        pace = min(max(speed * how.rate / style.pitch_ratio(how), MIN_SPEED), MAX_SPEED)
        return pcm16(style.apply(self.engine.synthesize(sentence, voice, pace), how))


def _sentence_ends(parts: list[style.Piece], index: int) -> bool:
    """Whether the style's pause goes after part `index`: after each sentence but the last, not where an
    <emphasis> span begins or ends within a sentence."""
    if index == len(parts) - 1:
        return False
    here, after = parts[index], parts[index + 1]
    if isinstance(here, style.Emphasis) or isinstance(after, style.Emphasis):
        return sentences.ends_sentence(here.text if isinstance(here, style.Emphasis) else str(here))
    return True
