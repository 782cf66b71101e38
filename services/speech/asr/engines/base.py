"""The ASR engine seam: what every speech-recognition engine implements. The worker does policy."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import Literal, NamedTuple, Protocol

from contracts.speech import Word
from services.speech.asr.audio import Audio

Progress = Callable[[str, float], None]


class Options(NamedTuple):
    task: Literal["transcribe", "translate"] = "transcribe"
    language: str | None = None  # None: detect
    prompt: str | None = None
    temperature: float = 0.0  # 0: the engine's own fallback schedule
    word_timestamps: bool = False
    beam_size: int | None = None  # None: the engine's default
    # Languages this request hands back undecoded when detection finds them (another model serves them):
    # the engine yields only Detected then. Detection runs first and the decode reuses its answer.
    handoff: frozenset[str] = frozenset()


class Detected(NamedTuple):
    """First item of every transcription: the language spoken (given or detected)."""

    language: str
    probability: float


class Span(NamedTuple):
    """One decoded segment, in audio time (seconds)."""

    start: float
    end: float
    text: str
    words: list[Word]
    avg_logprob: float
    no_speech_prob: float


class Engine(Protocol):
    name: str
    capacity: int  # transcriptions it runs at once
    multilingual: bool  # False: English only (no translation, no other language)
    languages: frozenset[str]  # ISO-639-1 codes it accepts

    async def load(self, progress: Progress) -> None: ...

    def transcribe(self, audio: Audio, options: Options) -> AsyncGenerator[Detected | Span, None]: ...

    async def close(self) -> None: ...
