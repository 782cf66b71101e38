"""The gateway's running state: settings, bus, key store, catalogue, dispatcher."""

from __future__ import annotations

import array
import asyncio
import secrets
import time
from collections.abc import AsyncGenerator, Mapping
from typing import Any, Literal, Protocol

import asyncpg
import msgspec
from aiohttp import web

from contracts import headers as h
from contracts import subjects, usage
from contracts.control import Reply, load_decoder
from contracts.embed import EmbedDone, EmbedRequest, Vectors, embed_chunk_decoder, embed_encoder
from contracts.errors import InferBusError
from contracts.llm import GenerateRequest, Usage
from contracts.requestlog import MAX_BODY_CHARS, MAX_FALLBACKS, RequestRecord
from contracts.tenancy import (
    DEFAULT_LOG_RETENTION_DAYS,
    CreateKey,
    CreateTenant,
    Limits,
    ListKeys,
    ListTenants,
    RevokeKey,
    RotateKey,
    UpdateKey,
    UpdateTenant,
    body_logging,
    revoked_decoder,
)
from contracts.usage import ListPrices, PriceView
from services.gateway.auth import KeyRecord, KeyStore, bearer
from services.gateway.cache import CacheSettings, ResponseCache
from services.gateway.cache import mode as cache_mode
from services.gateway.catalogue import Catalogue, ModelEntry
from services.gateway.dispatch import CacheUse, Dispatcher, Served
from services.gateway.governance import Governor, Grant
from services.gateway.nats_edge import Callout, Edge, Kicker
from services.gateway.tenancy import TenancyAdmin
from services.runtime import admin, bus, db, requestlog, service, settings, tracing
from services.runtime import logging as log
from services.runtime.breakers import Breakers
from services.runtime.natsauth import Issuer
from services.runtime.resp import Resp
from services.runtime.streaming import StreamClient

DEFAULT_MODELS = [
    ModelEntry(name="smollm2-135m-instruct", version="q4_1"),
    ModelEntry(name="whisper-tiny-en", version="int8", kind="asr"),
    ModelEntry(name="hibari", version="v0-2", kind="tts"),
]


class Revocable(Protocol):
    def revoked(self) -> None: ...


class OpenSockets:
    """Open WebSockets by key id: a key's revocation (or expiry) closes the sockets it opened, at its time."""

    def __init__(self, remember_s: float = 120.0) -> None:
        self.remember_s = remember_s
        self._by_key: dict[str, set[Revocable]] = {}
        self._expiry: dict[Revocable, asyncio.TimerHandle] = {}
        self._revoked: dict[str, float] = {}  # key id -> refused from (unix s), for sockets that open meanwhile
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def add(self, key: KeyRecord, sock: Revocable) -> None:
        self._by_key.setdefault(key.id, set()).add(sock)
        loop = asyncio.get_running_loop()
        if key.expires_at is not None:
            self._expiry[sock] = loop.call_later(max(key.expires_at - time.time(), 0.0), sock.revoked)
        at = self._revoked.get(key.id)
        if at is not None and key.id not in self._timers:  # revoked while this socket was opening
            self._timers[key.id] = loop.call_later(max(at - time.time(), 0.0), self._close, key.id)

    def discard(self, key: KeyRecord, sock: Revocable) -> None:
        socks = self._by_key.get(key.id)
        if socks is not None:
            socks.discard(sock)
            if not socks:
                del self._by_key[key.id]
        timer = self._expiry.pop(sock, None)
        if timer is not None:
            timer.cancel()

    def revoke(self, key_id: str, at: float) -> None:
        now = time.time()
        for old in [k for k, when in self._revoked.items() if when + self.remember_s < now]:
            del self._revoked[old]
        at = min(at, self._revoked.get(key_id, at))
        self._revoked[key_id] = at
        timer = self._timers.pop(key_id, None)
        if timer is not None:
            timer.cancel()
        self._timers[key_id] = asyncio.get_running_loop().call_later(max(at - now, 0.0), self._close, key_id)

    def _close(self, key_id: str) -> None:
        self._timers.pop(key_id, None)
        for sock in list(self._by_key.get(key_id, ())):
            sock.revoked()

    def __len__(self) -> int:
        return sum(len(s) for s in self._by_key.values())


CACHE_HEADER = "x-inferbus-cache"


class GatewaySettings(settings.CommonSettings, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8080
    admin_key: str | None = None
    admin_key_previous: str | None = None  # revoked at start: `inferbus up --rotate-admin-key`
    max_body_bytes: int = 1 << 20
    # Browser origins allowed to call the API (CORS): ["https://app.example.com"], or ["*"]; none by default.
    cors_origins: list[str] = []
    cors_max_age_s: int = 600
    # The response cache (services/gateway/cache.py): exact in Redis, semantic in pgvector (INFERBUS_CACHE as JSON).
    cache: CacheSettings = CacheSettings()
    default_max_tokens: int = 512
    request_timeout_s: float = 600.0
    max_request_timeout_s: float = 3600.0
    first_chunk_timeout_s: float = 3.0
    idle_timeout_s: float = 1.5
    ws_max_in_flight: int = 64
    key_cache_ttl_s: float = 5.0
    # NATS client edge (services.gateway.nats_edge): the auth callout's identity and signing key, and
    # the system account's, which closes a revoked key's connections. Empty: that part is off.
    nats_auth_credentials: str = ""
    nats_callout_seed: str = ""
    nats_system_credentials: str = ""
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
    # Transcription aliases whose audio in other languages than English goes to a multilingual model, while
    # one is live: a `language` that is not "en" goes straight there, none has it identify the language
    # first (English is handed back to the alias's own model), and translations go there too.
    asr_multilingual: dict[str, str] = msgspec.field(
        default_factory=lambda: {
            "whisper-1": "whisper-base",
            "gpt-4o-transcribe": "whisper-base",
            "gpt-4o-mini-transcribe": "whisper-base",
        }
    )
    # Speech aliases whose input in another language goes to a voice model of that language, while one is live
    # and the request names an OpenAI voice (or none): Japanese text (kana or kanji) to kokoro-ja.
    tts_languages: dict[str, dict[str, str]] = msgspec.field(
        default_factory=lambda: {alias: {"ja": "kokoro-ja"} for alias in ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")}
    )
    max_audio_bytes: int = 25 << 20  # uploads to /v1/audio/* (OpenAI's limit)
    max_audio_seconds: float = 900.0
    max_speech_chars: int = 4096  # /v1/audio/speech input (OpenAI's limit)
    # Rate limits and budgets (Redis). Off: no per-request Redis round trip at all.
    governance: bool = True
    # When Redis is unreachable: "open" admits requests (unlimited, logged, counted), "closed" answers 503.
    rate_limit_failure: Literal["open", "closed"] = "open"
    # Until the first price list arrives from metering: "closed" answers 503 to requests under a USD budget,
    # "open" admits them as if free. Logged at warning either way.
    unknown_prices: Literal["open", "closed"] = "closed"
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
        self.breakers: Breakers | None = None
        self.request_log: requestlog.RequestLogPublisher | None = None
        self.cache: ResponseCache | None = None
        self._prices_task: asyncio.Task[None] | None = None
        self.in_flight = 0
        self.edge: Edge | None = None
        self.kicker: Kicker | None = None
        self._kicks: set[asyncio.Task[None]] = set()
        self._extra_connections: list[bus.Connection] = []
        self.sockets = OpenSockets()
        self.logger = log.get("gateway")

    async def start(self) -> None:
        cfg = self.settings
        await self.service.connect()
        self.pool = await db.connect(cfg.database_url)
        applied = await db.migrate(self.pool, "services.gateway", "gateway")
        if applied:
            self.logger.info("migrations_applied", files=applied)
        self.keys = KeyStore(self.pool, cache_ttl=cfg.key_cache_ttl_s)
        if cfg.admin_key and not await self.keys.bootstrap(
            "admin (bootstrap)", ["admin", "inference"], cfg.admin_key, cfg.admin_key_previous
        ):
            self.logger.warning("admin_key_revoked", hint="rotate it: inferbus up --rotate-admin-key")
        nc = self.service.bus
        self.tenancy = TenancyAdmin(self.pool, nc)
        if cfg.governance:
            self.governor = Governor(
                cfg.redis_url,
                failure=cfg.rate_limit_failure,
                global_limits=cfg.global_limits,
                endpoint_limits=cfg.endpoint_limits,
                stale_s=cfg.max_request_timeout_s + 60,
                unknown_prices=cfg.unknown_prices,
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
        self.breakers = Breakers(f"gateway-{self.service.instance_id}")
        try:
            await self.breakers.watch(nc.jetstream())
        except Exception as exc:  # JetStream off: breakers are this process's own
            self.logger.warning("breakers_unshared", error=repr(exc))
        if self.governor is not None:
            self.catalogue.router.signals.price = self.governor.prices.per_token
        self._dispatcher = Dispatcher(client, self.catalogue, breakers=self.breakers)
        try:
            await requestlog.ensure_stream(nc.jetstream())
        except Exception as exc:  # JetStream off: the publisher keeps records until it is back (bounded)
            self.logger.warning("request_log_stream_unavailable", error=repr(exc))
        self.request_log = requestlog.RequestLogPublisher(nc)
        self.request_log.start()
        if cfg.cache.enabled:
            self.cache = ResponseCache(Resp(cfg.redis_url), self.pool, cfg.cache, self._embed)
        await self._start_nats_edge()
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

    async def _start_nats_edge(self) -> None:
        cfg = self.settings
        assert self.keys is not None
        self.edge = Edge(self)
        await self.edge.start(self.service.bus)
        if cfg.nats_auth_credentials and cfg.nats_callout_seed:
            conn = await bus.connect(cfg.nats_url, f"inferbus-auth-{self.service.instance_id}",
                                     identity=bus.Identity.of(cfg).with_credentials(cfg.nats_auth_credentials))
            self._extra_connections.append(conn)
            await Callout(self.keys, Issuer.from_file(cfg.nats_callout_seed)).start(conn)
        if cfg.nats_system_credentials:
            conn = await bus.connect(cfg.nats_url, f"inferbus-system-{self.service.instance_id}",
                                     identity=bus.Identity.of(cfg).with_credentials(cfg.nats_system_credentials))
            self._extra_connections.append(conn)
            self.kicker = Kicker(conn)

    def kick_later(self, key_id: str, at: float = 0.0) -> None:
        """Close the key's NATS connections at `at` (unix s; now if past): revocation or new permissions."""
        if self.kicker is None:
            return
        kicker = self.kicker

        async def run() -> None:
            await asyncio.sleep(max(at - time.time(), 0.0))
            try:
                await kicker.kick(key_id)
            except Exception as exc:  # the system connection is down: the key is refused at the edge anyway
                self.logger.warning("nats_kick_failed", key_id=key_id, error=repr(exc))

        task = asyncio.create_task(run())
        self._kicks.add(task)
        task.add_done_callback(self._kicks.discard)

    async def close(self) -> None:
        if self.edge is not None:
            await self.edge.close()
        if self.request_log is not None:
            await self.request_log.drain(2.0)
        if self.cache is not None:
            await self.cache.close()
        if self._dispatcher is not None:
            await self._dispatcher.outcomes.close()
        for task in list(self._kicks):
            task.cancel()
        for conn in self._extra_connections:
            await conn.close()
        if self._prices_task is not None:
            self._prices_task.cancel()
        await self.catalogue.tables.close()
        if self.breakers is not None:
            await self.breakers.close()
        if self.governor is not None:
            await self.governor.close()
        await self.service.close()
        if self.pool is not None:
            await self.pool.close()

    def stats(self) -> dict[str, Any]:
        prices = self.governor.prices.per_model if self.governor is not None else {}
        return {"in_flight": self.in_flight, "models": len(self.catalogue.listing()), "priced_models": sorted(prices),
                "sockets": len(self.sockets), "breakers": self.breakers.snapshot() if self.breakers else {},
                "request_log": self.request_log.stats() if self.request_log else {},
                "cache": self.cache.stats() if self.cache else {}}

    def cache_use(self, headers: Mapping[str, str], key: KeyRecord | None, request: GenerateRequest) -> CacheUse | None:
        """How this request may use the response cache (headers `x-inferbus-cache`, `Cache-Control`; the key's
        `cache` setting and TTL)."""
        if self.cache is None:
            return None
        how = cache_mode(request, headers.get(CACHE_HEADER), headers.get("Cache-Control"), self.cache.settings,
                         key.cache if key is not None else "default")
        if how == "off":
            return None
        if key is None:
            return CacheUse(self.cache, "-", how)
        return CacheUse(self.cache, key.tenant_id, how, key.cache_ttl_s)

    async def _embed(self, text: str) -> list[float] | None:
        """One text's vector from the cache's embed model, over the bus (None when nobody serves it)."""
        model = self.settings.cache.embed_model
        rid = "cache-" + secrets.token_hex(8)
        try:
            route = self.catalogue.route(model, "embed")
            chunks = self.dispatcher.open(
                "embed", model, route, embed_encoder.encode(EmbedRequest(request_id=rid, model=model, texts=[text])),
                rid, decoder=embed_chunk_decoder, terminal=(EmbedDone,), progress=(Vectors,), retries=0,
                deadline=time.time() + 5,
            )
            vector: list[float] | None = None
            async for chunk in chunks:
                if isinstance(chunk, Vectors):
                    vector = array.array("f", chunk.data[: 4 * chunk.dim]).tolist()
            return vector
        except InferBusError as exc:
            self.logger.warning("cache_embed_unavailable", model=model, error=exc.code, message=exc.message)
            return None

    def log_request(
        self,
        key: KeyRecord | None,
        *,
        request_id: str,
        kind: str,
        model: str,
        admitted: float,
        served: Served,
        error: InferBusError | None,
        http_status: int,
        usage: Usage | None,
        streamed: bool,
        request_body: bytes | None = None,
        response_text: str | None = None,
    ) -> None:
        """One request-log record, off the response path (the publisher batches to JetStream); the request's span
        gets the same facts."""
        if tracing.tracer is not None:
            tracing.served(model, served.model, served.version, served.provider, usage, error.code if error else None)
        if self.request_log is None:
            return
        bodies, days = (False, DEFAULT_LOG_RETENTION_DAYS) if key is None else body_logging(
            key.log_bodies, key.log_retention_days, key.tenant_log_bodies, key.tenant_log_retention_days)
        request_text = request_body.decode("utf-8", "replace") if bodies and request_body is not None else None
        truncated = bodies and any(t is not None and len(t) > MAX_BODY_CHARS for t in (request_text, response_text))
        try:
            self.request_log.add(RequestRecord(
                request_id=request_id, ts=time.time() - (time.monotonic() - admitted), kind=kind, model=model,
                status="error" if error is not None else "ok", version=served.version, provider=served.provider,
                worker_id=served.worker_id, key_id=key.id if key else None, tenant_id=key.tenant_id if key else None,
                attempts=max(served.attempts, 1), fallbacks=served.fallbacks[:MAX_FALLBACKS],
                error_code=error.code if error else None,
                http_status=http_status, latency_ms=(time.monotonic() - admitted) * 1000, ttft_ms=served.ttft_ms,
                prompt_tokens=usage.prompt_tokens if usage else 0,
                completion_tokens=usage.completion_tokens if usage else 0, streamed=streamed,
                request_body=request_text[:MAX_BODY_CHARS] if request_text is not None else None,
                response_body=response_text[:MAX_BODY_CHARS] if bodies and response_text is not None else None,
                bodies_truncated=truncated, body_retention_days=days,
            ))
        except Exception as exc:  # the log never fails a request
            self.logger.warning("request_log_failed", error=repr(exc))

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
            loaded = self.governor.prices.loaded
            (self.logger.debug if loaded else self.logger.warning)("prices_unavailable", error=repr(exc))
            return False
        self.governor.prices.load(views)
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
        self.kick_later(event.key_id, event.at)
        self.sockets.revoke(event.key_id, event.at)

    async def _on_changed(self, msg: Any) -> None:
        assert self.keys is not None
        try:
            what = msgspec.json.decode(msg.data, type=dict[str, str])
        except msgspec.DecodeError:
            return
        self.keys.forget(key_id=what.get("key_id"), tenant_id=what.get("tenant_id"))
        if what.get("key_id"):  # its scopes may have changed: it reconnects with the new permissions
            self.kick_later(what["key_id"])

    async def admit(
        self, key: KeyRecord, endpoint: str, request: GenerateRequest, kind: str = "llm", *, batch: bool = False,
        choices: int = 1,
    ) -> Grant | None:
        """Scopes, rate limits and budgets for one generation (`batch`: a batch line, at its discount; `choices`:
        n of them, one request); None when governance is off."""
        key.authorize(kind, request.model)
        if self.governor is None:
            return None
        return await self.governor.admit(key, endpoint, request, batch=batch, choices=choices)

    async def admit_request(
        self, key: KeyRecord, endpoint: str, kind: str, model: str, request_id: str, audio_seconds: float = 0.0,
        *, batch: bool = False, images: int = 0,
    ) -> Grant | None:
        """Scopes, requests/min, concurrency and budgets for speech and images (`audio_seconds`: an upper bound
        of its audio; `images`: priced per image; `batch`: a batch line, at its discount); `release` settles
        it (speech: with the seconds `metered_audio` saw) when the request ends."""
        key.authorize(kind, model)
        if self.governor is None:
            return None
        return await self.governor.admit_request(key, endpoint, model, request_id, audio_seconds, batch=batch,
                                                 images=images)

    def metered_audio(self, request_id: str, chunks: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
        """A speech stream whose audio seconds the request's budgets are settled with."""
        return chunks if self.governor is None else self.governor.metered_audio(request_id, chunks)

    def release(self, key: KeyRecord, grant: Grant | None, model: str) -> None:
        if grant is not None and self.governor is not None:
            self.governor.settle_later(key.id, grant, 0, 0, model)

    def bus_headers(self, request: web.Request | None, key: KeyRecord) -> dict[str, str]:
        hdrs = {h.KEY_ID: key.id, h.TENANT: key.tenant_id}
        if tracing.tracer is not None:  # this request's span (the client's traceparent is its parent)
            tracing.inject(hdrs)
            return hdrs
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
