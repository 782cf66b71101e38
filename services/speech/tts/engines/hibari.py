"""hibari-tts (Apache-2.0): a Kokoro-distilled ONNX model, 24 kHz, with the voice "heart" in the wheel.

Other hibari voices download from a model hub on first use; only voices already on disk are offered,
so a request never waits on (or fails in) a download. Each of the `capacity` synthesis slots gets
its own model instance per voice: nothing in hibari is shared between threads.
"""

from __future__ import annotations

import asyncio
import os
import queue
from typing import Any

from services.speech.tts.engines.base import Progress

WARM_UP = "Warm up."


class HibariEngine:
    name = "hibari"

    def __init__(self, *, voice: str | None = None, threads: int = 1, capacity: int = 1) -> None:
        from hibari import SAMPLE_RATE
        from hibari.voices import DEFAULT

        self.sample_rate = int(SAMPLE_RATE)
        self.default_voice = voice or DEFAULT
        self.threads = threads  # onnxruntime threads per synthesis
        self.capacity = capacity
        self._models: dict[str, queue.SimpleQueue[Any]] = {}

    def voices(self) -> list[str]:
        from hibari.voices import VOICES, voice_path

        out = []
        for name in VOICES:
            try:
                if os.path.exists(voice_path(name, download_missing=False)):
                    out.append(name)
            except FileNotFoundError:
                continue
        return out

    def describe(self, voice: str) -> dict[str, str]:
        from hibari.voices import VOICES

        info = VOICES.get(voice, {})
        return {k: str(info[k]) for k in ("language", "gender", "accent") if k in info}

    async def load(self, progress: Progress) -> None:
        await asyncio.to_thread(self._load, progress)

    def _load(self, progress: Progress) -> None:
        from hibari import Hibari

        names = self.voices()
        if self.default_voice not in names:
            raise RuntimeError(f"hibari voice {self.default_voice!r} is not installed; installed: {names}")
        steps = len(names) * self.capacity
        for i, name in enumerate(names):
            pool: queue.SimpleQueue[Any] = queue.SimpleQueue()
            for slot in range(self.capacity):
                progress(f"voice {name}, slot {slot}: ONNX session, G2P lexicons, warm-up",
                         (i * self.capacity + slot) / steps)
                model = Hibari(voice=name, threads=self.threads)
                model(WARM_UP)  # loads the G2P lexicons and runs the model once
                pool.put(model)
            self._models[name] = pool
        progress("ready", 1.0)

    def synthesize(self, sentence: str, voice: str, speed: float) -> Any:
        pool = self._models[voice]
        model = pool.get()
        try:
            return model(sentence, speed=speed)
        finally:
            pool.put(model)

    async def close(self) -> None:
        self._models.clear()
