"""LLM worker process: settings, engine load with progress, serve until SIGTERM, then drain."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from services.llm import engines
from services.llm.worker import LLMWorker, WorkerSettings
from services.runtime import logging as log
from services.runtime import service, settings, usage


class LLMSettings(settings.CommonSettings, kw_only=True, forbid_unknown_fields=True):
    model: str = "smollm2-135m-instruct"
    version: str = "q4_1"
    engine: str = "llamacpp"
    # Engine constructor options (model_path, n_ctx, n_threads, capacity, tokens_per_s, ...).
    engine_options: dict[str, Any] = msgspec.field(default_factory=dict)
    # A deployment's default system prompt, used when a chat has none. SmolLM2-135M Q4_1 under
    # llama.cpp derails on its template's built-in persona prompt, and greedy output depends on the
    # CPU's kernels (AVX2 vs AVX-512): this wording answers on both machine types we have seen.
    system_prompt: str | None = "You are a helpful AI assistant."
    max_queue: int = 256
    heartbeat_s: float = 0.5
    coalesce_ms: float = 0.0
    coalesce_tokens: int = 64
    drain_grace_s: float = 10.0
    # Fault injection, for testing canary analysis and rollback only: never set in production.
    fault_error_rate: float = 0.0
    fault_delay_ms: float = 0.0


def engine_options(cfg: LLMSettings) -> dict[str, Any]:
    options = dict(cfg.engine_options)
    if cfg.engine != "benchmark":
        options.setdefault("system_prompt", cfg.system_prompt)
    return options


async def main(stop: asyncio.Event) -> None:
    cfg = settings.load(LLMSettings, "llm")
    log.configure("llm", cfg.log_level)
    svc = service.Service("inferbus-llm", cfg, description="LLM worker")
    logger = log.get("llm")
    await svc.connect()
    js = svc.bus.jetstream()
    await usage.ensure_stream(js)
    publisher = usage.UsagePublisher(js)
    publisher.start()
    engine = engines.create(cfg.engine, engine_options(cfg))
    worker = LLMWorker(
        svc.bus,
        engine,
        WorkerSettings(
            model=cfg.model,
            version=cfg.version,
            worker_id=svc.instance_id,
            max_queue=cfg.max_queue,
            heartbeat_s=cfg.heartbeat_s,
            coalesce_ms=cfg.coalesce_ms,
            coalesce_tokens=cfg.coalesce_tokens,
            fault_error_rate=cfg.fault_error_rate,
            fault_delay_ms=cfg.fault_delay_ms,
        ),
        usage=publisher,
    )
    svc.stats_source = worker.stats
    svc.metadata.update({"kind": "llm", "model": cfg.model, "version": cfg.version, "engine": cfg.engine})
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
