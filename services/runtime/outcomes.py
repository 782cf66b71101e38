"""Outcomes for canary analysis, sent in batches: one message per model per flush, not one per request."""

from __future__ import annotations

import asyncio

from contracts import subjects
from contracts.registry import Outcome, outcome_encoder
from services.runtime.bus import Connection


class OutcomeBatcher:
    """Collects each request's outcome and publishes them per (kind, model) every `interval_s`.

    The canary controller judges windows of many requests over seconds; a few tens of milliseconds of
    delay cost it nothing, while a message per request is a socket write per request at the edge.
    """

    def __init__(self, nc: Connection, *, interval_s: float = 0.05, max_batch: int = 512) -> None:
        self.nc = nc
        self.interval_s = interval_s
        self.max_batch = max_batch
        self._pending: dict[tuple[str, str], list[Outcome]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[None]] = set()

    def add(self, kind: str, outcome: Outcome) -> None:
        batch = self._pending.setdefault((kind, outcome.model), [])
        batch.append(outcome)
        if len(batch) >= self.max_batch:
            self._spawn_flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval_s, self._spawn_flush)

    def _spawn_flush(self) -> None:
        task = asyncio.ensure_future(self.flush())
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, {}
        if self.nc.is_closed:
            return
        for (kind, model), batch in pending.items():
            await self.nc.publish(subjects.outcome(kind, model), outcome_encoder.encode(batch))

    async def close(self) -> None:
        await self.flush()
        await asyncio.gather(*self._flushing, return_exceptions=True)
