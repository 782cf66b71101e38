"""ASR engines, one module each; `create` builds one by name, importing only what it needs."""

from __future__ import annotations

from typing import Any

from services.speech.asr.engines.base import Detected, Engine, Options, Progress, Span

ENGINES = ("faster-whisper",)


def create(name: str, options: dict[str, Any]) -> Engine:
    if name == "faster-whisper":
        from services.speech.asr.engines.faster_whisper import FasterWhisperEngine

        return FasterWhisperEngine(**options)
    raise ValueError(f"unknown ASR engine {name!r}; choose one of {', '.join(ENGINES)}")


__all__ = ["ENGINES", "Detected", "Engine", "Options", "Progress", "Span", "create"]
