"""Alias router: serves `infer.<kind>.<model>` for plain NATS publishers.

Each request is forwarded, bytes and headers untouched, to the worker the registry's policy and
live load pick (`infer.<kind>.<model>.<version>[.<worker>]`) with the caller's own reply subject, so
the worker streams straight back to the caller: the router adds one hop on the way in, none on the
way out. To see how a forwarded request ended, the router also listens on the caller's inbox (a
subscription per watched request, dropped at the stream's end): that gives the outcome it reports
for canary analysis, the served output a sampled shadow copy is compared with, and a fast
`no_worker` answer when the picked worker is gone (the no-responders status reaches the publisher,
the router, not the caller).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, cast

import msgspec
from prometheus_client import Counter

from contracts import headers as h
from contracts import subjects
from contracts.control import load_decoder
from contracts.errors import InferBusError
from contracts.llm import Delta, ErrorChunk, Final, chunk_decoder, chunk_encoder, request_decoder
from contracts.registry import Outcome, RoutingTable
from contracts.speech import AudioChunk, Segment, SpeechDone, Transcript, asr_chunk_decoder, tts_chunk_decoder
from services.runtime import bus, service, settings, shadow, tracing
from services.runtime import logging as log
from services.runtime.breakers import Breakers
from services.runtime.outcomes import OutcomeBatcher
from services.runtime.routing import Presence, Route, Router, Tables, ranked
from services.runtime.streaming import StreamClient, unbundle

FORWARDED = Counter("inferbus_router_forwarded_total", "Requests forwarded by the alias router", ["model", "version"])
REFUSED = Counter("inferbus_router_refused_total", "Requests the alias router answered with an error", ["code"])
OUTCOMES = Counter("inferbus_router_outcomes_total", "Outcomes of watched forwarded requests", ["model", "code"])
Callback = Callable[[bus.Msg], Awaitable[None]]


class StreamShape(NamedTuple):
    """How to read one kind's reply stream: its chunk decoder, terminal chunk and progress chunks."""

    decoder: msgspec.msgpack.Decoder[Any]
    terminal: type
    progress: tuple[type, ...]


SHAPES: dict[str, StreamShape] = {
    "llm": StreamShape(chunk_decoder, Final, (Delta,)),
    "asr": StreamShape(asr_chunk_decoder, Transcript, (Segment,)),
    "tts": StreamShape(tts_chunk_decoder, SpeechDone, (AudioChunk,)),
}


class RouterSettings(settings.CommonSettings, kw_only=True, forbid_unknown_fields=True):
    kinds: list[str] = msgspec.field(default_factory=lambda: ["llm"])
    shadow_timeout_s: float = 120.0
    # Percent of forwarded requests watched for their outcome (canary analysis, per-version metrics in
    # `models show`). Requests to a model with a canary or a shadow copy are always watched.
    outcome_percent: float = 100.0
    # A watched stream silent this long (worker heartbeats included) failed; no stream is watched longer
    # than its deadline header or max_watch_s.
    watch_idle_s: float = 5.0
    max_watch_s: float = 3600.0


class AliasRouter:
    def __init__(self, cfg: RouterSettings) -> None:
        self.cfg = cfg
        self.service = service.Service("inferbus-router", cfg, description="Model alias router")
        self.presence = Presence()
        self.tables = Tables()
        self.router = Router(self.presence, self.tables)
        self.breakers = Breakers(f"router-{self.service.instance_id}")
        self.forwarded = 0
        self.outcomes = 0
        self._client: StreamClient | None = None
        self.outcome_batcher: OutcomeBatcher | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.logger = log.get("router")

    async def start(self) -> None:
        await self.service.connect()
        nc = self.service.bus
        await nc.subscribe(subjects.HEARTBEAT_ALL, cb=self._on_heartbeat)
        await self.tables.watch(nc.jetstream())
        await self.breakers.watch(nc.jetstream())
        self._client = StreamClient(nc)
        await self._client.start()
        self.outcome_batcher = OutcomeBatcher(nc)
        # (nats-py ignores what a callback returns: `_on_request`'s route is for the traced one.)
        on_request = cast(Callback, self._on_request) if tracing.tracer is None else self._on_traced_request
        for kind in self.cfg.kinds:
            await nc.subscribe(subjects.alias_all(kind), queue="inferbus-router", cb=on_request)
        self.service.stats_source = lambda: {
            "forwarded": self.forwarded,
            "outcomes": self.outcomes,
            "tables": len(self.tables.by_model),
        }
        await self.service.register([])

    async def close(self) -> None:
        await self.tables.close()
        await self.breakers.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.outcome_batcher is not None:
            await self.outcome_batcher.close()
        await self.service.close()

    async def _on_heartbeat(self, msg: bus.Msg) -> None:
        try:
            self.presence.heard(load_decoder.decode(msg.data))
        except msgspec.DecodeError:
            self.logger.warning("bad_heartbeat", subject=msg.subject)

    async def _on_traced_request(self, msg: bus.Msg) -> None:
        """`_on_request` in a span of its own (the subscription's callback when tracing is on)."""
        _, kind, model = msg.subject.split(".", 2)
        span = tracing.start(f"route {model}", msg.headers, {
            tracing.REQUEST_MODEL: model, "inferbus.kind": kind, "messaging.system": "nats"})
        code: str | None = "internal_error"
        forwarded: dict[str, str] = {}
        try:
            # The worker's span is a child of this one: the forwarded headers carry it as their traceparent.
            routed = await self._on_request(msg, span.headers(msg.headers))
            if isinstance(routed, str):
                code = routed
            else:
                code, forwarded = None, {tracing.VERSION: routed.version, "messaging.destination.name": routed.subject}
        finally:
            span.end(code, forwarded)

    async def _on_request(self, msg: bus.Msg, headers: dict[str, str] | None = None) -> Route | str:
        """Forward the request (with `headers` instead of its own, if given) where the policy says; or answer it
        with an error chunk. The route, or the error's code."""
        nc = self.service.bus
        if not msg.reply:
            REFUSED.labels("no_reply").inc()
            return "no_reply"
        _, kind, model = msg.subject.split(".", 2)
        try:
            table = self.tables.get(kind, model)
            if table is None:
                raise InferBusError("model_not_found", f"the model '{model}' is not registered", param="model")
            sticky = msg.headers.get(h.KEY_ID) if msg.headers else None
            if table.policy.ab and table.policy.sticky == "user":
                sticky = request_decoder.decode(msg.data).user
            route = self.router.route(kind, model, sticky=sticky)
            assert route is not None
            if not await self._admits(kind, model, route.version):
                route = await self._around_open_breaker(kind, model, table, route)
        except (InferBusError, msgspec.DecodeError) as exc:
            code, text = (exc.code, exc.message) if isinstance(exc, InferBusError) else ("invalid_request", str(exc))
            REFUSED.labels(code).inc()
            await nc.publish(msg.reply, chunk_encoder.encode(ErrorChunk(0, code, text)))
            return code
        if route.shadow is not None and kind != "llm":
            route = route._replace(shadow=None)  # shadow copies are generations
        watch = None
        if kind in SHAPES and (route.shadow is not None or self._watched(table)):
            watch = await InboxWatch.start(nc, msg.reply, SHAPES[kind], keep_text=route.shadow is not None)
        await nc.publish(route.subject, msg.data, reply=msg.reply, headers=msg.headers if headers is None else headers)
        self.forwarded += 1
        FORWARDED.labels(model, route.version).inc()
        if watch is not None:
            self._spawn(self._follow(msg, watch, kind, model, route))
        return route

    async def _admits(self, kind: str, model: str, version: str) -> bool:
        verdict = self.breakers.verdict(kind, model, version)
        return verdict == "closed" or (verdict == "probe" and await self.breakers.claim_probe(kind, model, version))

    async def _around_open_breaker(self, kind: str, model: str, table: RoutingTable, first: Route) -> Route:
        """The chosen version's breaker is open: the pool's next version or a fallback model whose is not.

        The router forwards with the caller's own reply subject, so it cannot retry a failed stream; what it
        can do is never send to a version its breaker says is down."""
        assert self.outcome_batcher is not None  # the skipped version's failure, for canary analysis
        self.outcome_batcher.add(kind, Outcome(model, first.version, False, "circuit_open", 0.0, None))
        policy = table.policy
        versions = ranked(table, self.router.signals)
        if first.version == policy.canary and policy.stable is not None:
            versions.insert(0, policy.stable)  # a failing canary's requests go to its stable version
        for version in versions:
            if version != first.version and await self._admits(kind, model, version):
                return self.router.to_worker(kind, model, version)
        for fallback in table.policy.routing.fallbacks:
            fallback_table = self.tables.get(kind, fallback)
            if fallback_table is None:
                continue
            route = self.router.route(kind, fallback)
            if route is not None and await self._admits(kind, fallback, route.version):
                return route._replace(shadow=None)
        wait = self.breakers.retry_after(kind, model, first.version)
        raise InferBusError("circuit_open", f"'{model}' version '{first.version}' is failing; its circuit is open"
                            f" (retry in {wait:.0f} s) and no fallback is available")

    def _watched(self, table: RoutingTable) -> bool:
        policy = table.policy
        if policy.canary and policy.canary_weight > 0:
            return True
        return random.random() * 100 < self.cfg.outcome_percent

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _follow(self, msg: bus.Msg, watch: InboxWatch, kind: str, model: str, route: Route) -> None:
        """Wait for the served stream's end; report its outcome; compare it with a shadow copy if one runs."""
        nc = self.service.bus
        copy = self._start_copy(msg, kind, route)
        try:
            try:
                await watch.wait(self.cfg.watch_idle_s, self._deadline(msg))
            finally:
                await watch.stop()
            code = watch.code
            if code == "no_worker":  # the status reached us, the publisher, not the caller: tell it now
                if route.worker_id is not None:
                    self.presence.forget(route.worker_id)  # gone: out of routing now, not in 3 s
                text = f"no worker is serving {model!r} right now"
                await nc.publish(msg.reply, chunk_encoder.encode(ErrorChunk(0, "no_worker", text)))
            served_model = self._model_of(kind, model, route)
            if code is None:
                self.breakers.success(kind, served_model, route.version)
            elif code != "cancelled":
                table = self.tables.get(kind, served_model)
                if table is not None:
                    self.breakers.failure(kind, served_model, route.version, code, table.policy.routing.breaker)
            if code != "cancelled" and not nc.is_closed:  # a caller that left says nothing about the version
                OUTCOMES.labels(model, code or "ok").inc()
                self.outcomes += 1
                assert self.outcome_batcher is not None
                self.outcome_batcher.add(
                    kind, Outcome(served_model, route.version, code is None, code or "ok", watch.latency_ms,
                                  watch.ttft_ms))
            if copy is not None:
                await self._compare(copy, watch, route)
        finally:
            if copy is not None and not copy[1].done():
                copy[1].cancel()

    @staticmethod
    def _model_of(kind: str, model: str, route: Route) -> str:
        """The model a route serves (a fallback's, when the subject names another)."""
        parts = route.subject.split(".")
        return parts[2] if len(parts) > 2 and parts[2] != subjects.token(model) else model

    def _deadline(self, msg: bus.Msg) -> float:
        """The stream's deadline on the monotonic clock: the caller's header, capped at max_watch_s."""
        limit = time.monotonic() + self.cfg.max_watch_s
        raw = msg.headers.get(h.DEADLINE) if msg.headers else None
        try:
            return min(limit, time.monotonic() + float(raw) / 1000 - time.time()) if raw else limit
        except ValueError:
            return limit

    def _start_copy(self, msg: bus.Msg, kind: str, route: Route) -> tuple[Any, asyncio.Task[shadow.Observed]] | None:
        if route.shadow is None:
            return None
        assert self._client is not None
        try:
            request = request_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return None
        deadline = time.time() + self.cfg.shadow_timeout_s
        copy = shadow.run_copy(self._client, kind, shadow.shadow_copy(request), route.shadow, deadline)
        return request, asyncio.create_task(copy)

    async def _compare(self, copy: tuple[Any, asyncio.Task[shadow.Observed]], watch: InboxWatch, route: Route) -> None:
        request, task = copy
        assert route.shadow is not None
        try:
            async with asyncio.timeout(self.cfg.shadow_timeout_s):
                shadow_seen = await task
        except TimeoutError:
            self.logger.warning("shadow_timeout", model=request.model, request_id=request.request_id)
            return
        record = await shadow.compare(request, route.version, watch.observed(), route.shadow, shadow_seen)
        await shadow.publish(self.service.bus, record)


class InboxWatch:
    """Listens on a caller's inbox (subscribed before the request is forwarded) for how the stream ends."""

    def __init__(self, shape: StreamShape, keep_text: bool) -> None:
        self.shape = shape
        self.keep_text = keep_text
        self.started = self.last = time.monotonic()
        self.chunks = 0
        self.parts: list[str] = []
        self.code: str | None = "cancelled"  # None: completed; an error code otherwise
        self.latency_ms = 0.0
        self.ttft_ms: float | None = None
        self.done = asyncio.Event()
        self.sub: Any = None

    @classmethod
    async def start(cls, nc: Any, inbox: str, shape: StreamShape, *, keep_text: bool = False) -> InboxWatch:
        watch = cls(shape, keep_text)
        watch.sub = await nc.subscribe(inbox, cb=watch._on_chunk)
        return watch

    async def _on_chunk(self, msg: bus.Msg) -> None:
        if self.done.is_set():
            return
        self.last = time.monotonic()
        if msg.headers and msg.headers.get(h.STATUS) == h.NO_RESPONDERS and not msg.data:
            return self._end("no_worker")
        try:
            chunks = unbundle(self.shape.decoder, msg.data)
        except InferBusError:
            return self._end("stream_broken")
        for chunk in chunks:
            self.chunks += 1
            if isinstance(chunk, self.shape.progress):
                if self.ttft_ms is None:
                    self.ttft_ms = (self.last - self.started) * 1000
                if self.keep_text and isinstance(chunk, Delta):
                    self.parts.append(chunk.text)
            elif isinstance(chunk, ErrorChunk):
                return self._end(chunk.code)
            elif isinstance(chunk, self.shape.terminal):
                return self._end(None)
        return None

    def _end(self, code: str | None) -> None:
        self.code = code
        self.latency_ms = (time.monotonic() - self.started) * 1000
        self.done.set()

    async def wait(self, idle_s: float, deadline: float) -> None:
        """Until the stream ends, goes silent for `idle_s` (worker_timeout / stream_broken) or `deadline`."""
        while not self.done.is_set():
            now = time.monotonic()
            if now >= deadline:
                return self._end("deadline_exceeded")
            if now - self.last >= idle_s:
                return self._end("stream_broken" if self.chunks else "worker_timeout")
            try:
                async with asyncio.timeout(min(deadline, self.last + idle_s) - now):
                    await self.done.wait()
            except TimeoutError:
                continue

    async def stop(self) -> None:
        try:
            await self.sub.unsubscribe()
        except Exception:  # the connection is closing
            pass

    def observed(self) -> shadow.Observed:
        return shadow.Observed(self.latency_ms, self.code, "".join(self.parts))


async def main(stop: asyncio.Event) -> None:
    cfg = settings.load(RouterSettings, "router")
    log.configure("router", cfg.log_level)
    router = AliasRouter(cfg)
    await router.start()
    router.logger.info("router_ready", kinds=cfg.kinds, tables=len(router.tables.by_model))
    await stop.wait()
    await router.close()


def run() -> None:
    service.run(main)


if __name__ == "__main__":
    run()
