"""TTS engines, one module each; `create` builds one by name, importing only what it needs."""

from __future__ import annotations

from typing import Any

from services.speech.tts.engines.base import Engine, Progress

ENGINES = ("hibari", "kokoro-ja")


def create(name: str, options: dict[str, Any]) -> Engine:
    if name == "hibari":
        from services.speech.tts.engines.hibari import HibariEngine

        return HibariEngine(**options)
    if name == "kokoro-ja":
        from services.speech.tts.engines.kokoro_ja import KokoroJaEngine

        return KokoroJaEngine(**options)
    raise ValueError(f"unknown TTS engine {name!r}; choose one of {', '.join(ENGINES)}")


__all__ = ["ENGINES", "Engine", "Progress", "create"]
