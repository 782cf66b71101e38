"""Embedding worker: admission, tokenize and check, dynamic batching, vectors back in chunks, usage."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from contracts.embed import (
    VECTOR_CHUNK,
    EmbedDone,
    EmbedRequest,
    Vectors,
    embed_encoder,
    embed_request_decoder,
    too_long,
)
from contracts.errors import InferBusError, invalid
from contracts.llm import ErrorChunk
from services.embed.batcher import Batcher
from services.embed.engines import Engine, Item, Matrix
from services.runtime import worker
from services.runtime.bus import Connection
from services.runtime.replies import ReplyStream
from services.runtime.usage import UsagePublisher
from services.runtime.worker import Metrics, Worker

REQUESTS = Counter("inferbus_embed_requests_total", "Embedding requests by outcome", ["model", "version", "outcome"])
IN_FLIGHT = Gauge("inferbus_embed_in_flight", "Embedding requests running or queued", ["model", "version"])
DURATION = Histogram("inferbus_embed_request_seconds", "Request receipt to terminal chunk", ["model", "version"])
INPUTS = Counter("inferbus_embed_inputs_total", "Inputs embedded", ["model", "version"])
BATCH = Histogram(
    "inferbus_embed_batch_size", "Inputs per forward pass", ["model", "version"], buckets=(1, 2, 4, 8, 16, 32, 64, 128)
)
INLINE_CHARS = 8192  # requests with less text are tokenized on the event loop, larger ones in a thread


class Tally:
    __slots__ = ("tokens",)

    def __init__(self) -> None:
        self.tokens = 0


class WorkerSettings(worker.WorkerSettings, kw_only=True):
    max_batch: int = 32
    max_wait_ms: float = 2.0


class EmbedWorker(Worker[EmbedRequest, Tally]):
    kind = "embed"
    noun = "embedding"
    decoder = embed_request_decoder
    encoder = embed_encoder
    terminal = (EmbedDone, ErrorChunk)
    metrics = Metrics(REQUESTS, IN_FLIGHT, DURATION)

    engine: Engine
    s: WorkerSettings

    def __init__(
        self, nc: Connection, engine: Engine, settings: WorkerSettings, usage: UsagePublisher | None = None
    ) -> None:
        super().__init__(nc, engine, settings, usage)
        self._batch_size = BATCH.labels(*self._labels)
        self._inputs = INPUTS.labels(*self._labels)
        self.batcher = Batcher(engine.embed, settings.max_batch, settings.max_wait_ms / 1000,
                               observe=self._batch_size.observe, lanes=engine.lanes)
        self.tokens = 0

    async def start(self) -> None:
        self.batcher.start()
        await super().start()

    async def stop(self, grace: float = 10.0) -> None:
        await super().stop(grace)
        await self.batcher.close()

    def ready_fields(self) -> dict[str, Any]:
        return {"dim": self.engine.dim, "window": self.engine.window, "max_batch": self.s.max_batch}

    def _engine_stats(self) -> dict[str, Any]:
        return {"dim": self.engine.dim, "window": self.engine.window, "lanes": self.engine.lanes,
                "precision": getattr(self.engine, "precision", None)}

    def _kind_stats(self) -> dict[str, Any]:
        b = self.batcher
        return {"batches": b.batches, "inputs": b.inputs, "mean_batch": round(b.inputs / max(b.batches, 1), 2),
                "tokens": self.tokens}

    def _new_tally(self) -> Tally:
        return Tally()

    def _usage_fields(self, request: EmbedRequest, tally: Tally) -> dict[str, Any]:
        return {"prompt_tokens": tally.tokens}

    def _check(self, request: EmbedRequest) -> None:
        """What the model can do, checked before anything is tokenized."""
        if (request.texts is None) == (request.tokens is None):
            raise invalid("send texts or token arrays, exactly one of them", "input")
        if request.count == 0:
            raise invalid("input must not be empty", "input")
        dim = self.engine.dim
        if request.dimensions is not None and request.dimensions != dim:
            raise InferBusError(
                "unsupported_parameter",
                f"The model '{self.s.model}' makes {dim}-dimensional vectors and cannot shorten them: "
                f"leave dimensions out (or set it to {dim})",
                param="dimensions",
            )
        if request.tokens is not None and not self.engine.token_input:
            raise InferBusError(
                "unsupported_parameter", f"The model '{self.s.model}' takes text input only, not token arrays",
                param="input",
            )

    async def _handle(self, request: EmbedRequest, out: ReplyStream, received: float, tally: Tally) -> None:
        self._check(request)
        async with self._admitted(out):
            items = await self._prepare(request)
            window = self.engine.window
            if not request.truncate:
                for i, item in enumerate(items):
                    if item.full > window:
                        raise too_long(i, item.full, window, self.s.model)
            tally.tokens = sum(item.tokens for item in items)
            vectors = await self._beating(self.batcher.embed(items), out)
        truncated = sum(item.full > window for item in items)
        await self._send(out, vectors, tally.tokens, truncated)
        self.tokens += tally.tokens
        self._inputs.inc(len(items))
        self._record(tally.tokens)

    async def _prepare(self, request: EmbedRequest) -> list[Item]:
        size = sum(map(len, request.texts)) if request.texts is not None else 0
        if request.tokens is not None:
            size = sum(map(len, request.tokens)) * 4
        if size < INLINE_CHARS:
            return self.engine.prepare(request.texts, request.tokens, request.query)
        return await asyncio.to_thread(self.engine.prepare, request.texts, request.tokens, request.query)

    async def _send(self, out: ReplyStream, vectors: Matrix, tokens: int, truncated: int) -> None:
        """Rows in chunks of at most VECTOR_CHUNK bytes; the last one travels with the terminal chunk."""
        count, dim = vectors.shape
        rows = max(1, VECTOR_CHUNK // (dim * 4))
        data = vectors.astype("<f4", copy=False)
        for start in range(0, count, rows):
            last = start + rows >= count
            await out.send(Vectors, start, dim, data[start : start + rows].tobytes(), more=last)
            if not last:
                await out.flush()
        await out.send(EmbedDone, count, dim, tokens, truncated, self.s.version)
