"""LLM worker: admission, streaming replies with seq, heartbeats, cancellation, token accounting."""

from __future__ import annotations

import asyncio
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from contracts.errors import InferBusError
from contracts.llm import (
    Delta,
    ErrorChunk,
    Final,
    GenerateRequest,
    Heartbeat,
    TokenLogprob,
    ToolCallDelta,
    Usage,
    chunk_encoder,
    request_decoder,
)
from services.llm.engines import Engine, Piece, Prepared
from services.llm.stops import StopScanner
from services.runtime import tracing, worker
from services.runtime.bus import Connection
from services.runtime.replies import ReplyStream
from services.runtime.sweep import Mailbox
from services.runtime.usage import UsagePublisher
from services.runtime.worker import Metrics, Worker

REQUESTS = Counter("inferbus_llm_requests_total", "Generations by outcome", ["model", "version", "outcome"])
IN_FLIGHT = Gauge("inferbus_llm_in_flight", "Generations running or queued", ["model", "version"])
# vLLM's names (`vllm:*`, labelled `model_name`) where vLLM has one, so dashboards, alerts and autoscalers made for
# vLLM read an InferBus LLM worker unchanged (whatever its engine); ours above where none exists.
TTFT = Histogram("vllm:time_to_first_token_seconds", "Request receipt to first token", ["model_name", "version"],
                 buckets=(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                          10.0, 20.0, 40.0, 80.0))
ITL = Histogram("vllm:inter_token_latency_seconds",
                "Time between output tokens (several tokens in one message: their mean)", ["model_name", "version"],
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                         0.3, 0.4, 0.5, 0.75, 1.0, 2.5))
DURATION = Histogram("vllm:e2e_request_latency_seconds", "Request receipt to terminal chunk", ["model_name", "version"],
                     buckets=(0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                              40.0, 50.0, 60.0, 120.0))
# Tokens counted by the engine's tokenizer (a provider's own counts for remote versions); traffic="shadow" marks
# shadow copies (never billed).
PROMPT_TOKENS = Counter("vllm:prompt_tokens", "Prompt tokens processed", ["model_name", "version", "traffic"])
GENERATION_TOKENS = Counter("vllm:generation_tokens", "Tokens generated", ["model_name", "version", "traffic"])
RUNNING = Gauge("vllm:num_requests_running", "Generations running on the engine", ["model_name", "version"])
WAITING = Gauge("vllm:num_requests_waiting", "Generations waiting for a slot", ["model_name", "version"])



class PrefixCache(Collector):
    """vLLM's prefix cache counters (prompt tokens looked up, and found cached) of every engine that keeps a prefix
    cache (llama.cpp's slots), read from the engines when scraped: nothing on the request path."""

    def __init__(self) -> None:
        self.engines: dict[tuple[str, str], Any] = {}

    def collect(self) -> Any:
        labels = ["model_name", "version"]
        queries = CounterMetricFamily("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      labels=labels)
        hits = CounterMetricFamily("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache (not computed)",
                                   labels=labels)
        for key, engine in list(self.engines.items()):
            queried, found = engine.prefix_cache()
            queries.add_metric(list(key), queried)
            hits.add_metric(list(key), found)
        yield queries
        yield hits


PREFIX_CACHE = PrefixCache()
REGISTRY.register(PREFIX_CACHE)

_DONE = object()
# A prompt this short is rendered and tokenized on the loop: the hop to the thread costs more than it does.
INLINE_PREPARE_CHARS = 2048


class Tally:
    """Tokens of one request so far: what its usage event reports, however the request ends."""

    __slots__ = ("completion", "finish", "prompt")

    def __init__(self) -> None:
        self.prompt = 0
        self.completion = 0
        self.finish = ""


class Extras:
    """Tool call deltas and logprobs of the pieces that go out in one Delta (rare: most requests have none)."""

    __slots__ = ("logprobs", "tool_calls")

    def __init__(self) -> None:
        self.tool_calls: list[ToolCallDelta] | None = None
        self.logprobs: list[TokenLogprob] | None = None

    def add(self, piece: Piece) -> None:
        if piece.tool_calls:
            self.tool_calls = (self.tool_calls or []) + piece.tool_calls
        if piece.logprobs:
            self.logprobs = (self.logprobs or []) + piece.logprobs


class WorkerSettings(worker.WorkerSettings, kw_only=True):
    max_queue: int = 256
    coalesce_ms: float = 0.0
    coalesce_tokens: int = 64
    # Fault injection, for testing rollouts only: fail this fraction of requests / add this delay.
    fault_error_rate: float = 0.0
    fault_delay_ms: float = 0.0


class LLMWorker(Worker[GenerateRequest, Tally]):
    kind = "llm"
    noun = "generation"
    decoder = request_decoder
    encoder = chunk_encoder
    terminal = (Final, ErrorChunk)
    metrics = Metrics(REQUESTS, IN_FLIGHT, DURATION)

    engine: Engine
    s: WorkerSettings

    def __init__(
        self, nc: Connection, engine: Engine, settings: WorkerSettings, usage: UsagePublisher | None = None
    ) -> None:
        super().__init__(nc, engine, settings, usage)
        self._ttft = TTFT.labels(*self._labels)
        self._itl = ITL.labels(*self._labels)
        self._tokens = {traffic: (PROMPT_TOKENS.labels(*self._labels, traffic),
                                  GENERATION_TOKENS.labels(*self._labels, traffic)) for traffic in ("live", "shadow")}
        # Read when scraped: nothing on the request path.
        if hasattr(engine, "prefix_cache"):
            PREFIX_CACHE.engines[self._labels] = engine
        RUNNING.labels(*self._labels).set_function(lambda: len(self.active) - self.queued)
        WAITING.labels(*self._labels).set_function(lambda: self.queued)
        self.shadow_served = 0
        self.shadow_tokens = 0
        self.faults = 0
        # Chat template + tokenizer run here, off the event loop. One thread: tokenizers are not all safe
        # to share between threads, and a prompt waiting here counts against max_queue like a queued one.
        self._prepare_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
        self.preparing = 0

    def _kind_stats(self) -> dict[str, Any]:
        return {
            "shadow_served": self.shadow_served,
            "shadow_tokens": self.shadow_tokens,
            "faults_injected": self.faults,
            "tokens_per_s": round(self._per_s(), 1),
        }

    def _engine_stats(self) -> dict[str, Any]:
        kv_cache = getattr(self.engine, "kv_cache", None)  # llama.cpp: the KV cells' type (after load)
        return {} if kv_cache is None else {"kv_cache": kv_cache}

    def ready_fields(self) -> dict[str, Any]:
        return self._engine_stats()

    def _new_tally(self) -> Tally:
        return Tally()

    def _usage_fields(self, request: GenerateRequest, tally: Tally) -> dict[str, Any]:
        return {"prompt_tokens": tally.prompt, "completion_tokens": tally.completion, "shadow": request.shadow}

    def _operation(self, request: GenerateRequest) -> str:
        return "chat" if request.messages is not None else "text_completion"

    def _span_attributes(self, request: GenerateRequest, tally: Tally) -> dict[str, Any]:
        out: dict[str, Any] = {tracing.MAX_TOKENS: request.max_tokens, tracing.INPUT_TOKENS: tally.prompt,
                               tracing.OUTPUT_TOKENS: tally.completion, "inferbus.shadow": request.shadow}
        if tally.finish:
            out[tracing.FINISH_REASONS] = (tally.finish,)
        return out

    async def stop(self, grace: float = 10.0) -> None:
        await super().stop(grace)
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)
        if PREFIX_CACHE.engines.get(self._labels) is self.engine:
            del PREFIX_CACHE.engines[self._labels]

    async def _prepare(self, request: GenerateRequest, out: ReplyStream) -> Prepared:
        """The engine's prepare (chat template, tokenize): in the prepare thread unless the prompt is tiny."""
        size = len(request.prompt or "") + sum(len(m.content) for m in request.messages or ())
        if size <= INLINE_PREPARE_CHARS or getattr(self.engine, "remote", False):  # a remote one builds a dict
            return self.engine.prepare(request)
        if self.queued + self.preparing >= self.s.max_queue:
            raise InferBusError("overloaded", "the worker's queue is full; retry shortly")
        self.preparing += 1
        try:
            loop = asyncio.get_running_loop()
            return await self._beating(loop.run_in_executor(self._prepare_pool, self.engine.prepare, request), out)
        finally:
            self.preparing -= 1

    async def _handle(self, request: GenerateRequest, out: ReplyStream, received: float, tally: Tally) -> None:
        prepared = await self._prepare(request, out)
        if request.count_only:  # a remote engine's prompt is counted upstream: about four characters a token
            count = prepared.prompt_tokens or (sum(len(m.content) for m in request.messages or ()) + 3) // 4
            await out.send(Final, "stop", Usage(count, 0), self.s.version)
            return
        if self.s.fault_delay_ms > 0:
            await asyncio.sleep(self.s.fault_delay_ms / 1000)
        if self.s.fault_error_rate > 0 and random.random() < self.s.fault_error_rate:
            self.faults += 1
            raise InferBusError("engine_error", "injected fault (the worker's fault_error_rate setting)")
        async with self._admitted(out):
            await self._generate(request, prepared, out, received, tally)

    async def _generate(
        self, request: GenerateRequest, prepared: Any, out: ReplyStream, received: float, tally: Tally
    ) -> None:
        tally.prompt = prepared.prompt_tokens
        queue: Mailbox[object] = Mailbox()
        feed = getattr(self.engine, "feed", None)
        pump: asyncio.Task[None] | None = None
        if feed is not None:  # the engine puts its pieces here itself: no pump task
            stop_feed = feed(prepared, request, queue.put, lambda: queue.put(_DONE))
        else:
            pump = asyncio.create_task(self._pump(self.engine.generate(prepared, request), queue))
        scanner = StopScanner(request.stop)
        completion = 0
        finish = "length"
        first = True
        last = received  # when the last token went out (inter-token latency)
        queued = queue.items  # read directly: an empty queue's QueueEmpty per token showed in profiles
        try:
            while True:
                if queued:
                    item = queued.popleft()  # a fast engine: no timer per token
                else:
                    try:
                        item = await queue.get(self.s.heartbeat_s)
                    except TimeoutError:
                        await out.send(Heartbeat)
                        continue
                batch = [item]
                if queued or self.s.coalesce_ms > 0:
                    await self._coalesce(queue, batch)
                text_parts: list[str] = []
                tokens = 0
                done = False
                extras: Extras | None = None
                for piece in batch:
                    if piece is _DONE:
                        done = True
                        break
                    if isinstance(piece, BaseException):
                        raise piece
                    assert isinstance(piece, Piece)
                    if piece.prompt_tokens is not None:  # a provider's own count replaces ours
                        tally.prompt = piece.prompt_tokens
                    if piece.completion_tokens is not None:
                        tokens = max(0, piece.completion_tokens - completion)
                        completion = piece.completion_tokens - tokens
                    else:
                        tokens += piece.tokens
                    if piece.tool_calls is not None or piece.logprobs is not None:
                        extras = extras or Extras()
                        extras.add(piece)
                    text_parts.append(scanner.feed(piece.text))
                    if scanner.stopped:
                        finish, done = "stop", True
                        break
                    if piece.finish_reason:
                        finish, done = piece.finish_reason, True
                        break
                if done and not scanner.stopped:
                    text_parts.append(scanner.flush())
                completion += tokens
                tally.completion = completion
                text = "".join(text_parts)
                if text or tokens or extras is not None:
                    now = time.monotonic()
                    if first:
                        self._ttft.observe(now - received)
                        first = False
                    elif tokens:
                        self._itl.observe((now - last) / tokens)
                    last = now
                    if extras is None:
                        await out.send(Delta, text, tokens, more=done)  # done: Final follows at once
                    else:
                        await out.send(Delta, text, tokens, extras.tool_calls, extras.logprobs, more=done)
                if done:
                    break
        finally:
            if pump is None:
                stop_feed()
            elif not pump.done():  # (gathering a finished task would still cost a loop iteration)
                pump.cancel()
                await asyncio.gather(pump, return_exceptions=True)
        self._record(completion)
        traffic = "shadow" if request.shadow else "live"
        prompt_tokens = tally.prompt
        if request.shadow:
            self.shadow_served += 1
            self.shadow_tokens += prompt_tokens + completion
        prompt_counter, generation_counter = self._tokens[traffic]
        prompt_counter.inc(prompt_tokens)
        generation_counter.inc(completion)
        tally.finish = finish
        await out.send(Final, finish, Usage(prompt_tokens, completion), self.s.version)

    async def _coalesce(self, queue: Mailbox[object], batch: list[object]) -> None:
        """Take what is already queued; optionally wait `coalesce_ms` for more, up to a token cap."""
        limit = self.s.coalesce_tokens
        deadline = time.monotonic() + self.s.coalesce_ms / 1000
        queued = queue.items
        while len(batch) < limit and batch[-1] is not _DONE:
            if queued:
                batch.append(queued.popleft())
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                batch.append(await queue.get(left, precise=True))
            except TimeoutError:
                return

    @staticmethod
    async def _pump(pieces: Any, queue: Mailbox[object]) -> None:
        try:
            async for piece in pieces:
                queue.put(piece)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            queue.put(exc)
        finally:
            await pieces.aclose()
        queue.put(_DONE)
