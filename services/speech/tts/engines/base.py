"""The engine seam: what every TTS engine implements. The worker around it does policy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

Progress = Callable[[str, float], None]


class Engine(Protocol):
    name: str
    sample_rate: int  # Hz of what `synthesize` returns
    default_voice: str
    capacity: int  # sentences it synthesizes at once (worker threads)

    async def load(self, progress: Progress) -> None: ...

    def voices(self) -> list[str]:
        """Voices usable right now (installed, not merely downloadable)."""
        ...

    def describe(self, voice: str) -> dict[str, str]:
        """What a listing says about a voice: language (BCP 47), and gender and accent where known."""
        ...

    def synthesize(self, sentence: str, voice: str, speed: float) -> Any:
        """Blocking: one sentence as mono PCM at `sample_rate`, a float (-1..1) or int16 numpy array.

        The worker calls it in a thread, one sentence at a time, so it can stop between sentences.
        """
        ...

    async def close(self) -> None: ...
