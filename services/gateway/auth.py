"""API keys on the hot path: SHA-256 lookups in PostgreSQL behind a short cache, revocations heard over NATS."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from typing import Any

import asyncpg
import msgspec

from contracts.errors import InferBusError
from contracts.tenancy import DEFAULT_TENANT, Budget, Limits, Revoked

KEY_PREFIX = "ib-"
_SELECT = (
    "SELECT k.id, k.name, k.scopes, k.tenant_id, k.expires_at, k.limits, k.model_limits, k.budget,"
    " t.limits AS tenant_limits, t.budget AS tenant_budget"
    " FROM api_keys k JOIN tenants t ON t.id = k.tenant_id"
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
    )


class KeyStore:
    """Keys by hash; a found key is cached `cache_ttl` s, a revocation broadcast drops it at once."""

    def __init__(self, pool: asyncpg.Pool, *, cache_ttl: float = 5.0) -> None:
        self.pool = pool
        self.cache_ttl = cache_ttl
        self._cache: dict[bytes, tuple[KeyRecord | None, float]] = {}
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

    async def authenticate(self, key: str) -> KeyRecord:
        digest = key_hash(key)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[1] > now:
            record = hit[0]
        else:
            row = await self.pool.fetchrow(
                _SELECT + " WHERE k.key_hash = $1 AND k.revoked_at IS NULL"
                " AND (k.expires_at IS NULL OR k.expires_at > now())",
                digest,
            )
            record = record_from_row(row) if row else None
            self._cache[digest] = (record, now + (self.cache_ttl if record else 1.0))
        if record is None:
            raise InferBusError("invalid_api_key", "Incorrect API key provided")
        wall = time.time()
        revoked = self._revoked.get(record.id)
        expired = record.expires_at is not None and record.expires_at <= wall
        if expired or (revoked is not None and revoked[0] <= wall):
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
        for digest, (record, _) in list(self._cache.items()):
            if record is not None and (record.id == key_id or record.tenant_id == tenant_id):
                del self._cache[digest]


def dumps(value: msgspec.Struct | dict[str, Any]) -> str:
    return json.dumps(msgspec.to_builtins(value))
