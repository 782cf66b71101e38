"""TTS worker process: settings, engine load with progress, serve until SIGTERM, then drain."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from services.runtime import logging as log
from services.runtime import service, settings, usage
from services.speech.tts import engines
from services.speech.tts.worker import TTSWorker, WorkerSettings


class TTSSettings(settings.CommonSettings, kw_only=True, forbid_unknown_fields=True):
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


async def main(stop: asyncio.Event) -> None:
    cfg = settings.load(TTSSettings, "tts")
    log.configure("tts", cfg.log_level)
    svc = service.Service("inferbus-tts", cfg, description="TTS worker")
    logger = log.get("tts")
    await svc.connect()
    js = svc.bus.jetstream()
    await usage.ensure_stream(js)
    publisher = usage.UsagePublisher(js)
    publisher.start()
    engine = engines.create(cfg.engine, cfg.engine_options)
    worker = TTSWorker(
        svc.bus,
        engine,
        WorkerSettings(
            model=cfg.model,
            version=cfg.version,
            worker_id=svc.instance_id,
            max_queue=cfg.max_queue,
            heartbeat_s=cfg.heartbeat_s,
            max_chars=cfg.max_chars,
            max_sentence_chars=cfg.max_sentence_chars,
            first_sentence_chars=cfg.first_sentence_chars,
        ),
        usage=publisher,
    )
    svc.stats_source = worker.stats
    svc.metadata.update({"kind": "tts", "model": cfg.model, "version": cfg.version, "engine": cfg.engine})
    await svc.register([])

    def progress(step: str, fraction: float) -> None:
        logger.info("model_loading", model=cfg.model, engine=cfg.engine, step=step, progress=f"{fraction:.0%}")

    await engine.load(progress)
    await worker.start()
    logger.info(
        "worker_ready", model=cfg.model, version=cfg.version, subject=worker.subject, engine=cfg.engine,
        voices=sorted(worker.voices), sample_rate=engine.sample_rate,
    )
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
