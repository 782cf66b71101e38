"""LLM worker process: settings, engine load with progress, serve until SIGTERM, then drain."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from services.llm import engines
from services.llm.worker import LLMWorker, WorkerSettings
from services.runtime import service
from services.runtime.worker_main import WorkerProcessSettings, serve


class LLMSettings(WorkerProcessSettings, kw_only=True, forbid_unknown_fields=True):
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
    batch_reserve: int = -1  # slots a batch line never takes; -1: a quarter of the capacity (none on llama.cpp)
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


def create_engine(cfg: LLMSettings) -> engines.Engine:
    return engines.create(cfg.engine, engine_options(cfg))


async def main(stop: asyncio.Event) -> None:
    await serve(stop, "llm", "LLM worker", LLMSettings, create_engine, LLMWorker, WorkerSettings)


def run() -> None:
    service.run(main)


if __name__ == "__main__":
    run()
