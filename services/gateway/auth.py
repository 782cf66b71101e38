"""API keys on the hot path: SHA-256 lookups in PostgreSQL behind a short cache, revocations heard over NATS."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections import OrderedDict
from typing import Any

import asyncpg
import msgspec

from contracts.errors import InferBusError
from contracts.tenancy import DEFAULT_LOG_RETENTION_DAYS, DEFAULT_TENANT, Budget, KeyCache, Limits, Revoked

KEY_PREFIX = "ib-"
_SELECT = (
    "SELECT k.id, k.name, k.scopes, k.tenant_id, k.expires_at, k.limits, k.model_limits, k.budget,"
    " t.limits AS tenant_limits, t.budget AS tenant_budget, k.log_bodies, k.log_retention_days,"
    " t.log_bodies AS tenant_log_bodies, t.log_retention_days AS tenant_log_retention_days, k.cache,"
    " k.cache_ttl_s FROM api_keys k JOIN tenants t ON t.id = k.tenant_id"
)


class KeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    scopes: list[str]
    tenant_id: str = DEFAULT_TENANT
    expires_at: float | None = None  # unix seconds
    limits: Limits = Limits()
    model_limits: dict[str, Limits] = {}
    budget: Budget = Budget()
    tenant_limits: Limits = Limits()
    tenant_budget: Budget = Budget()
    # Request log: bodies stored or not, and for how long (the key's settings where set, else the tenant's).
    log_bodies: bool | None = None
    log_retention_days: int | None = None
    tenant_log_bodies: bool = False
    tenant_log_retention_days: int = DEFAULT_LOG_RETENTION_DAYS
    # Response cache: "default" (the request decides), "off" (never) or "on" (also non-deterministic requests);
    # a TTL that shortens the model's for this key's entries (None: the model's).
    cache: KeyCache = "default"
    cache_ttl_s: float | None = None

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    def allows(self, kind: str, model: str) -> bool:
        if "admin" in self.scopes or "inference" in self.scopes:
            return True
        kinds = {s[5:] for s in self.scopes if s.startswith("kind:")}
        models = {s[6:] for s in self.scopes if s.startswith("model:")}
        if not kinds and not models:
            return False
        return (not kinds or kind in kinds) and (not models or model in models)

    def authorize(self, kind: str, model: str) -> None:
        if not self.allows(kind, model):
            raise InferBusError(
                "permission_denied", f"This API key may not use the {kind} model '{model}'", param="model"
            )


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def bearer(header: str | None) -> str:
    if not header:
        raise InferBusError("invalid_api_key", "Missing API key: send 'Authorization: Bearer <key>'")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise InferBusError("invalid_api_key", "Malformed Authorization header: expected 'Bearer <key>'")
    return key.strip()


def _json(value: Any, typ: type[Any]) -> Any:
    return msgspec.json.decode(value, type=typ) if isinstance(value, str | bytes) else msgspec.convert(value, typ)


def record_from_row(row: asyncpg.Record) -> KeyRecord:
    return KeyRecord(
        id=row["id"],
        name=row["name"],
        scopes=list(row["scopes"]),
        tenant_id=row["tenant_id"],
        expires_at=row["expires_at"].timestamp() if row["expires_at"] else None,
        limits=_json(row["limits"], Limits),
        model_limits=_json(row["model_limits"], dict[str, Limits]),
        budget=_json(row["budget"], Budget),
        tenant_limits=_json(row["tenant_limits"], Limits),
        tenant_budget=_json(row["tenant_budget"], Budget),
        log_bodies=row["log_bodies"],
        log_retention_days=row["log_retention_days"],
        tenant_log_bodies=row["tenant_log_bodies"],
        tenant_log_retention_days=row["tenant_log_retention_days"],
        cache=row["cache"],
        cache_ttl_s=row["cache_ttl_s"],
    )


class KeyStore:
    """Keys by hash; a found key is cached `cache_ttl` s, a revocation broadcast drops it at once.

    A key that is not found is cached `negative_ttl` s. The cache holds at most `max_cached` keys (least
    recently used out first), and concurrent lookups of one key share one PostgreSQL query: a flood of
    wrong keys costs neither memory without bound nor a query per attempt.
    """

    def __init__(
        self, pool: asyncpg.Pool, *, cache_ttl: float = 5.0, negative_ttl: float = 1.0, max_cached: int = 10_000
    ) -> None:
        self.pool = pool
        self.cache_ttl = cache_ttl
        self.negative_ttl = negative_ttl
        self.max_cached = max_cached
        self._cache: OrderedDict[bytes, tuple[KeyRecord | None, float]] = OrderedDict()
        self._lookups: dict[bytes, asyncio.Future[KeyRecord | None]] = {}
        self._by_id: dict[str, tuple[KeyRecord | None, float]] = {}  # NATS clients: by key id
        self._revoked: dict[str, tuple[float, float]] = {}  # key id -> (refused from, remember until)

    async def create(self, name: str, scopes: list[str], key: str | None = None) -> tuple[str, KeyRecord]:
        """Store a key in the default tenant (a new one unless given); return it in clear, the only time."""
        key = key or new_key()
        key_id = "key_" + secrets.token_hex(6)
        row_id = await self.pool.fetchval(
            "INSERT INTO api_keys (id, name, prefix, key_hash, scopes) VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT (key_hash) DO UPDATE SET scopes = EXCLUDED.scopes, revoked_at = NULL RETURNING id",
            key_id,
            name,
            key[:10],
            key_hash(key),
            scopes,
        )
        self._cache.pop(key_hash(key), None)
        return key, KeyRecord(id=row_id, name=name, scopes=scopes)

    async def bootstrap(self, name: str, scopes: list[str], key: str, previous: str | None = None) -> bool:
        """The operator's admin key: created once, never revived once revoked; `previous` (a rotation) is
        revoked. Returns False when the key was revoked (the operator must rotate it)."""
        await self.pool.execute(
            "INSERT INTO api_keys (id, name, prefix, key_hash, scopes) VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT (key_hash) DO NOTHING",
            "key_" + secrets.token_hex(6), name, key[:10], key_hash(key), scopes,
        )
        if previous:
            await self.pool.execute(
                "UPDATE api_keys SET revoked_at = now() WHERE key_hash = $1 AND revoked_at IS NULL", key_hash(previous)
            )
        revoked = await self.pool.fetchval("SELECT revoked_at IS NOT NULL FROM api_keys WHERE key_hash = $1",
                                           key_hash(key))
        return not revoked

    async def authenticate(self, key: str) -> KeyRecord:
        digest = key_hash(key)
        hit = self._cache.get(digest)
        if hit is not None and hit[1] > time.monotonic():
            self._cache.move_to_end(digest)
            record = hit[0]
        else:
            record = await self._lookup(digest)
        if record is None:
            raise InferBusError("invalid_api_key", "Incorrect API key provided")
        wall = time.time()
        revoked = self._revoked.get(record.id)
        expired = record.expires_at is not None and record.expires_at <= wall
        if expired or (revoked is not None and revoked[0] <= wall):
            raise InferBusError("invalid_api_key", "This API key has been revoked or has expired")
        return record

    @property
    def cached(self) -> int:
        """Keys in the cache, found or not."""
        return len(self._cache)

    async def _lookup(self, digest: bytes) -> KeyRecord | None:
        pending = self._lookups.get(digest)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch(digest))
            self._lookups[digest] = pending
            pending.add_done_callback(lambda f: (self._lookups.pop(digest, None), f.cancelled() or f.exception()))
        return await asyncio.shield(pending)  # a caller that leaves does not cancel the others' answer

    async def _fetch(self, digest: bytes) -> KeyRecord | None:
        row = await self.pool.fetchrow(
            _SELECT + " WHERE k.key_hash = $1 AND k.revoked_at IS NULL"
            " AND (k.expires_at IS NULL OR k.expires_at > now())",
            digest,
        )
        record = record_from_row(row) if row else None
        self._cache[digest] = (record, time.monotonic() + (self.cache_ttl if record else self.negative_ttl))
        self._cache.move_to_end(digest)
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return record

    async def by_id(self, key_id: str) -> KeyRecord:
        """The live record of a key the platform already authenticated (a NATS client's, from its connection)."""
        now = time.monotonic()
        hit = self._by_id.get(key_id)
        if hit is not None and hit[1] > now:
            record = hit[0]
        else:
            row = await self.pool.fetchrow(
                _SELECT + " WHERE k.id = $1 AND k.revoked_at IS NULL"
                " AND (k.expires_at IS NULL OR k.expires_at > now())",
                key_id,
            )
            record = record_from_row(row) if row else None
            if len(self._by_id) > 10_000:
                self._by_id.clear()
            self._by_id[key_id] = (record, now + (self.cache_ttl if record else 1.0))
        if record is None:
            raise InferBusError("invalid_api_key", "This API key has been revoked or has expired")
        revoked = self._revoked.get(record.id)
        if revoked is not None and revoked[0] <= time.time():
            raise InferBusError("invalid_api_key", "This API key has been revoked or has expired")
        return record

    def heard_revoked(self, event: Revoked) -> None:
        """A key was revoked (or will be, at `event.at`): refuse it from then on, cache or not."""
        now = time.monotonic()
        self._revoked[event.key_id] = (event.at, now + self.cache_ttl + max(event.at - time.time(), 0) + 60)
        for digest, (record, _) in list(self._cache.items()):
            if record is not None and record.id == event.key_id:
                del self._cache[digest]
        for key_id in [k for k, (_, until) in self._revoked.items() if until < now]:
            del self._revoked[key_id]

    def forget(self, *, key_id: str | None = None, tenant_id: str | None = None) -> None:
        """Drop cached records of a key or of a whole tenant (limits or budget changed)."""
        self._by_id.clear()  # small, and rebuilt from PostgreSQL within one lookup per key
        for digest, (record, _) in list(self._cache.items()):
            if record is not None and (record.id == key_id or record.tenant_id == tenant_id):
                del self._cache[digest]


def dumps(value: msgspec.Struct | dict[str, Any]) -> str:
    return json.dumps(msgspec.to_builtins(value))
