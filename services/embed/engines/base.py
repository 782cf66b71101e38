"""The embedding engine seam: tokenize (`prepare`), then embed prepared items in batches. The worker does policy."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

Progress = Callable[[str, float], None]
Matrix = npt.NDArray[np.float32]


class Item(NamedTuple):
    """One input, ready for the model: what it feeds, and how long the input was before any cut."""

    tokens: int  # tokens fed to the model (special tokens included): what usage counts
    full: int  # tokens of the whole input: over `window` means it was cut (or must be refused)
    ids: list[int] | None = None  # engines that take token ids
    text: str | None = None  # engines that tokenize themselves
    query: bool = True  # asymmetric models: a search query (True) or a passage to be found (False)


class Engine(Protocol):
    name: str
    capacity: int  # requests admitted at once (their inputs are batched together)
    dim: int  # vector size
    window: int  # the most tokens one input may feed, special tokens included
    token_input: bool  # takes token arrays (ids of its own vocabulary) as well as text
    lanes: int  # passes `embed` may run at once, from as many threads (1: one at a time)

    async def load(self, progress: Progress) -> None: ...

    def prepare(
        self, texts: Sequence[str] | None, tokens: Sequence[Sequence[int]] | None, query: bool
    ) -> list[Item]:
        """Tokenize; inputs longer than `window` are cut to it (`full` says by how much). Raises InferBusError."""
        ...

    def embed(self, items: Sequence[Item]) -> Matrix:
        """L2-normalized vectors, one row per item (blocking: the worker runs it in a thread, up to `lanes` at once)."""
        ...

    async def close(self) -> None: ...
