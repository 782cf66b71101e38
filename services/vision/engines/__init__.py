"""Vision engines, one module each; `create` builds one by name, importing only what it needs."""

from __future__ import annotations

from typing import Any

from services.vision.engines.base import Engine, Options, Progress

ENGINES = ("efficientnet-lite", "rapidocr", "open-nsfw")


def create(name: str, options: dict[str, Any]) -> Engine:
    if name == "efficientnet-lite":
        from services.vision.engines.efficientnet import EfficientNetLiteEngine

        return EfficientNetLiteEngine(**options)
    if name == "rapidocr":
        from services.vision.engines.rapidocr import RapidOcrEngine

        return RapidOcrEngine(**options)
    if name == "open-nsfw":
        from services.vision.engines.open_nsfw import OpenNsfwEngine

        return OpenNsfwEngine(**options)
    raise ValueError(f"unknown vision engine {name!r}; choose one of {', '.join(ENGINES)}")


__all__ = ["ENGINES", "Engine", "Options", "Progress", "create"]
