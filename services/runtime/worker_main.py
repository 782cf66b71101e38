"""A worker process's main(): settings, engine load with progress, serve until SIGTERM, then drain."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from services.runtime import gpu, service, settings, usage
from services.runtime import logging as log
from services.runtime.bus import Connection
from services.runtime.worker import Engine, Worker, WorkerSettings


class WorkerProcessSettings(settings.CommonSettings, kw_only=True, forbid_unknown_fields=True):
    """What every worker process reads; a kind's settings add its defaults and its own options."""

    model: str
    version: str
    engine: str
    drain_grace_s: float = 10.0


C = TypeVar("C", bound=WorkerProcessSettings)
E = TypeVar("E", bound=Engine)
S = TypeVar("S", bound=WorkerSettings)


async def serve(
    stop: asyncio.Event,
    kind: str,
    description: str,
    settings_type: type[C],
    create_engine: Callable[[C], E],
    worker_type: Callable[[Connection, E, S, usage.UsagePublisher], Worker[Any, Any]],
    worker_settings_type: type[S],
) -> None:
    """Serve `kind` requests with a `worker_type` until `stop` is set, then drain."""
    cfg = settings.load(settings_type, kind)
    log.configure(kind, cfg.log_level)
    svc = service.Service(f"inferbus-{kind}", cfg, description=description)
    logger = log.get(kind)
    await svc.connect()
    js = svc.bus.jetstream()
    await usage.ensure_stream(js)
    publisher = usage.UsagePublisher(js)
    publisher.start()
    engine = create_engine(cfg)
    worker = worker_type(svc.bus, engine, worker_settings(cfg, worker_settings_type, svc.instance_id), publisher)
    svc.stats_source = worker.stats
    svc.metadata.update({"kind": kind, "model": cfg.model, "version": cfg.version, "engine": cfg.engine})
    await svc.register([])

    def progress(step: str, fraction: float) -> None:
        logger.info("model_loading", model=cfg.model, engine=cfg.engine, step=step, progress=f"{fraction:.0%}")

    gpu.export()  # GPU utilization and memory on /metrics, where there is an NVIDIA GPU
    await engine.load(progress)
    service.settle()  # the loaded engine too, before the first request
    await worker.start()
    logger.info(
        "worker_ready",
        model=cfg.model,
        version=cfg.version,
        subject=worker.subject,
        engine=cfg.engine,
        **worker.ready_fields(),
    )
    await stop.wait()
    logger.info("draining")
    await worker.stop(cfg.drain_grace_s)
    await publisher.drain(cfg.drain_grace_s)
    await engine.close()
    await svc.close()


def worker_settings(cfg: WorkerProcessSettings, settings_type: type[S], worker_id: str) -> S:
    """The worker's settings: each of its fields from the process setting of the same name (a kind whose
    process settings lack one keeps its default)."""
    values = {name: getattr(cfg, name) for name in settings_type.__struct_fields__
              if name != "worker_id" and hasattr(cfg, name)}
    return settings_type(worker_id=worker_id, **values)
