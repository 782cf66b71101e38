"""Dynamic batching: inputs of concurrent requests gathered into forward passes, `lanes` passes at a time.

A request's inputs are sorted by length and cut into pieces of at most `pass_size` (similar lengths pad
little). The loop takes the queued pieces in order and runs them as one batch in a thread, up to `lanes`
batches at once (the engine says how many passes it can run side by side); while the lanes are full, the
next batch gathers. `max_batch` inputs are in flight at most: each pass takes up to max_batch / lanes, so
that under load the lanes carry equal passes (32 clients on two lanes: two passes of 16, alternating) and a
request of many inputs runs on every lane at once. Batching adapts to load: an input that finds the worker
idle (no pass running, and nothing was waiting when the last batch ended) runs at once, alone; otherwise (the
worker is busy) a batch waits up to `max_wait_s` after its first input to fill. A lone client never pays the
wait; concurrent ones share passes. A piece whose request left (cancelled) before its batch started is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from services.embed.engines import Item, Matrix

Run = Callable[[Sequence[Item]], Matrix]


@dataclass
class _Piece:
    items: list[Item]
    future: asyncio.Future[Matrix]


class Batcher:
    def __init__(self, run: Run, max_batch: int = 32, max_wait_s: float = 0.002,
                 observe: Callable[[int], None] | None = None, lanes: int = 1) -> None:
        self.run = run
        self.lanes = max(1, lanes)
        self.max_batch = max(1, max_batch)
        self.pass_size = -(-self.max_batch // self.lanes)  # inputs per pass
        self.max_wait_s = max(0.0, max_wait_s)
        self.observe = observe  # told each batch's size
        self.batches = 0
        self.inputs = 0
        self._queue: deque[_Piece] = deque()
        self._queued = 0  # inputs in the queue
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._passes: set[asyncio.Task[None]] = set()  # batches running
        self._busy = False  # inputs were waiting when the last batch ended: wait for a fuller batch

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*self._passes, return_exceptions=True)
        for piece in self._queue:
            piece.future.cancel()
        self._queue.clear()

    async def embed(self, items: Sequence[Item]) -> Matrix:
        """Vectors of `items`, in their order, computed in batches shared with other requests."""
        loop = asyncio.get_running_loop()
        order = sorted(range(len(items)), key=lambda i: items[i].tokens)
        pieces: list[tuple[list[int], _Piece]] = []
        for start in range(0, len(order), self.pass_size):
            rows = order[start : start + self.pass_size]
            piece = _Piece([items[i] for i in rows], loop.create_future())
            pieces.append((rows, piece))
            self._queue.append(piece)
            self._queued += len(rows)
        self._wake.set()
        try:
            results = await asyncio.gather(*(piece.future for _, piece in pieces))
        finally:
            for _, piece in pieces:
                piece.future.cancel()  # no-op once done; else its batch skips it
        out = np.empty((len(items), results[0].shape[1]), dtype=np.float32)
        for (rows, _), vectors in zip(pieces, results, strict=True):
            out[rows] = vectors
        return out

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue or len(self._passes) >= self.lanes:
                self._wake.clear()
                await self._wake.wait()
            busy = self._busy or bool(self._passes)
            deadline = loop.time() + (self.max_wait_s if busy else 0.0)
            while self._queued < self.pass_size and (left := deadline - loop.time()) > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self._wake.wait()
            batch = self._take()
            if not batch:
                continue
            task = asyncio.create_task(self._pass(batch))
            self._passes.add(task)
            task.add_done_callback(self._passed)

    def _passed(self, task: asyncio.Task[None]) -> None:
        self._passes.discard(task)
        self._wake.set()  # a lane is free

    async def _pass(self, batch: list[_Piece]) -> None:
        items = [item for piece in batch for item in piece.items]
        try:
            vectors = await asyncio.to_thread(self.run, items)
        except Exception as exc:
            for piece in batch:
                if not piece.future.done():
                    piece.future.set_exception(exc)
            return
        finally:
            self._busy = bool(self._queue)
        self.batches += 1
        self.inputs += len(items)
        if self.observe is not None:
            self.observe(len(items))
        offset = 0
        for piece in batch:
            if not piece.future.done():
                piece.future.set_result(vectors[offset : offset + len(piece.items)])
            offset += len(piece.items)

    def _take(self) -> list[_Piece]:
        """The queued pieces that fit in one batch, in order; those whose request left are dropped."""
        batch: list[_Piece] = []
        size = 0
        while self._queue:
            piece = self._queue[0]
            if piece.future.done():
                self._queue.popleft()
                self._queued -= len(piece.items)
                continue
            if batch and size + len(piece.items) > self.pass_size:
                break
            self._queue.popleft()
            self._queued -= len(piece.items)
            batch.append(piece)
            size += len(piece.items)
        return batch
