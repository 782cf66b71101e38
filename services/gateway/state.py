"""The gateway's running state: settings, bus, key store, catalogue, dispatcher."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import asyncpg
import msgspec
from aiohttp import web

from contracts import headers as h
from contracts import subjects, usage
from contracts.control import Reply, load_decoder
from contracts.llm import GenerateRequest
from contracts.tenancy import (
    CreateKey,
    CreateTenant,
    Limits,
    ListKeys,
    ListTenants,
    RevokeKey,
    RotateKey,
    UpdateKey,
    UpdateTenant,
    revoked_decoder,
)
from contracts.usage import ListPrices, PriceView
from services.gateway.auth import KeyRecord, KeyStore, bearer
from services.gateway.catalogue import Catalogue, ModelEntry
from services.gateway.dispatch import Dispatcher
from services.gateway.governance import Governor, Grant
from services.gateway.tenancy import TenancyAdmin
from services.runtime import admin, db, service, settings
from services.runtime import logging as log
from services.runtime.streaming import StreamClient

DEFAULT_MODELS = [
    ModelEntry(name="smollm2-135m-instruct", version="q4_1"),
    ModelEntry(name="whisper-tiny-en", version="int8", kind="asr"),
    ModelEntry(name="hibari", version="v0-2", kind="tts"),
]


class GatewaySettings(settings.CommonSettings, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8080
    admin_key: str | None = None
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 512
    request_timeout_s: float = 600.0
    max_request_timeout_s: float = 3600.0
    first_chunk_timeout_s: float = 3.0
    idle_timeout_s: float = 1.5
    ws_max_in_flight: int = 64
    key_cache_ttl_s: float = 5.0
    models: list[ModelEntry] = msgspec.field(default_factory=lambda: list(DEFAULT_MODELS))
    # "p2c": pick the less loaded of two live workers (per-worker subjects); "queue": the version's
    # NATS queue group picks at random.
    dispatch: Literal["p2c", "queue"] = "p2c"
    # OpenAI model names clients send, served by ours.
    model_aliases: dict[str, str] = msgspec.field(
        default_factory=lambda: {
            "whisper-1": "whisper-tiny-en",
            "gpt-4o-transcribe": "whisper-tiny-en",
            "gpt-4o-mini-transcribe": "whisper-tiny-en",
            "tts-1": "hibari",
            "tts-1-hd": "hibari",
            "gpt-4o-mini-tts": "hibari",
        }
    )
    max_audio_bytes: int = 25 << 20  # uploads to /v1/audio/* (OpenAI's limit)
    max_audio_seconds: float = 900.0
    max_speech_chars: int = 4096  # /v1/audio/speech input (OpenAI's limit)
    # Rate limits and budgets (Redis). Off: no per-request Redis round trip at all.
    governance: bool = True
    # When Redis is unreachable: "open" admits requests (unlimited, logged, counted), "closed" answers 503.
    rate_limit_failure: Literal["open", "closed"] = "open"
    global_limits: Limits = Limits()
    endpoint_limits: dict[str, Limits] = msgspec.field(default_factory=dict)


class Gateway:
    def __init__(self, cfg: GatewaySettings) -> None:
        self.settings = cfg
        self.service = service.Service("inferbus-gateway", cfg, description="OpenAI-compatible edge")
        self.catalogue = Catalogue(cfg.models, per_worker=cfg.dispatch == "p2c")
        self.pool: asyncpg.Pool | None = None
        self.keys: KeyStore | None = None
        self.tenancy: TenancyAdmin | None = None
        self.governor: Governor | None = None
        self._dispatcher: Dispatcher | None = None
        self._prices_task: asyncio.Task[None] | None = None
        self.in_flight = 0
        self.logger = log.get("gateway")

    async def start(self) -> None:
        cfg = self.settings
        await self.service.connect()
        self.pool = await db.connect(cfg.database_url)
        applied = await db.migrate(self.pool, "services.gateway", "gateway")
        if applied:
            self.logger.info("migrations_applied", files=applied)
        self.keys = KeyStore(self.pool, cache_ttl=cfg.key_cache_ttl_s)
        if cfg.admin_key:
            await self.keys.create("admin (bootstrap)", ["admin", "inference"], key=cfg.admin_key)
        nc = self.service.bus
        self.tenancy = TenancyAdmin(self.pool, nc)
        if cfg.governance:
            self.governor = Governor(
                cfg.redis_url,
                failure=cfg.rate_limit_failure,
                global_limits=cfg.global_limits,
                endpoint_limits=cfg.endpoint_limits,
                stale_s=cfg.max_request_timeout_s + 60,
            )
        if self.governor is not None:
            await nc.subscribe(usage.PRICES_CHANGED, cb=self._on_prices_changed)
            self._prices_task = asyncio.create_task(self._prices_loop())
        await nc.subscribe(subjects.ADMIN_KEYS_REVOKED, cb=self._on_revoked)
        await nc.subscribe(subjects.ADMIN_KEYS_CHANGED, cb=self._on_changed)
        await nc.subscribe(subjects.HEARTBEAT_ALL, cb=self._on_heartbeat)
        try:
            await self.catalogue.tables.watch(nc.jetstream())
        except Exception as exc:  # JetStream off: serve the configured models only
            self.logger.warning("routing_tables_unavailable", error=repr(exc))
        client = StreamClient(nc, first_chunk_timeout=cfg.first_chunk_timeout_s, idle_timeout=cfg.idle_timeout_s)
        await client.start()
        self._dispatcher = Dispatcher(client, self.catalogue)
        self.service.stats_source = self.stats
        self.service.metadata.update({"http": f"http://{cfg.host}:{cfg.port}"})
        t = self.tenancy
        operations: list[tuple[str, type[Any], Any]] = [
            ("keys.create", CreateKey, t.create_key),
            ("keys.list", ListKeys, t.list_keys),
            ("keys.revoke", RevokeKey, t.revoke_key),
            ("keys.rotate", RotateKey, t.rotate_key),
            ("keys.update", UpdateKey, t.update_key),
            ("tenants.create", CreateTenant, t.create_tenant),
            ("tenants.list", ListTenants, t.list_tenants),
            ("tenants.update", UpdateTenant, t.update_tenant),
        ]
        await self.service.register(
            [
                (op.replace(".", "-"), subjects.admin(op), admin.handler(self.logger, typ, fn), "gateway")
                for op, typ, fn in operations
            ]
        )

    @property
    def dispatcher(self) -> Dispatcher:
        assert self._dispatcher is not None, "gateway not started"
        return self._dispatcher

    async def close(self) -> None:
        if self._prices_task is not None:
            self._prices_task.cancel()
        await self.catalogue.tables.close()
        if self.governor is not None:
            await self.governor.close()
        await self.service.close()
        if self.pool is not None:
            await self.pool.close()

    def stats(self) -> dict[str, Any]:
        prices = self.governor.prices.per_model if self.governor is not None else {}
        return {"in_flight": self.in_flight, "models": len(self.catalogue.listing()), "priced_models": sorted(prices)}

    async def _on_heartbeat(self, msg: Any) -> None:
        try:
            self.catalogue.heard(load_decoder.decode(msg.data))
        except msgspec.DecodeError:
            self.logger.warning("bad_heartbeat", subject=msg.subject)

    async def refresh_prices(self) -> bool:
        """Prices for money budgets, from the metering service: per model, the dearest version (upper bound)."""
        assert self.governor is not None
        try:
            msg = await self.service.bus.request(usage.PRICES_LIST, msgspec.json.encode(ListPrices()), timeout=2)
            reply = msgspec.json.decode(msg.data, type=Reply)
            views = msgspec.convert(reply.result or [], list[PriceView])
        except Exception as exc:  # metering not up (yet): keep the last prices
            self.logger.debug("prices_unavailable", error=repr(exc))
            return False
        per_model: dict[str, tuple[float, float]] = {}
        for view in views:
            old_in, old_out = per_model.get(view.model, (0.0, 0.0))
            per_model[view.model] = (max(old_in, view.input_per_1m / 1e6), max(old_out, view.output_per_1m / 1e6))
        self.governor.prices.per_model = per_model
        return True

    async def _prices_loop(self) -> None:
        while True:
            await self.refresh_prices()
            await asyncio.sleep(30)

    async def _on_prices_changed(self, msg: Any) -> None:
        await self.refresh_prices()

    async def _on_revoked(self, msg: Any) -> None:
        try:
            event = revoked_decoder.decode(msg.data)
        except msgspec.DecodeError:
            self.logger.warning("bad_revocation", subject=msg.subject)
            return
        assert self.keys is not None
        self.keys.heard_revoked(event)

    async def _on_changed(self, msg: Any) -> None:
        assert self.keys is not None
        try:
            what = msgspec.json.decode(msg.data, type=dict[str, str])
        except msgspec.DecodeError:
            return
        self.keys.forget(key_id=what.get("key_id"), tenant_id=what.get("tenant_id"))

    async def admit(self, key: KeyRecord, endpoint: str, request: GenerateRequest, kind: str = "llm") -> Grant | None:
        """Scopes, rate limits and budgets for one generation; None when governance is off."""
        key.authorize(kind, request.model)
        if self.governor is None:
            return None
        return await self.governor.admit(key, endpoint, request)

    async def admit_request(
        self, key: KeyRecord, endpoint: str, kind: str, model: str, request_id: str
    ) -> Grant | None:
        """Scopes, requests/min and concurrency for speech; `release` frees the slot when the request ends."""
        key.authorize(kind, model)
        if self.governor is None:
            return None
        return await self.governor.admit_request(key, endpoint, model, request_id)

    def release(self, key: KeyRecord, grant: Grant | None, model: str) -> None:
        if grant is not None and self.governor is not None:
            self.governor.settle_later(key.id, grant, 0, 0, model)

    def bus_headers(self, request: web.Request | None, key: KeyRecord) -> dict[str, str]:
        hdrs = {h.KEY_ID: key.id, h.TENANT: key.tenant_id}
        parent = request.headers.get("traceparent") if request is not None else None
        if parent:
            hdrs[h.TRACEPARENT] = parent
        return hdrs

    async def authorize(self, request: web.Request) -> KeyRecord:
        assert self.keys is not None
        return await self.keys.authenticate(bearer(request.headers.get("Authorization")))

    async def readiness(self) -> list[str]:
        problems = []
        if not self.service.nc or not self.service.nc.is_connected:
            problems.append("nats: not connected")
        try:
            assert self.pool is not None
            async with asyncio.timeout(1.0):
                await self.pool.fetchval("SELECT 1")
        except Exception as exc:
            problems.append(f"postgres: {type(exc).__name__}")
        return problems


GATEWAY = web.AppKey("gateway", Gateway)
