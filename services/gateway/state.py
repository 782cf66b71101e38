"""The gateway's running state: settings, bus, key store, catalogue, dispatcher."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import asyncpg
import msgspec
from aiohttp import web
from nats.micro.request import Request as MicroRequest

from contracts import headers as h
from contracts import subjects
from contracts.control import AdminError, CreateKeyReply, CreateKeyRequest, load_decoder
from contracts.errors import InferBusError
from services.gateway.auth import KeyRecord, KeyStore, bearer
from services.gateway.catalogue import Catalogue, ModelEntry
from services.gateway.dispatch import Dispatcher
from services.runtime import db, service, settings
from services.runtime import logging as log
from services.runtime.streaming import StreamClient

DEFAULT_MODELS = [ModelEntry(name="smollm2-135m-instruct", version="q4_1")]


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


class Gateway:
    def __init__(self, cfg: GatewaySettings) -> None:
        self.settings = cfg
        self.service = service.Service("inferbus-gateway", cfg, description="OpenAI-compatible edge")
        self.catalogue = Catalogue(cfg.models, per_worker=cfg.dispatch == "p2c")
        self.pool: asyncpg.Pool | None = None
        self.keys: KeyStore | None = None
        self._dispatcher: Dispatcher | None = None
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
        await self.service.register([("keys-create", subjects.ADMIN_KEYS_CREATE, self._create_key, "gateway")])

    @property
    def dispatcher(self) -> Dispatcher:
        assert self._dispatcher is not None, "gateway not started"
        return self._dispatcher

    async def close(self) -> None:
        await self.catalogue.tables.close()
        await self.service.close()
        if self.pool is not None:
            await self.pool.close()

    def stats(self) -> dict[str, Any]:
        return {"in_flight": self.in_flight, "models": len(self.catalogue.listing())}

    async def _on_heartbeat(self, msg: Any) -> None:
        try:
            self.catalogue.heard(load_decoder.decode(msg.data))
        except msgspec.DecodeError:
            self.logger.warning("bad_heartbeat", subject=msg.subject)

    async def _create_key(self, request: MicroRequest) -> None:
        try:
            body = msgspec.json.decode(request.data, type=CreateKeyRequest)
            if not body.name.strip():
                raise InferBusError("invalid_request", "name must not be empty")
            assert self.keys is not None
            key, record = await self.keys.create(body.name, body.scopes)
            reply = CreateKeyReply(key=key, key_id=record.id)
        except (msgspec.MsgspecError, InferBusError) as exc:
            code = getattr(exc, "code", "invalid_request")
            reply = CreateKeyReply(error=AdminError(code, str(exc)))
        await request.respond(msgspec.json.encode(reply))

    async def authorize(self, request: web.Request) -> KeyRecord:
        assert self.keys is not None
        return await self.keys.authenticate(bearer(request.headers.get("Authorization")))

    def trace_headers(self, request: web.Request) -> dict[str, str] | None:
        parent = request.headers.get("traceparent")
        return {h.TRACEPARENT: parent} if parent else None

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
