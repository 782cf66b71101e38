"""ASR worker process: settings, model load with progress, serve until SIGTERM, then drain."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from services.runtime import logging as log
from services.runtime import service, settings, usage
from services.speech.asr import engines
from services.speech.asr.worker import ASRWorker, WorkerSettings

# Model names we ship weights for, and which weights the faster-whisper engine loads for them.
WEIGHTS = {"whisper-tiny-en": "tiny.en", "whisper-base": "base"}


class ASRSettings(settings.CommonSettings, kw_only=True, forbid_unknown_fields=True):
    model: str = "whisper-tiny-en"
    version: str = "int8"
    engine: str = "faster-whisper"
    # Engine constructor options (weights, compute_type, cpu_threads, capacity, beam_size, vad_filter, ...).
    engine_options: dict[str, Any] = msgspec.field(default_factory=dict)
    # Where joined model files are cached (whisper-base): <data_dir>/models, else ~/.cache/inferbus/models.
    data_dir: str | None = None
    max_audio_seconds: float = 900.0
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


async def main(stop: asyncio.Event) -> None:
    cfg = settings.load(ASRSettings, "asr")
    log.configure("asr", cfg.log_level)
    svc = service.Service("inferbus-asr", cfg, description="ASR worker")
    logger = log.get("asr")
    await svc.connect()
    js = svc.bus.jetstream()
    await usage.ensure_stream(js)
    publisher = usage.UsagePublisher(js)
    publisher.start()
    engine = engines.create(cfg.engine, engine_options(cfg))
    worker = ASRWorker(
        svc.bus,
        engine,
        WorkerSettings(
            model=cfg.model,
            version=cfg.version,
            worker_id=svc.instance_id,
            max_queue=cfg.max_queue,
            heartbeat_s=cfg.heartbeat_s,
            max_audio_seconds=cfg.max_audio_seconds,
        ),
        usage=publisher,
    )
    svc.stats_source = worker.stats
    svc.metadata.update({"kind": "asr", "model": cfg.model, "version": cfg.version, "engine": cfg.engine})
    await svc.register([])

    def progress(step: str, fraction: float) -> None:
        logger.info("model_loading", model=cfg.model, engine=cfg.engine, step=step, progress=f"{fraction:.0%}")

    await engine.load(progress)
    await worker.start()
    logger.info("worker_ready", model=cfg.model, version=cfg.version, subject=worker.subject, engine=cfg.engine)
    await stop.wait()
    logger.info("draining")
    await worker.stop(cfg.drain_grace_s)
    await publisher.drain(cfg.drain_grace_s)
    await engine.close()
    await svc.close()


def run() -> None:
    service.run(main)


if __name__ == "__main__":
    run()
