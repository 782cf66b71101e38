"""Service lifecycle: connect, register as a NATS micro service, serve /metrics, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from services.runtime import bus, metrics, tracing
from services.runtime import logging as log
from services.runtime.bus import EndpointStats, MicroService
from services.runtime.bus import MicroRequest as Request
from services.runtime.settings import CommonSettings, SettingsError

VERSION = "0.1.0"
# The cyclic collector's thresholds for a service process (gc.set_threshold; Python's are 700, 10, 10). At
# Python's, a gateway at ~4,000 requests/s ran a young collection every 1-2 ms and a full one (50 ms: every
# object startup made) every ~0.5 s: ~36 us of its ~200 us per request, for no garbage at all (a request's
# objects go by reference count). The count behind a young collection is allocations minus deallocations, so at
# 50,000 a process whose requests leave no cycles hardly collects; one that leaves some collects them in
# batches of that size. `settle` takes startup's objects out of the full collections. INFERBUS_GC_THRESHOLD=
# "g0,g1,g2" overrides ("python": Python's own).
GC_THRESHOLD = (50_000, 20, 100)
StatsSource = Callable[[], dict[str, Any]]
MicroHandler = Callable[[Request], Awaitable[None]]


class Service:
    """One running service process: its bus connection, micro registration and metrics port."""

    def __init__(self, name: str, settings: CommonSettings, *, description: str = "") -> None:
        self.name = name
        self.settings = settings
        self.description = description
        self.instance_id = uuid.uuid4().hex[:12]
        self.metadata: dict[str, str] = {}
        self.stats_source: StatsSource = dict
        self.nc: bus.Connection | None = None
        self.micro: MicroService | None = None
        self.metrics_port = 0
        self._metrics_runner: Any = None
        self._lag_task: asyncio.Task[None] | None = None
        self.stopping = asyncio.Event()
        self.logger = log.get(name)
        tracing.configure(name)  # when the OTEL_* variables ask for it

    @property
    def bus(self) -> bus.Connection:
        assert self.nc is not None, "service not started"
        return self.nc

    async def connect(self) -> None:
        self.nc = await bus.connect(
            self.settings.nats_url, f"{self.name}-{self.instance_id}", identity=bus.Identity.of(self.settings)
        )
        self._metrics_runner, self.metrics_port = await metrics.serve(
            self.settings.metrics_host, self.settings.metrics_port
        )
        self._lag_task = asyncio.create_task(metrics.sample_loop_lag(), name="event-loop-lag")
        self.logger.info("connected", nats=log.redact(self.settings.nats_url), metrics_port=self.metrics_port)

    async def register(self, endpoints: list[tuple[str, str, MicroHandler, str | None]]) -> None:
        """Register as a micro service. Each endpoint: (name, subject, handler, queue group)."""
        self.metadata.setdefault("instance", self.instance_id)
        self.metadata["metrics_port"] = str(self.metrics_port)
        self.micro = await bus.micro.add_service(
            self.bus,
            name=self.name,
            version=VERSION,
            description=self.description,
            metadata=self.metadata,
            stats_handler=self._stats,
        )
        await self.micro.add_endpoint(
            name="health", subject=f"admin.health.{self.name}.{self.micro.id}", handler=self._health
        )
        for name, subject, handler, queue in endpoints:
            await self.micro.add_endpoint(name=name, subject=subject, handler=handler, queue_group=queue)
        await self.bus.flush()
        settle()

    def _stats(self, _: EndpointStats) -> dict[str, Any]:
        return self.stats_source()

    async def _health(self, request: Request) -> None:
        await request.respond(json.dumps({"status": "ok", **self.stats_source()}).encode())

    async def close(self) -> None:
        if self.micro is not None:
            await self.micro.stop()
        if self.nc is not None and not self.nc.is_closed:
            try:
                await asyncio.wait_for(self.nc.drain(), timeout=5)
            except Exception:  # a timeout included: close what is left
                await self.nc.close()
        if self._lag_task is not None:
            self._lag_task.cancel()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        if tracing.tracer is not None:
            await asyncio.to_thread(tracing.shutdown)  # the spans still queued go out
        self.logger.info("stopped")


def gc_threshold() -> tuple[int, ...] | None:
    """The collector thresholds this process runs with (None: Python's own)."""
    raw = os.environ.get("INFERBUS_GC_THRESHOLD", "").strip()
    if not raw:
        return GC_THRESHOLD
    if raw == "python":
        return None
    try:
        values = tuple(int(v) for v in raw.split(","))
    except ValueError:
        values = ()
    if not 1 <= len(values) <= 3 or min(values) < 1:
        raise SettingsError(f"INFERBUS_GC_THRESHOLD must be 1-3 positive integers (g0,g1,g2) or 'python', not {raw!r}")
    return values


def settle() -> None:
    """Once a service has started: what startup made (imported modules, settings, a loaded engine) leaves the
    collector's generations for good (gc.freeze), so no later collection walks it again. Call when ready; again
    after loading more (a worker's engine)."""
    gc.collect()
    gc.freeze()


def run(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run `main(stop)` until it returns; SIGTERM/SIGINT set `stop` so it can drain."""
    threshold = gc_threshold()
    if threshold is not None:
        gc.set_threshold(*threshold)

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    with asyncio.Runner(loop_factory=loop_factory()) as loop_runner:
        loop_runner.run(runner())


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop (measured faster on the request path, bench/bench_floor.py) unless INFERBUS_UVLOOP=0."""
    if os.environ.get("INFERBUS_UVLOOP", "1") in ("0", "false"):
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
