"""TTS worker process: settings, engine load with progress, serve until SIGTERM, then drain."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from services.runtime import service
from services.runtime.worker_main import WorkerProcessSettings, serve
from services.speech.tts import engines
from services.speech.tts.worker import TTSWorker, WorkerSettings


class TTSSettings(WorkerProcessSettings, kw_only=True, forbid_unknown_fields=True):
    model: str = "hibari"
    version: str = "v0-2"
    engine: str = "hibari"
    # Engine constructor options (hibari: voice, threads, capacity).
    engine_options: dict[str, Any] = msgspec.field(default_factory=dict)
    max_queue: int = 64
    heartbeat_s: float = 0.5
    max_chars: int = 4096
    max_sentence_chars: int = 300
    first_sentence_chars: int = 80  # 0: never cut the first sentence
    drain_grace_s: float = 10.0


def create_engine(cfg: TTSSettings) -> engines.Engine:
    return engines.create(cfg.engine, cfg.engine_options)


async def main(stop: asyncio.Event) -> None:
    await serve(stop, "tts", "TTS worker", TTSSettings, create_engine, TTSWorker, WorkerSettings)


def run() -> None:
    service.run(main)


if __name__ == "__main__":
    run()
