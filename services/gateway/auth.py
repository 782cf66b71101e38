"""API keys: stored as SHA-256 hashes in PostgreSQL, checked per request with a short cache."""

from __future__ import annotations

import hashlib
import secrets
import time

import asyncpg
import msgspec

from contracts.errors import InferBusError

KEY_PREFIX = "ib-"


class KeyRecord(msgspec.Struct, frozen=True):
    id: str
    name: str
    scopes: list[str]

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes


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


class KeyStore:
    def __init__(self, pool: asyncpg.Pool, *, cache_ttl: float = 5.0) -> None:
        self.pool = pool
        self.cache_ttl = cache_ttl
        self._cache: dict[bytes, tuple[KeyRecord | None, float]] = {}

    async def create(self, name: str, scopes: list[str], key: str | None = None) -> tuple[str, KeyRecord]:
        """Store a key (a new one unless given) and return it in clear: the only time it is shown."""
        key = key or new_key()
        record = KeyRecord(id="key_" + secrets.token_hex(6), name=name, scopes=scopes)
        await self.pool.execute(
            "INSERT INTO api_keys (id, name, prefix, key_hash, scopes) VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT (key_hash) DO UPDATE SET scopes = EXCLUDED.scopes, revoked_at = NULL",
            record.id, name, key[:8], key_hash(key), scopes,
        )
        self._cache.pop(key_hash(key), None)
        return key, record

    async def authenticate(self, key: str) -> KeyRecord:
        digest = key_hash(key)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[1] > now:
            record = hit[0]
        else:
            row = await self.pool.fetchrow(
                "SELECT id, name, scopes FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL"
                " AND (expires_at IS NULL OR expires_at > now())",
                digest,
            )
            record = KeyRecord(row["id"], row["name"], list(row["scopes"])) if row else None
            self._cache[digest] = (record, now + (self.cache_ttl if record else 1.0))
        if record is None:
            raise InferBusError("invalid_api_key", "Incorrect API key provided")
        return record
