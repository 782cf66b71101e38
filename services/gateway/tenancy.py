"""Tenant and key administration: one implementation behind the NATS `admin.*` subjects and `/v1/admin/*`.

Invalid input raises a typed InferBusError before anything is written. Revocations and limit
changes are broadcast over NATS so every gateway drops its cached copy at once.
"""

from __future__ import annotations

import math
import re
import secrets
import time
from typing import Any

import asyncpg
import msgspec

from contracts import subjects
from contracts.errors import InferBusError, invalid
from contracts.subjects import KINDS
from contracts.tenancy import (
    MAX_LOG_RETENTION_DAYS,
    Budget,
    CreateKey,
    CreateTenant,
    KeyInfo,
    Limits,
    ListKeys,
    ListTenants,
    NewKey,
    Revoked,
    RevokeKey,
    RotateKey,
    Tenant,
    UpdateKey,
    UpdateTenant,
    revoked_encoder,
)
from services.gateway.auth import dumps, key_hash, new_key
from services.runtime.bus import Connection

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._:@/-]{0,127}$")
_KEY_COLUMNS = (
    "id, name, prefix, tenant_id, scopes, created_at, expires_at, revoked_at, limits, model_limits, budget, metadata,"
    " log_bodies, log_retention_days, cache, cache_ttl_s"
)
MAX_CACHE_TTL_S = 30 * 86400.0


def check_name(value: str, param: str) -> str:
    if not _NAME.match(value):
        raise invalid(
            f"{param} must be 1-128 letters, digits, spaces or ._:@/- and start with a letter or digit", param
        )
    return value


def check_scopes(scopes: list[str]) -> list[str]:
    if not scopes:
        raise invalid("a key needs at least one scope", "scopes")
    for scope in scopes:
        if scope in ("admin", "inference"):
            continue
        kind, sep, value = scope.partition(":")
        if sep and kind == "kind" and value in KINDS:
            continue
        if sep and kind == "model" and value and subjects.token(value) == value:
            continue
        raise invalid(
            f"unknown scope {scope!r}: use admin, inference, kind:<{'|'.join(sorted(KINDS))}> or model:<name>", "scopes"
        )
    return sorted(set(scopes))


def check_limits(limits: Limits, param: str = "limits") -> Limits:
    for field in ("rpm", "tpm", "concurrency"):
        value = getattr(limits, field)
        if value is not None and value <= 0:
            raise invalid(f"{param}.{field} must be a positive integer", f"{param}.{field}")
    return limits


def check_budget(budget: Budget) -> Budget:
    for field in ("tokens_per_day", "tokens_per_month", "usd_per_day", "usd_per_month"):
        value = getattr(budget, field)
        if value is not None and (not math.isfinite(value) or value <= 0):
            raise invalid(f"budget.{field} must be positive", f"budget.{field}")
    return budget


def check_retention(days: int | None, param: str = "log_retention_days") -> int | None:
    if days is not None and not 1 <= days <= MAX_LOG_RETENTION_DAYS:
        raise invalid(f"{param} must be between 1 and {MAX_LOG_RETENTION_DAYS} days", param)
    return days


def check_cache_ttl(ttl_s: float | None) -> float | None:
    if ttl_s is not None and not (math.isfinite(ttl_s) and 0 < ttl_s <= MAX_CACHE_TTL_S):
        raise invalid(f"cache_ttl_s must be a positive number of seconds, at most {MAX_CACHE_TTL_S:.0f}",
                      "cache_ttl_s")
    return ttl_s


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _key_info(row: asyncpg.Record) -> KeyInfo:
    return KeyInfo(
        id=row["id"],
        name=row["name"],
        prefix=row["prefix"],
        tenant_id=row["tenant_id"],
        scopes=list(row["scopes"]),
        created_at=row["created_at"].isoformat(),
        expires_at=_iso(row["expires_at"]),
        revoked_at=_iso(row["revoked_at"]),
        limits=msgspec.json.decode(row["limits"], type=Limits),
        model_limits=msgspec.json.decode(row["model_limits"], type=dict[str, Limits]),
        budget=msgspec.json.decode(row["budget"], type=Budget),
        metadata=msgspec.json.decode(row["metadata"]),
        log_bodies=row["log_bodies"],
        log_retention_days=row["log_retention_days"],
        cache=row["cache"],
        cache_ttl_s=row["cache_ttl_s"],
    )


def _tenant(row: asyncpg.Record) -> Tenant:
    return Tenant(
        id=row["id"],
        name=row["name"],
        created_at=row["created_at"].isoformat(),
        limits=msgspec.json.decode(row["limits"], type=Limits),
        budget=msgspec.json.decode(row["budget"], type=Budget),
        metadata=msgspec.json.decode(row["metadata"]),
        log_bodies=row["log_bodies"],
        log_retention_days=row["log_retention_days"],
    )


class TenancyAdmin:
    def __init__(self, pool: asyncpg.Pool, nc: Connection) -> None:
        self.pool = pool
        self.nc = nc

    # ---- tenants -----------------------------------------------------------------------------

    async def tenant_id(self, con: asyncpg.Connection, ref: str) -> str:
        found = await con.fetchval("SELECT id FROM tenants WHERE id = $1 OR name = $1", ref)
        if found is None:
            raise InferBusError("not_found", f"no tenant {ref!r}", param="tenant")
        return str(found)

    async def create_tenant(self, req: CreateTenant) -> Tenant:
        check_name(req.name, "name")
        check_limits(req.limits)
        check_budget(req.budget)
        check_retention(req.log_retention_days)
        tenant_id = "ten_" + secrets.token_hex(6)
        async with self.pool.acquire() as con, con.transaction():
            if await con.fetchval("SELECT 1 FROM tenants WHERE name = $1", req.name):
                raise InferBusError("conflict", f"a tenant named {req.name!r} exists", param="name")
            row = await con.fetchrow(
                "INSERT INTO tenants (id, name, limits, budget, metadata, log_bodies, log_retention_days)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *",
                tenant_id, req.name, dumps(req.limits), dumps(req.budget), dumps(req.metadata), req.log_bodies,
                req.log_retention_days,
            )
            await _audit(con, req.actor, "create_tenant", tenant_id, {"name": req.name})
        return _tenant(row)

    async def update_tenant(self, req: UpdateTenant) -> Tenant:
        if req.limits is not None:
            check_limits(req.limits)
        if req.budget is not None:
            check_budget(req.budget)
        check_retention(req.log_retention_days)
        async with self.pool.acquire() as con, con.transaction():
            tenant_id = await self.tenant_id(con, req.tenant)
            row = await con.fetchrow(
                "UPDATE tenants SET limits = coalesce($2::jsonb, limits), budget = coalesce($3::jsonb, budget),"
                " metadata = coalesce($4::jsonb, metadata), log_bodies = coalesce($5, log_bodies),"
                " log_retention_days = coalesce($6, log_retention_days) WHERE id = $1 RETURNING *",
                tenant_id,
                dumps(req.limits) if req.limits is not None else None,
                dumps(req.budget) if req.budget is not None else None,
                dumps(req.metadata) if req.metadata is not None else None,
                req.log_bodies,
                req.log_retention_days,
            )
            await _audit(con, req.actor, "update_tenant", tenant_id, msgspec.to_builtins(req))
        await self._changed({"tenant_id": tenant_id})
        return _tenant(row)

    async def list_tenants(self, req: ListTenants) -> list[Tenant]:
        return [_tenant(r) for r in await self.pool.fetch("SELECT * FROM tenants ORDER BY created_at")]

    # ---- keys --------------------------------------------------------------------------------

    async def create_key(self, req: CreateKey) -> NewKey:
        check_name(req.name, "name")
        scopes = check_scopes(req.scopes)
        check_limits(req.limits)
        for model, limits in req.model_limits.items():
            check_limits(limits, f"model_limits.{model}")
        check_budget(req.budget)
        check_retention(req.log_retention_days)
        check_cache_ttl(req.cache_ttl_s)
        if req.expires_in_s is not None and (not math.isfinite(req.expires_in_s) or req.expires_in_s <= 0):
            raise invalid("expires_in_s must be a positive number of seconds", "expires_in_s")
        key = new_key()
        async with self.pool.acquire() as con, con.transaction():
            tenant_id = await self.tenant_id(con, req.tenant)
            row = await con.fetchrow(
                "INSERT INTO api_keys (id, name, prefix, key_hash, scopes, tenant_id, expires_at, limits,"
                " model_limits, budget, metadata, log_bodies, log_retention_days, cache, cache_ttl_s) VALUES ($1, $2,"
                " $3, $4, $5, $6, now() + make_interval(secs => $7::float8), $8, $9, $10, $11, $12, $13, $14, $15)"
                " RETURNING " + _KEY_COLUMNS,
                "key_" + secrets.token_hex(6), req.name, key[:10], key_hash(key), scopes, tenant_id,
                req.expires_in_s, dumps(req.limits), dumps(req.model_limits), dumps(req.budget), dumps(req.metadata),
                req.log_bodies, req.log_retention_days, req.cache, req.cache_ttl_s,
            )
            await _audit(con, req.actor, "create_key", row["id"], {"name": req.name, "tenant_id": tenant_id})
        return NewKey(key=key, info=_key_info(row))

    async def list_keys(self, req: ListKeys) -> list[KeyInfo]:
        async with self.pool.acquire() as con:
            tenant_id = await self.tenant_id(con, req.tenant) if req.tenant else None
            rows = await con.fetch(
                "SELECT " + _KEY_COLUMNS + " FROM api_keys WHERE ($1::text IS NULL OR tenant_id = $1)"
                " AND ($2 OR revoked_at IS NULL) ORDER BY created_at",
                tenant_id, req.include_revoked,
            )
        return [_key_info(r) for r in rows]

    async def _live_key(self, con: asyncpg.Connection, key_id: str) -> asyncpg.Record:
        row = await con.fetchrow("SELECT " + _KEY_COLUMNS + " FROM api_keys WHERE id = $1 FOR UPDATE", key_id)
        if row is None:
            raise InferBusError("not_found", f"no key {key_id!r}", param="key_id")
        if row["revoked_at"] is not None:
            raise InferBusError("conflict", f"key {key_id!r} is already revoked", param="key_id")
        return row

    async def revoke_key(self, req: RevokeKey) -> KeyInfo:
        async with self.pool.acquire() as con, con.transaction():
            await self._live_key(con, req.key_id)
            row = await con.fetchrow(
                "UPDATE api_keys SET revoked_at = now() WHERE id = $1 RETURNING " + _KEY_COLUMNS, req.key_id
            )
            await _audit(con, req.actor, "revoke_key", req.key_id, {})
        await self._revoked(req.key_id, time.time())
        return _key_info(row)

    async def rotate_key(self, req: RotateKey) -> NewKey:
        if not math.isfinite(req.grace_s) or not 0 <= req.grace_s <= 30 * 86400:
            raise invalid("grace_s must be between 0 and 30 days", "grace_s")
        key = new_key()
        async with self.pool.acquire() as con, con.transaction():
            old = await self._live_key(con, req.key_id)
            row = await con.fetchrow(
                "INSERT INTO api_keys (id, name, prefix, key_hash, scopes, tenant_id, expires_at, limits,"
                " model_limits, budget, metadata, log_bodies, log_retention_days, cache, cache_ttl_s, rotated_from)"
                " SELECT $2, name, $3, $4, scopes, tenant_id, expires_at, limits, model_limits, budget, metadata,"
                " log_bodies, log_retention_days, cache, cache_ttl_s, id"
                " FROM api_keys WHERE id = $1 RETURNING " + _KEY_COLUMNS,
                req.key_id, "key_" + secrets.token_hex(6), key[:10], key_hash(key),
            )
            if req.grace_s > 0:
                await con.execute(
                    "UPDATE api_keys SET expires_at = least(coalesce(expires_at, 'infinity'),"
                    " now() + make_interval(secs => $2::float8)) WHERE id = $1",
                    req.key_id, req.grace_s,
                )
            else:
                await con.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", req.key_id)
            await _audit(con, req.actor, "rotate_key", old["id"], {"new_key_id": row["id"], "grace_s": req.grace_s})
        await self._revoked(req.key_id, time.time() + req.grace_s)
        return NewKey(key=key, info=_key_info(row))

    async def update_key(self, req: UpdateKey) -> KeyInfo:
        if req.limits is not None:
            check_limits(req.limits)
        for model, limits in (req.model_limits or {}).items():
            check_limits(limits, f"model_limits.{model}")
        if req.budget is not None:
            check_budget(req.budget)
        check_retention(req.log_retention_days)
        if req.log_inherit and (req.log_bodies is not None or req.log_retention_days is not None):
            raise invalid("log_inherit drops the key's logging settings: set them, or inherit, not both",
                          "log_inherit")
        check_cache_ttl(req.cache_ttl_s)
        if req.cache_ttl_inherit and req.cache_ttl_s is not None:
            raise invalid("cache_ttl_inherit drops the key's cache TTL: set it, or inherit, not both",
                          "cache_ttl_inherit")
        async with self.pool.acquire() as con, con.transaction():
            await self._live_key(con, req.key_id)
            row = await con.fetchrow(
                "UPDATE api_keys SET limits = coalesce($2::jsonb, limits),"
                " model_limits = coalesce($3::jsonb, model_limits), budget = coalesce($4::jsonb, budget),"
                " metadata = coalesce($5::jsonb, metadata),"
                " log_bodies = CASE WHEN $6 THEN NULL ELSE coalesce($7, log_bodies) END,"
                " log_retention_days = CASE WHEN $6 THEN NULL ELSE coalesce($8, log_retention_days) END,"
                " cache = coalesce($9, cache),"
                " cache_ttl_s = CASE WHEN $10 THEN NULL ELSE coalesce($11, cache_ttl_s) END"
                " WHERE id = $1 RETURNING " + _KEY_COLUMNS,
                req.key_id,
                dumps(req.limits) if req.limits is not None else None,
                dumps(req.model_limits) if req.model_limits is not None else None,
                dumps(req.budget) if req.budget is not None else None,
                dumps(req.metadata) if req.metadata is not None else None,
                req.log_inherit,
                req.log_bodies,
                req.log_retention_days,
                req.cache,
                req.cache_ttl_inherit,
                req.cache_ttl_s,
            )
            await _audit(con, req.actor, "update_key", req.key_id, msgspec.to_builtins(req))
        await self._changed({"key_id": req.key_id})
        return _key_info(row)

    # ---- broadcasts --------------------------------------------------------------------------

    async def _revoked(self, key_id: str, at: float) -> None:
        await self.nc.publish(subjects.ADMIN_KEYS_REVOKED, revoked_encoder.encode(Revoked(key_id=key_id, at=at)))
        await self.nc.flush()

    async def _changed(self, what: dict[str, str]) -> None:
        await self.nc.publish(subjects.ADMIN_KEYS_CHANGED, msgspec.json.encode(what))
        await self.nc.flush()


async def _audit(con: asyncpg.Connection, actor: str, action: str, subject: str, detail: dict[str, Any]) -> None:
    await con.execute(
        "INSERT INTO tenancy_audit (actor, action, subject, detail) VALUES ($1, $2, $3, $4)",
        actor, action, subject, dumps(detail),
    )
