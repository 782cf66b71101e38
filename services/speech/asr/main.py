"""ASR worker process: settings, model load with progress, serve until SIGTERM, then drain."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from services.runtime import service
from services.runtime.worker_main import WorkerProcessSettings, serve
from services.speech.asr import engines
from services.speech.asr.worker import ASRWorker, WorkerSettings

# Model names we ship weights for, and which weights the faster-whisper engine loads for them.
WEIGHTS = {"whisper-tiny-en": "tiny.en", "whisper-base": "base"}


class ASRSettings(WorkerProcessSettings, kw_only=True, forbid_unknown_fields=True):
    model: str = "whisper-tiny-en"
    version: str = "int8"
    engine: str = "faster-whisper"
    # Engine constructor options (weights, compute_type, cpu_threads, capacity, beam_size, vad_filter, ...).
    engine_options: dict[str, Any] = msgspec.field(default_factory=dict)
    # Where joined model files are cached (whisper-base): <data_dir>/models, else ~/.cache/inferbus/models.
    data_dir: str | None = None
    max_audio_seconds: float = 900.0
    diarization: bool = True  # load the speaker encoder for diarized transcripts (if its package is installed)
    max_queue: int = 64
    heartbeat_s: float = 0.5
    drain_grace_s: float = 30.0


def engine_options(cfg: ASRSettings) -> dict[str, Any]:
    options = dict(cfg.engine_options)
    if cfg.engine == "faster-whisper":
        if "weights" not in options and cfg.model in WEIGHTS:
            options["weights"] = WEIGHTS[cfg.model]
        if cfg.data_dir and "cache_dir" not in options:
            options["cache_dir"] = f"{cfg.data_dir}/models"
    return options


def create_engine(cfg: ASRSettings) -> engines.Engine:
    return engines.create(cfg.engine, engine_options(cfg))


async def main(stop: asyncio.Event) -> None:
    await serve(stop, "asr", "ASR worker", ASRSettings, create_engine, ASRWorker, WorkerSettings)


def run() -> None:
    service.run(main)


if __name__ == "__main__":
    run()
