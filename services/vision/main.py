"""Vision worker process: settings, model load with progress, serve until SIGTERM, then drain.

One process serves one model: `efficientnet-lite0` (classify, the default), `ppocr-v4` (OCR) or
`open-nsfw` (moderation); INFERBUS_MODEL picks it and the engine follows unless INFERBUS_ENGINE says.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import msgspec

from services.runtime import service
from services.runtime.worker_main import WorkerProcessSettings, serve
from services.vision import engines
from services.vision.worker import VisionWorker, WorkerSettings

# The models we ship weights for, and the engine that runs each.
MODELS: Final = {"efficientnet-lite0": "efficientnet-lite", "ppocr-v4": "rapidocr", "open-nsfw": "open-nsfw"}


class VisionSettings(WorkerProcessSettings, kw_only=True, forbid_unknown_fields=True):
    model: str = "efficientnet-lite0"
    version: str = "v1"
    engine: str = ""  # empty: the engine MODELS names for the model
    # Engine constructor options: capacity, threads; efficientnet-lite: weights; open-nsfw: threshold;
    # rapidocr: its own parameters (det_limit_side_len, det_limit_type, text_score, ...).
    engine_options: dict[str, Any] = msgspec.field(default_factory=dict)
    max_image_bytes: int = 20 << 20
    max_image_pixels: int = 25_000_000  # a bigger canvas is refused from its header, before decoding
    min_image_side: int = 16
    max_queue: int = 64
    heartbeat_s: float = 0.5


def create_engine(cfg: VisionSettings) -> engines.Engine:
    name = cfg.engine or MODELS.get(cfg.model, "")
    if not name:
        raise ValueError(f"no engine for the model {cfg.model!r}: set INFERBUS_ENGINE to one of {engines.ENGINES}")
    return engines.create(name, dict(cfg.engine_options))


async def main(stop: asyncio.Event) -> None:
    await serve(stop, "vision", "Vision worker", VisionSettings, create_engine, VisionWorker, WorkerSettings)


def run() -> None:
    service.run(main)


if __name__ == "__main__":
    run()
