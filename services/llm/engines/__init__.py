"""Engines, one module each; `create` builds one by name, importing only what it needs."""

from __future__ import annotations

from typing import Any

from services.llm.engines.base import Engine, Piece, Prepared, Progress

ENGINES = ("llamacpp", "transformers", "vllm", "benchmark", "openai", "anthropic", "gemini")


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
    if name == "openai":
        from services.llm.engines.openai import OpenAIEngine

        return OpenAIEngine(**options)
    if name == "anthropic":
        from services.llm.engines.anthropic import AnthropicEngine

        return AnthropicEngine(**options)
    if name == "gemini":
        from services.llm.engines.gemini import GeminiEngine

        return GeminiEngine(**options)
    raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")


__all__ = ["ENGINES", "Engine", "Piece", "Prepared", "Progress", "create"]
