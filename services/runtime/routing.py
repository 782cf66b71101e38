"""Traffic routing shared by the gateway and the alias router.

- `Presence`: live workers from their heartbeats (out of routing after `ttl` s of silence), with the
  caller's own count of requests outstanding on each, and power-of-two-choices worker selection.
- `Tables`: the registry's routing tables, watched in the NATS KV bucket and held in memory, so
  routing keeps working from the last table while the registry is down.
- `pick_version` / `shadow_sampled`: a table's traffic policy applied to one request.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Callable
from typing import NamedTuple

import msgspec

from contracts import subjects
from contracts.control import WorkerLoad
from contracts.errors import InferBusError
from contracts.registry import RoutingTable, TrafficPolicy, table_decoder
from services.runtime import bus
from services.runtime import logging as log
from services.runtime.bus import JetStreamContext, KeyValue

PRESENCE_TTL = 3.0


class Route(NamedTuple):
    version: str
    subject: str
    worker_id: str | None  # None: the version's queue group picks
    shadow: str | None  # shadow version to copy this request to, if sampled


def fraction(key: str) -> float:
    """A stable point in [0, 100) for a sticky key (same key, same point, on every process)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 * 100


class Latency:
    """Moving averages of time to first token and inter-token latency per version, as this process saw them."""

    ALPHA = 0.2  # weight of the newest observation
    TOKENS = 16  # score = TTFT + TOKENS x inter-token latency: a short answer's time to its end

    def __init__(self) -> None:
        self.by_version: dict[tuple[str, str, str], tuple[float, float, int]] = {}  # (ttft, itl, samples)

    def observe(self, kind: str, model: str, version: str, ttft_ms: float, itl_ms: float) -> None:
        key = (kind, model, version)
        old = self.by_version.get(key)
        if old is None:
            self.by_version[key] = (ttft_ms, itl_ms, 1)
        else:
            a = self.ALPHA
            self.by_version[key] = (old[0] + a * (ttft_ms - old[0]), old[1] + a * (itl_ms - old[1]), old[2] + 1)

    def score(self, kind: str, model: str, version: str) -> float | None:
        seen = self.by_version.get((kind, model, version))
        return None if seen is None else seen[0] + self.TOKENS * seen[1]


class Signals:
    """What the latency, cost and least-busy strategies rank pool versions by."""

    EXPLORE = 0.05  # share of requests that try a random pool version (keeps every average fresh)

    def __init__(self, presence: Presence, latency: Latency | None = None) -> None:
        self.presence = presence
        self.latency = latency or Latency()
        # (model, version) -> USD per token (input + output); set from the price list by the gateway.
        self.price: Callable[[str, str], float | None] = lambda model, version: None

    def busy(self, kind: str, model: str, version: str) -> float:
        loads = [w for w in self.presence.live(kind, model, version) if w.ready]
        return min((self.presence.load_score(w) for w in loads), default=float("inf"))


def ranked(
    table: RoutingTable, signals: Signals | None, rnd: Callable[[], float] = random.random
) -> list[str]:
    """The pool's versions, best first, under the model's strategy."""
    routing = table.policy.routing
    pool = routing.pool
    versions = list(pool)
    if len(versions) <= 1 or signals is None:
        return versions
    kind, model = table.kind, table.model
    strategy = routing.strategy
    if strategy == "weighted":
        total = sum(pool.values())
        point, first = rnd() * total, versions[-1]
        for version, weight in pool.items():
            point -= weight
            if point < 0:
                first = version
                break
        return [first, *sorted((v for v in versions if v != first), key=lambda v: -pool[v])]
    if strategy == "least_busy":
        return sorted(versions, key=lambda v: signals.busy(kind, model, v))
    if strategy == "latency":
        if rnd() < Signals.EXPLORE:
            random.shuffle(versions)
            return versions
        scores = {v: signals.latency.score(kind, model, v) for v in versions}
        return sorted(versions, key=lambda v: (scores[v] is not None, scores[v] or 0.0))  # unmeasured first
    prices = {v: signals.price(model, v) for v in versions}  # cost: unknown prices last, then by latency
    return sorted(versions, key=lambda v: (prices[v] is None, prices[v] or 0.0,
                                           signals.latency.score(kind, model, v) or 0.0))


def pick_version(
    table: RoutingTable,
    sticky: str | None = None,
    rnd: Callable[[], float] = random.random,
    signals: Signals | None = None,
) -> str:
    """The version that serves one request under the table's policy."""
    policy = table.policy
    if policy.ab:
        point = fraction(f"{table.model}\0{sticky}") if sticky is not None else rnd() * 100
        total = 0.0
        for version, weight in policy.ab.items():
            total += weight
            if point < total:
                return version
        return next(reversed(policy.ab))
    if policy.canary and policy.canary_weight > 0 and rnd() * 100 < policy.canary_weight:
        return policy.canary
    if policy.routing.pool:
        return ranked(table, signals, rnd)[0]
    if policy.stable is None:
        if policy.canary and policy.canary_weight > 0:
            return policy.canary
        raise InferBusError("no_worker", f"the model '{table.model}' has no deployed version")
    return policy.stable


def shadow_sampled(policy: TrafficPolicy, rnd: Callable[[], float] = random.random) -> str | None:
    if policy.shadow and policy.shadow_rate > 0 and rnd() * 100 < policy.shadow_rate:
        return policy.shadow
    return None


class Seen(NamedTuple):
    load: WorkerLoad
    at: float


class Presence:
    """Workers heard from recently, by (kind, model, version); a silent worker drops out after `ttl` s."""

    def __init__(self, ttl: float = PRESENCE_TTL) -> None:
        self.ttl = ttl
        self.workers: dict[tuple[str, str, str], dict[str, Seen]] = {}
        self.outstanding: dict[str, int] = {}

    def heard(self, load: WorkerLoad) -> None:
        self.workers.setdefault((load.kind, load.model, load.version), {})[load.worker_id] = Seen(
            load, time.monotonic()
        )

    def forget(self, worker_id: str) -> None:
        """Drop a worker at once (its per-worker subject had no responders: it is gone)."""
        for seen in self.workers.values():
            seen.pop(worker_id, None)

    def live(self, kind: str, model: str, version: str | None = None) -> list[WorkerLoad]:
        now = time.monotonic()
        if version is not None:  # the request path's case: one lookup, not a scan of every model's workers
            seen = self.workers.get((kind, model, version))
            if not seen:
                return []
            loads = [s.load for s in seen.values() if now - s.at <= self.ttl]
            if len(loads) < len(seen):
                for worker_id in [w for w, s in seen.items() if now - s.at > self.ttl]:
                    del seen[worker_id]
            return loads
        out: list[WorkerLoad] = []
        for (k, m, _), seen in self.workers.items():
            if k != kind or m != model:
                continue
            for worker_id in [w for w, s in seen.items() if now - s.at > self.ttl]:
                del seen[worker_id]
            out.extend(s.load for s in seen.values())
        return out

    def models(self) -> set[tuple[str, str]]:
        return {(k, m) for (k, m, _), seen in self.workers.items() if seen}

    def age(self, worker_id: str) -> float | None:
        now = time.monotonic()
        for seen in self.workers.values():
            if worker_id in seen:
                return now - seen[worker_id].at
        return None

    def load_score(self, load: WorkerLoad) -> float:
        # Our own outstanding count is exact and immediate; the heartbeat adds what other callers
        # sent (it lags up to a second, so take the larger of the two rather than their sum).
        busy = max(self.outstanding.get(load.worker_id, 0), load.in_flight + load.queued)
        return busy / max(load.capacity, 1)

    def choose(
        self,
        kind: str,
        model: str,
        version: str,
        affinity: str | None = None,
        exclude: frozenset[str] = frozenset(),
    ) -> WorkerLoad | None:
        """Power of two choices on live load; with `affinity`, the same key keeps its worker while healthy."""
        candidates = [w for w in self.live(kind, model, version) if w.ready and w.worker_id not in exclude]
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        if affinity is not None:  # rendezvous hashing: stable while the set of healthy workers is
            return max(candidates, key=lambda w: fraction(f"{affinity}\0{w.worker_id}"))
        a, b = random.sample(candidates, 2)
        return a if self.load_score(a) <= self.load_score(b) else b

    def acquire(self, worker_id: str) -> None:
        self.outstanding[worker_id] = self.outstanding.get(worker_id, 0) + 1

    def release(self, worker_id: str) -> None:
        left = self.outstanding.get(worker_id, 0) - 1
        if left > 0:
            self.outstanding[worker_id] = left
        else:
            self.outstanding.pop(worker_id, None)


class Router:
    """Tables + presence: the whole routing decision for one request."""

    def __init__(self, presence: Presence, tables: Tables, *, per_worker: bool = True) -> None:
        self.presence = presence
        self.tables = tables
        self.signals = Signals(presence)
        # False: always the version's queue group (NATS picks at random), no load-aware choice.
        self.per_worker = per_worker

    def route(
        self,
        kind: str,
        model: str,
        *,
        version: str | None = None,
        sticky: str | None = None,
        affinity: str | None = None,
        exclude: frozenset[str] = frozenset(),
    ) -> Route | None:
        """None when the registry has no table for the model (the caller falls back to its own config)."""
        table = self.tables.get(kind, model)
        if table is None and version is None:
            return None
        shadow = None
        if version is None:
            assert table is not None
            version = pick_version(table, sticky, signals=self.signals)
            shadow = shadow_sampled(table.policy)
        return self.to_worker(kind, model, version, affinity, exclude, shadow)

    def to_worker(
        self,
        kind: str,
        model: str,
        version: str,
        affinity: str | None = None,
        exclude: frozenset[str] = frozenset(),
        shadow: str | None = None,
    ) -> Route:
        worker = self.presence.choose(kind, model, version, affinity, exclude) if self.per_worker else None
        if worker is None:
            return Route(version, subjects.infer(kind, model, version), None, shadow)
        return Route(version, subjects.infer(kind, model, version, worker.worker_id), worker.worker_id, shadow)


class Tables:
    """The registry's routing tables, watched in KV; the last table is kept if the registry goes away."""

    def __init__(self) -> None:
        self.by_model: dict[tuple[str, str], RoutingTable] = {}
        self.updated = asyncio.Event()
        self.logger = log.get("routing")
        self._task: asyncio.Task[None] | None = None
        self._watcher: KeyValue.KeyWatcher | None = None

    def get(self, kind: str, model: str) -> RoutingTable | None:
        return self.by_model.get((kind, model))

    def apply(self, table: RoutingTable) -> None:
        current = self.by_model.get((table.kind, table.model))
        if current is None or table.revision >= current.revision:
            self.by_model[(table.kind, table.model)] = table
            self.updated.set()
            self.updated = asyncio.Event()

    async def watch(self, js: JetStreamContext) -> None:
        kv = await routing_bucket(js)
        self._watcher = await kv.watchall()
        ready = asyncio.Event()
        self._task = asyncio.create_task(self._follow(self._watcher, ready))
        async with asyncio.timeout(10):
            await ready.wait()

    async def _follow(self, watcher: KeyValue.KeyWatcher, ready: asyncio.Event) -> None:
        async for entry in watcher:
            if entry is None:  # end of the initial values
                ready.set()
                continue
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                self._drop(entry.key)
            else:
                try:
                    self.apply(table_decoder.decode(entry.value))
                except msgspec.DecodeError:
                    self.logger.warning("bad_routing_table", key=entry.key)
            if entry.delta == 0:
                ready.set()

    def _drop(self, key: str) -> None:
        for kind, model in list(self.by_model):
            if subjects.routing_key(kind, model) == key:
                del self.by_model[(kind, model)]

    async def close(self) -> None:
        if self._watcher is not None:
            try:
                await self._watcher.stop()  # type: ignore[no-untyped-call]
            except Exception:  # the connection may already be closed
                pass
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def routing_bucket(js: JetStreamContext) -> KeyValue:
    """The routing KV bucket, created on first use by whichever service comes up first."""
    try:
        return await js.key_value(subjects.ROUTING_BUCKET)
    except bus.js_errors.BucketNotFoundError:
        return await js.create_key_value(bucket=subjects.ROUTING_BUCKET, history=5, description="InferBus routing")
