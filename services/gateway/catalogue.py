"""Which models exist and which version serves each: configured entries plus live worker heartbeats."""

from __future__ import annotations

import time

import msgspec

from contracts.control import WorkerLoad
from contracts.errors import InferBusError

PRESENCE_TTL = 3.0


class ModelEntry(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    version: str
    kind: str = "llm"
    owned_by: str = "inferbus"


class Catalogue:
    def __init__(self, configured: list[ModelEntry]) -> None:
        self.configured = {m.name: m for m in configured}
        self.created = int(time.time())
        # model -> worker_id -> (load, seen at)
        self.live: dict[str, dict[str, tuple[WorkerLoad, float]]] = {}

    def heard(self, load: WorkerLoad) -> None:
        self.live.setdefault(load.model, {})[load.worker_id] = (load, time.monotonic())

    def workers(self, model: str) -> list[WorkerLoad]:
        now = time.monotonic()
        seen = self.live.get(model, {})
        for worker_id in [w for w, (_, t) in seen.items() if now - t > PRESENCE_TTL]:
            del seen[worker_id]
        return [load for load, _ in seen.values()]

    def resolve(self, model: str, kind: str = "llm") -> ModelEntry:
        entry = self.configured.get(model)
        if entry is None or entry.kind != kind:
            live = [w for w in self.workers(model) if w.kind == kind]
            if not live:
                raise InferBusError("model_not_found", f"The model '{model}' does not exist", param="model")
            entry = ModelEntry(name=model, version=live[0].version, kind=kind)
        return entry

    def listing(self) -> list[tuple[ModelEntry, list[WorkerLoad]]]:
        names = set(self.configured) | set(self.live)
        out = []
        for name in sorted(names):
            workers = self.workers(name)
            entry = self.configured.get(name) or (
                ModelEntry(name=name, version=workers[0].version, kind=workers[0].kind) if workers else None
            )
            if entry is not None:
                out.append((entry, workers))
        return out
