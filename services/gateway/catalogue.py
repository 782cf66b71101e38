"""Which models exist and where a request goes: registry tables (watched in KV), configured entries, live workers."""

from __future__ import annotations

import time
from typing import Any

import msgspec

from contracts.control import WorkerLoad
from contracts.errors import InferBusError
from contracts.registry import RoutingTable
from services.runtime.routing import Presence, Route, Router, Tables, ranked


class ModelEntry(msgspec.Struct, frozen=True, kw_only=True):
    """A model the gateway serves without the registry (used when the registry has no table for it)."""

    name: str
    version: str
    kind: str = "llm"
    owned_by: str = "inferbus"


class Listed(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    kind: str
    version: str | None  # the stable (default) version
    owned_by: str
    table: RoutingTable | None
    workers: list[WorkerLoad]


class Catalogue:
    def __init__(self, configured: list[ModelEntry], *, per_worker: bool = True) -> None:
        self.configured = {m.name: m for m in configured}
        self.created = int(time.time())
        self.presence = Presence()
        self.tables = Tables()
        self.router = Router(self.presence, self.tables, per_worker=per_worker)

    def heard(self, load: WorkerLoad) -> None:
        self.presence.heard(load)

    def route(
        self,
        model: str,
        kind: str = "llm",
        *,
        key_id: str | None = None,
        user: str | None = None,
        affinity: str | None = None,
        version: str | None = None,
        exclude: frozenset[str] = frozenset(),
    ) -> Route:
        """The registry's policy when it has a table for the model; else the configured or live version."""
        table = self.tables.get(kind, model)
        if table is not None and version is None:
            sticky = user if table.policy.sticky == "user" else key_id
            route = self.router.route(kind, model, sticky=sticky, affinity=affinity, exclude=exclude)
            assert route is not None
            return route
        if version is None:
            entry = self.configured.get(model)
            if entry is not None and entry.kind == kind:
                version = entry.version
            else:
                live = self.presence.live(kind, model)
                if not live:
                    raise InferBusError("model_not_found", f"The model '{model}' does not exist", param="model")
                version = live[0].version
        return self.router.to_worker(kind, model, version, affinity, exclude)

    def alternatives(self, model: str, kind: str, first: str) -> list[tuple[str, str | None]]:
        """Where a request for `model` goes when `first` fails: a canary's stable version, the pool's other
        versions best first, then each fallback model (version None: its own policy picks)."""
        table = self.tables.get(kind, model)
        if table is None:
            return []
        out: list[tuple[str, str | None]] = []
        stable = table.policy.stable
        if first == table.policy.canary and stable is not None and stable not in table.policy.routing.pool:
            out.append((model, stable))
        out += [(model, v) for v in ranked(table, self.router.signals) if v != first]
        out += [(m, None) for m in table.policy.routing.fallbacks]
        return out

    def served_versions(self, kind: str, model: str) -> set[str]:
        """The versions the model's routing serves now (a cached answer from another one is stale)."""
        table = self.tables.get(kind, model)
        if table is None:
            entry = self.configured.get(model)
            return {entry.version} if entry is not None else set()
        policy = table.policy
        return {v for v in (policy.stable, policy.canary, *policy.ab, *policy.routing.pool) if v}

    def engine_of(self, kind: str, model: str, version: str, worker_id: str) -> str | None:
        """The engine (provider) a worker runs, from its heartbeats."""
        seen = self.presence.workers.get((kind, model, version), {}).get(worker_id)
        return seen.load.engine if seen is not None else None

    def live_workers(self) -> list[tuple[WorkerLoad, float]]:
        """Every worker heard from within the presence TTL, with the seconds since its last heartbeat."""
        now, ttl = time.monotonic(), self.presence.ttl
        return [(s.load, now - s.at) for seen in self.presence.workers.values() for s in seen.values()
                if now - s.at <= ttl]

    def listing(self) -> list[Listed]:
        names: dict[tuple[str, str], str] = {}
        for kind, model in self.tables.by_model:
            names[(kind, model)] = "inferbus"
        for entry in self.configured.values():
            names.setdefault((entry.kind, entry.name), entry.owned_by)
        for kind, model in self.presence.models():
            names.setdefault((kind, model), "inferbus")
        out = []
        for (kind, model), owner in sorted(names.items(), key=lambda kv: kv[0][1]):
            table = self.tables.get(kind, model)
            workers = self.presence.live(kind, model)
            if table is not None:
                version = table.policy.stable or next(iter(table.policy.ab), None)
            elif model in self.configured:
                version = self.configured[model].version
            else:
                version = workers[0].version if workers else None
            out.append(Listed(name=model, kind=kind, version=version, owned_by=owner, table=table, workers=workers))
        return out

    def describe(self, item: Listed) -> dict[str, Any]:
        """An OpenAI model object, with InferBus's versions, traffic policy and live workers alongside."""
        policy = item.table.policy if item.table else None
        return {
            "id": item.name,
            "object": "model",
            "created": self.created,
            "owned_by": item.owned_by,
            "kind": item.kind,
            "version": item.version,
            "workers": len(item.workers),
            "inferbus": {
                "versions": item.table.versions if item.table else ([item.version] if item.version else []),
                "revision": item.table.revision if item.table else None,
                "policy": msgspec.to_builtins(policy) if policy else None,
                "live_workers": [
                    {
                        "worker_id": w.worker_id,
                        "version": w.version,
                        "in_flight": w.in_flight,
                        "queued": w.queued,
                        "capacity": w.capacity,
                        "tokens_per_s": w.tokens_per_s,
                        "healthy": w.ready,
                        "engine": w.engine,
                        **({"upstream": w.upstream} if w.upstream is not None else {}),
                    }
                    for w in item.workers
                ],
            },
        }
