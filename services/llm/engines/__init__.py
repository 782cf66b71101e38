"""Engines, one module each; `create` builds one by name, importing only what it needs."""

from __future__ import annotations

from typing import Any

from services.llm.engines.base import Engine, Piece, Prepared, Progress

ENGINES = ("llamacpp", "transformers", "vllm", "benchmark")


def create(name: str, options: dict[str, Any]) -> Engine:
    if name == "llamacpp":
        from services.llm.engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine(**options)
    if name == "transformers":
        from services.llm.engines.transformers import TransformersEngine

        return TransformersEngine(**options)
    if name == "vllm":
        from services.llm.engines.vllm import VllmEngine

        return VllmEngine(**options)
    if name == "benchmark":
        from services.llm.engines.benchmark import BenchmarkEngine

        return BenchmarkEngine(**options)
    raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")


__all__ = ["ENGINES", "Engine", "Piece", "Prepared", "Progress", "create"]
