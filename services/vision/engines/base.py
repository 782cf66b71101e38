"""The vision engine seam: one task per engine, one decoded RGB image in, one result out. The worker does policy."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

from PIL import Image

from contracts.vision import Result, Task

Progress = Callable[[str, float], None]


class Options(NamedTuple):
    top_k: int = 5


class Engine(Protocol):
    name: str
    task: Task
    capacity: int  # images it works on at once

    async def load(self, progress: Progress) -> None: ...

    def run(self, image: Image.Image, options: Options) -> Result:
        """Blocking: the worker runs it in a thread."""
        ...

    async def close(self) -> None: ...
