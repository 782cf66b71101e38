"""Alias router: serves `infer.<kind>.<model>` for plain NATS publishers.

Each request is forwarded, bytes and headers untouched, to the worker the registry's policy and
live load pick (`infer.<kind>.<model>.<version>[.<worker>]`) with the caller's own reply subject, so
the worker streams straight back to the caller: the router adds one hop on the way in, none on the
way out. A sampled request is also copied to the shadow version; for those the router listens on
the caller's inbox too, to compare the served output with the shadow's.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
from nats.aio.msg import Msg
from prometheus_client import Counter

from contracts import headers as h
from contracts import subjects
from contracts.control import load_decoder
from contracts.errors import InferBusError
from contracts.llm import Delta, ErrorChunk, Final, chunk_decoder, chunk_encoder, request_decoder
from services.runtime import logging as log
from services.runtime import service, settings, shadow
from services.runtime.routing import Presence, Router, Tables
from services.runtime.streaming import StreamClient

FORWARDED = Counter("inferbus_router_forwarded_total", "Requests forwarded by the alias router", ["model", "version"])
REFUSED = Counter("inferbus_router_refused_total", "Requests the alias router answered with an error", ["code"])


class RouterSettings(settings.CommonSettings, kw_only=True, forbid_unknown_fields=True):
    kinds: list[str] = msgspec.field(default_factory=lambda: ["llm"])
    shadow_timeout_s: float = 120.0


class AliasRouter:
    def __init__(self, cfg: RouterSettings) -> None:
        self.cfg = cfg
        self.service = service.Service("inferbus-router", cfg, description="Model alias router")
        self.presence = Presence()
        self.tables = Tables()
        self.router = Router(self.presence, self.tables)
        self.forwarded = 0
        self._client: StreamClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.logger = log.get("router")

    async def start(self) -> None:
        await self.service.connect()
        nc = self.service.bus
        await nc.subscribe(subjects.HEARTBEAT_ALL, cb=self._on_heartbeat)
        await self.tables.watch(nc.jetstream())
        self._client = StreamClient(nc)
        await self._client.start()
        for kind in self.cfg.kinds:
            await nc.subscribe(subjects.alias_all(kind), queue="inferbus-router", cb=self._on_request)
        self.service.stats_source = lambda: {"forwarded": self.forwarded, "tables": len(self.tables.by_model)}
        await self.service.register([])

    async def close(self) -> None:
        await self.tables.close()
        for task in list(self._tasks):
            task.cancel()
        await self.service.close()

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            self.presence.heard(load_decoder.decode(msg.data))
        except msgspec.DecodeError:
            self.logger.warning("bad_heartbeat", subject=msg.subject)

    async def _on_request(self, msg: Msg) -> None:
        nc = self.service.bus
        if not msg.reply:
            REFUSED.labels("no_reply").inc()
            return
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
        except (InferBusError, msgspec.DecodeError) as exc:
            code, text = (exc.code, exc.message) if isinstance(exc, InferBusError) else ("invalid_request", str(exc))
            REFUSED.labels(code).inc()
            await nc.publish(msg.reply, chunk_encoder.encode(ErrorChunk(0, code, text)))
            return
        watch = await InboxWatch.start(nc, msg.reply) if route.shadow is not None else None
        await nc.publish(route.subject, msg.data, reply=msg.reply, headers=msg.headers)
        self.forwarded += 1
        FORWARDED.labels(model, route.version).inc()
        if watch is not None:
            assert route.shadow is not None
            self._spawn(self._shadow(msg, watch, kind, route.version, route.shadow))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shadow(self, msg: Msg, watch: InboxWatch, kind: str, version: str, shadow_version: str) -> None:
        """Run the copy on the shadow version while the served stream is watched; publish the comparison."""
        assert self._client is not None
        try:
            request = request_decoder.decode(msg.data)
        except msgspec.DecodeError:
            await watch.sub.unsubscribe()
            return
        deadline = time.time() + self.cfg.shadow_timeout_s
        copy = shadow.run_copy(self._client, kind, shadow.shadow_copy(request), shadow_version, deadline)
        try:
            async with asyncio.timeout(self.cfg.shadow_timeout_s):
                shadow_seen, served = await asyncio.gather(copy, watch.result())
            await shadow.publish(
                self.service.bus, shadow.compare(request, version, served, shadow_version, shadow_seen)
            )
        except TimeoutError:
            self.logger.warning("shadow_timeout", model=request.model, request_id=request.request_id)
        finally:
            await watch.sub.unsubscribe()


class InboxWatch:
    """Listens on a caller's inbox (subscribed before the request is forwarded) for the served output."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.parts: list[str] = []
        self.error: str | None = None
        self.done = asyncio.Event()
        self.sub: Any = None

    @classmethod
    async def start(cls, nc: Any, inbox: str) -> InboxWatch:
        watch = cls()
        watch.sub = await nc.subscribe(inbox, cb=watch._on_chunk)
        return watch

    async def _on_chunk(self, msg: Msg) -> None:
        try:
            chunk = chunk_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        if isinstance(chunk, Delta):
            self.parts.append(chunk.text)
        elif isinstance(chunk, ErrorChunk | Final):
            self.error = chunk.code if isinstance(chunk, ErrorChunk) else None
            self.done.set()

    async def result(self) -> shadow.Observed:
        await self.done.wait()
        return shadow.Observed((time.perf_counter() - self.started) * 1000, self.error, "".join(self.parts))


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
