"""The registry's PostgreSQL state: models, versions, traffic policies and their append-only audit.

Every change runs in one transaction that locks the model's policy row, validates against what is
stored, writes the new policy with the next revision and an audit row. Invalid input raises a typed
InferBusError before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import asyncpg
import msgspec

from contracts import subjects
from contracts.errors import CATALOGUE, InferBusError, invalid
from contracts.registry import (
    ENGINES,
    FALLBACK_ON,
    REMOTE_ENGINES,
    Analysis,
    AuditEntry,
    Breaker,
    ProviderVersion,
    Rollout,
    RoutingTable,
    ShadowRecord,
    ShadowReport,
    TrafficPolicy,
    VersionInfo,
)
from services.registry.vault import Sealed, Vault, VaultError, looks_secret

PolicyChange = Callable[[TrafficPolicy, set[str]], TrafficPolicy]


def check_name(value: str, param: str) -> str:
    if not value or subjects.token(value) != value or len(value) > 128:
        raise invalid(f"{param} must be 1-128 characters with no '.', '*', '>' or whitespace", param)
    return value


def check_weight(value: float, param: str = "weight") -> float:
    if not math.isfinite(value) or not 0 <= value <= 100:
        raise invalid(f"{param} must be between 0 and 100 (percent), got {value}", param)
    return value


def _policy_json(policy: TrafficPolicy) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(policy)
    return out


def check_remote(engine: str, params: dict[str, Any], secrets: dict[str, str]) -> None:
    """A remote version's params and secrets: credentials only as secrets, a usable base URL."""
    for name in params:
        if looks_secret(name):
            raise invalid(f"'{name}' looks like a credential: pass it as a secret (--secret {name}=...)", "params")
    if engine not in REMOTE_ENGINES:
        if secrets:
            raise invalid(f"secrets are for remote provider versions ({', '.join(sorted(REMOTE_ENGINES))})", "secrets")
        return
    base_url = params.get("base_url")
    if engine == "openai" and not base_url:
        raise invalid("an openai version needs --param base_url=https://.../v1", "params.base_url")
    if base_url is not None:
        url = urllib.parse.urlsplit(str(base_url))
        if url.scheme not in ("http", "https") or not url.netloc:
            raise invalid(f"base_url must be an http(s) URL, got {base_url!r}", "params.base_url")
        if url.username or url.password:
            raise invalid("base_url must not hold credentials: pass them as secrets", "params.base_url")
    for name, value in secrets.items():
        if not name or not isinstance(value, str) or not value:
            raise invalid("each secret needs a name and a non-empty value", "secrets")


class Store:
    def __init__(self, pool: asyncpg.Pool, vault: Vault | None = None) -> None:
        self.pool = pool
        self.vault = vault

    # ---- reads ------------------------------------------------------------------------------

    async def tables(self) -> list[RoutingTable]:
        rows = await self.pool.fetch(
            "SELECT m.name, m.kind, p.policy, p.revision,"
            " ARRAY(SELECT version FROM registry_versions v WHERE v.model = m.name ORDER BY created_at) AS versions"
            " FROM registry_models m JOIN registry_policies p ON p.model = m.name ORDER BY m.name"
        )
        return [_table(r) for r in rows]

    async def table(self, model: str) -> RoutingTable:
        row = await self.pool.fetchrow(
            "SELECT m.name, m.kind, p.policy, p.revision,"
            " ARRAY(SELECT version FROM registry_versions v WHERE v.model = m.name ORDER BY created_at) AS versions"
            " FROM registry_models m JOIN registry_policies p ON p.model = m.name WHERE m.name = $1",
            model,
        )
        if row is None:
            raise InferBusError("model_not_found", f"the model '{model}' is not registered", param="model")
        return _table(row)

    async def model_row(self, model: str) -> asyncpg.Record:
        row = await self.pool.fetchrow("SELECT name, kind, description FROM registry_models WHERE name=$1", model)
        if row is None:
            raise InferBusError("model_not_found", f"the model '{model}' is not registered", param="model")
        return row

    async def versions(self, model: str) -> list[VersionInfo]:
        rows = await self.pool.fetch(
            "SELECT version, engine, params, status, created_at,"
            " ARRAY(SELECT name FROM registry_secrets s WHERE s.model = v.model AND s.version = v.version"
            " ORDER BY name) AS secrets FROM registry_versions v WHERE model=$1 ORDER BY created_at",
            model,
        )
        return [
            VersionInfo(
                version=r["version"],
                engine=r["engine"],
                params=json.loads(r["params"]),
                status=r["status"],
                created_at=r["created_at"].isoformat(),
                secrets=list(r["secrets"]),
            )
            for r in rows
        ]

    async def provider_versions(self, engines: list[str]) -> list[ProviderVersion]:
        """Every remote version with its params and decrypted secrets (for the provider hosts only)."""
        wanted = sorted(set(engines) & REMOTE_ENGINES) if engines else sorted(REMOTE_ENGINES)
        rows = await self.pool.fetch(
            "SELECT model, version, engine, params FROM registry_versions WHERE engine = ANY($1::text[])"
            " ORDER BY model, version",
            wanted,
        )
        sealed = await self.pool.fetch(
            "SELECT s.model, s.version, s.name, s.nonce, s.ciphertext, s.key_id FROM registry_secrets s"
            " JOIN registry_versions v USING (model, version) WHERE v.engine = ANY($1::text[])",
            wanted,
        )
        by_version: dict[tuple[str, str], dict[str, str]] = {}
        for r in sealed:
            value = self._vault().unseal(Sealed(r["nonce"], r["ciphertext"], r["key_id"]), r["model"], r["version"],
                                         r["name"])
            by_version.setdefault((r["model"], r["version"]), {})[r["name"]] = value
        out = []
        for r in rows:
            secrets = by_version.get((r["model"], r["version"]), {})
            params = json.loads(r["params"])
            digest = hashlib.sha256(json.dumps([params, sorted(secrets.items())], sort_keys=True).encode())
            out.append(ProviderVersion(model=r["model"], version=r["version"], engine=r["engine"], params=params,
                                       secrets=secrets, revision=digest.hexdigest()[:16]))
        return out

    def _vault(self) -> Vault:
        if self.vault is None:
            raise InferBusError("internal_error", "the registry has no secrets key")
        return self.vault

    async def set_secrets(self, model: str, version: str, secrets: dict[str, str | None], actor: str) -> list[str]:
        """Replace (or, with None, delete) secrets of a remote version; the names it has afterwards."""
        async with self.pool.acquire() as con, con.transaction():
            row = await con.fetchrow(
                "SELECT engine FROM registry_versions WHERE model=$1 AND version=$2 FOR UPDATE", model, version
            )
            if row is None:
                raise InferBusError("not_found", f"version '{version}' of '{model}' is not registered", param="version")
            if row["engine"] not in REMOTE_ENGINES:
                raise invalid(f"'{model}/{version}' runs engine {row['engine']}, not a remote provider", "version")
            await self._write_secrets(con, model, version, secrets)
            await _audit(con, model, actor, "set_secrets", "", None,
                         {"version": version, "changed": sorted(secrets)})  # names only, never values
            names = await con.fetch(
                "SELECT name FROM registry_secrets WHERE model=$1 AND version=$2 ORDER BY name", model, version
            )
        return [r["name"] for r in names]

    async def _write_secrets(
        self, con: asyncpg.Connection, model: str, version: str, secrets: dict[str, str | None]
    ) -> None:
        for name, value in secrets.items():
            if not name or subjects.token(name) != name:
                raise invalid(f"secret name {name!r} must be one word", "secrets")
            if value is None:
                await con.execute(
                    "DELETE FROM registry_secrets WHERE model=$1 AND version=$2 AND name=$3", model, version, name
                )
                continue
            try:
                sealed = self._vault().seal(value, model, version, name)
            except VaultError as exc:
                raise InferBusError("internal_error", str(exc)) from None
            await con.execute(
                "INSERT INTO registry_secrets (model, version, name, nonce, ciphertext, key_id)"
                " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (model, version, name) DO UPDATE SET"
                " nonce = excluded.nonce, ciphertext = excluded.ciphertext, key_id = excluded.key_id,"
                " updated_at = now()",
                model, version, name, sealed.nonce, sealed.ciphertext, sealed.key_id,
            )

    async def history(self, model: str, limit: int) -> list[AuditEntry]:
        await self.model_row(model)
        if not 1 <= limit <= 1000:
            raise invalid("limit must be between 1 and 1000", "limit")
        rows = await self.pool.fetch(
            "SELECT id, model, at, actor, action, reason, before, after FROM registry_audit"
            " WHERE model=$1 ORDER BY id DESC LIMIT $2",
            model,
            limit,
        )
        return [
            AuditEntry(
                id=r["id"],
                model=r["model"],
                at=r["at"].isoformat(),
                actor=r["actor"],
                action=r["action"],
                reason=r["reason"],
                before=json.loads(r["before"]) if r["before"] else None,
                after=json.loads(r["after"]) if r["after"] else None,
            )
            for r in rows
        ]

    # ---- registration ------------------------------------------------------------------------

    async def register(
        self,
        *,
        model: str,
        kind: str,
        description: str,
        version: str | None,
        engine: str | None,
        params: dict[str, Any],
        actor: str,
        secrets: dict[str, str] | None = None,
    ) -> RoutingTable:
        check_name(model, "model")
        secrets = secrets or {}
        if kind not in ENGINES:
            raise invalid(f"kind must be one of {', '.join(sorted(ENGINES))}", "kind")
        if version is not None:
            check_name(version, "version")
            if engine is None:
                raise invalid("a version needs an engine", "engine")
            if engine not in ENGINES[kind]:
                owners = sorted(k for k, engines in ENGINES.items() if engine in engines)
                where = f"an engine of kind {', '.join(owners)}" if owners else "not a known engine"
                raise invalid(
                    f"engine '{engine}' is {where}; a {kind} model's versions use one of "
                    f"{', '.join(sorted(ENGINES[kind]))}",
                    "engine",
                )
            check_remote(engine, params, secrets)
        elif secrets:
            raise invalid("secrets belong to a version: name one", "secrets")
        async with self.pool.acquire() as con, con.transaction():
            row = await con.fetchrow("SELECT kind FROM registry_models WHERE name=$1 FOR UPDATE", model)
            if row is None:
                await con.execute(
                    "INSERT INTO registry_models (name, kind, description) VALUES ($1, $2, $3)",
                    model,
                    kind,
                    description,
                )
                await con.execute(
                    "INSERT INTO registry_policies (model, policy, revision) VALUES ($1, $2, 1)",
                    model,
                    json.dumps(_policy_json(TrafficPolicy())),
                )
                await _audit(con, model, actor, "register_model", "", None, {"kind": kind, "description": description})
            elif row["kind"] != kind:
                raise InferBusError(
                    "conflict", f"the model '{model}' is a {row['kind']} model, not {kind}", param="kind"
                )
            if version is not None:
                exists = await con.fetchval(
                    "SELECT 1 FROM registry_versions WHERE model=$1 AND version=$2", model, version
                )
                if exists:
                    raise InferBusError(
                        "conflict", f"version '{version}' of '{model}' is already registered", param="version"
                    )
                await con.execute(
                    "INSERT INTO registry_versions (model, version, engine, params) VALUES ($1, $2, $3, $4)",
                    model,
                    version,
                    engine,
                    json.dumps(params),
                )
                await self._write_secrets(con, model, version, dict(secrets))
                await _audit(
                    con,
                    model,
                    actor,
                    "register_version",
                    "",
                    None,
                    {"version": version, "engine": engine, "params": params, "secrets": sorted(secrets)},
                )
                await con.execute(
                    "UPDATE registry_policies SET revision = revision + 1, updated_at = now() WHERE model=$1", model
                )
        return await self.table(model)

    # ---- policy changes ----------------------------------------------------------------------

    async def change(
        self, model: str, action: str, actor: str, change: PolicyChange, *, reason: str = ""
    ) -> RoutingTable:
        """Apply `change(policy, registered_versions)` under the model's row lock; return the new table."""
        async with self.pool.acquire() as con, con.transaction():
            row = await con.fetchrow("SELECT policy FROM registry_policies WHERE model=$1 FOR UPDATE", model)
            if row is None:
                raise InferBusError("model_not_found", f"the model '{model}' is not registered", param="model")
            before = msgspec.json.decode(row["policy"], type=TrafficPolicy)
            versions = {
                r["version"] for r in await con.fetch("SELECT version FROM registry_versions WHERE model=$1", model)
            }
            after = change(before, versions)
            await con.execute(
                "UPDATE registry_policies SET policy=$2, revision = revision + 1, updated_at = now() WHERE model=$1",
                model,
                json.dumps(_policy_json(after)),
            )
            await _audit(con, model, actor, action, reason, _policy_json(before), _policy_json(after))
            for version, status in _statuses(before, after, action).items():
                await con.execute(
                    "UPDATE registry_versions SET status=$3 WHERE model=$1 AND version=$2", model, version, status
                )
        return await self.table(model)

    # ---- shadow comparisons ------------------------------------------------------------------

    async def record_shadow(self, records: list[ShadowRecord]) -> None:
        await self.pool.executemany(
            "INSERT INTO registry_shadow (model, request_id, version, shadow_version, latency_ms, shadow_latency_ms,"
            " error, shadow_error, output_chars, shadow_output_chars, similarity)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            [
                (
                    r.model,
                    r.request_id,
                    r.version,
                    r.shadow_version,
                    r.latency_ms,
                    r.shadow_latency_ms,
                    r.error,
                    r.shadow_error,
                    r.output_chars,
                    r.shadow_output_chars,
                    r.similarity,
                )
                for r in records
            ],
        )

    async def comparisons(self, model: str, limit: int) -> ShadowReport:
        await self.model_row(model)
        if not 1 <= limit <= 1000:
            raise invalid("limit must be between 1 and 1000", "limit")
        summary = await self.pool.fetchrow(
            "SELECT count(*) AS n, avg((shadow_error IS NOT NULL)::int) AS err, avg(similarity) AS sim,"
            " avg(shadow_latency_ms / NULLIF(latency_ms, 0)) AS ratio FROM registry_shadow WHERE model=$1",
            model,
        )
        rows = await self.pool.fetch(
            "SELECT * FROM registry_shadow WHERE model=$1 ORDER BY id DESC LIMIT $2", model, limit
        )
        return ShadowReport(
            model=model,
            count=summary["n"],
            shadow_error_rate=float(summary["err"] or 0.0),
            mean_similarity=None if summary["sim"] is None else round(float(summary["sim"]), 4),
            mean_latency_ratio=None if summary["ratio"] is None else round(float(summary["ratio"]), 3),
            records=[
                ShadowRecord(
                    model=r["model"],
                    request_id=r["request_id"],
                    version=r["version"],
                    shadow_version=r["shadow_version"],
                    latency_ms=r["latency_ms"],
                    shadow_latency_ms=r["shadow_latency_ms"],
                    error=r["error"],
                    shadow_error=r["shadow_error"],
                    output_chars=r["output_chars"],
                    shadow_output_chars=r["shadow_output_chars"],
                    similarity=r["similarity"],
                )
                for r in rows
            ],
        )


# ---- policy transitions (pure: validate, then return the new policy) ---------------------------


def _known(version: str, versions: set[str], model: str) -> str:
    if version not in versions:
        raise InferBusError("not_found", f"version '{version}' of '{model}' is not registered", param="version")
    return version


def deploy(model: str, version: str) -> PolicyChange:
    def change(p: TrafficPolicy, versions: set[str]) -> TrafficPolicy:
        _known(version, versions, model)
        shadow = None if p.shadow == version else p.shadow
        return msgspec.structs.replace(
            p,
            stable=version,
            canary=None,
            canary_weight=0.0,
            ab={},
            rollout=None,
            shadow=shadow,
            shadow_rate=p.shadow_rate if shadow else 0.0,
        )

    return change


def canary(model: str, version: str, weight: float, steps: list[float], analysis: Analysis | None) -> PolicyChange:
    check_weight(weight)
    for step in steps:
        check_weight(step, "steps")
    if steps and (sorted(steps) != steps or len(set(steps)) != len(steps)):
        raise invalid("steps must be strictly increasing percentages, e.g. 5,25,50,100", "steps")
    if steps and steps[0] != weight:
        steps = [weight, *[s for s in steps if s > weight]]

    def change(p: TrafficPolicy, versions: set[str]) -> TrafficPolicy:
        _known(version, versions, model)
        if p.stable == version:
            raise invalid(f"'{version}' is already the stable version of '{model}'", "version")
        if p.ab:
            raise InferBusError("conflict", f"'{model}' is running an A/B test; end it before a canary", param="model")
        rollout = Rollout(steps=steps, step=0, stepped_at=time.time()) if steps else None
        return msgspec.structs.replace(
            p, canary=version, canary_weight=weight, rollout=rollout, analysis=analysis or p.analysis
        )

    return change


def promote(model: str, weight: float | None) -> PolicyChange:
    if weight is not None:
        check_weight(weight)

    def change(p: TrafficPolicy, versions: set[str]) -> TrafficPolicy:
        if p.canary is None:
            raise InferBusError("conflict", f"'{model}' has no canary to promote", param="model")
        if weight is None or weight >= 100:
            return msgspec.structs.replace(p, stable=p.canary, canary=None, canary_weight=0.0, rollout=None)
        return msgspec.structs.replace(p, canary_weight=weight)

    return change


def step(model: str) -> PolicyChange:
    """The controller's automatic promotion step: the next weight of the rollout, or full promotion."""

    def change(p: TrafficPolicy, versions: set[str]) -> TrafficPolicy:
        if p.canary is None or p.rollout is None:
            raise InferBusError("conflict", f"'{model}' has no rollout in progress", param="model")
        nxt = p.rollout.step + 1
        if nxt >= len(p.rollout.steps) or p.rollout.steps[nxt] >= 100:
            return msgspec.structs.replace(p, stable=p.canary, canary=None, canary_weight=0.0, rollout=None)
        return msgspec.structs.replace(
            p,
            canary_weight=p.rollout.steps[nxt],
            rollout=msgspec.structs.replace(p.rollout, step=nxt, stepped_at=time.time()),
        )

    return change


def rollback(model: str) -> PolicyChange:
    def change(p: TrafficPolicy, versions: set[str]) -> TrafficPolicy:
        if p.canary is None:
            raise InferBusError("conflict", f"'{model}' has no canary to roll back", param="model")
        return msgspec.structs.replace(p, canary=None, canary_weight=0.0, rollout=None)

    return change


def ab(model: str, groups: dict[str, float], sticky: str) -> PolicyChange:
    for version, weight in groups.items():
        check_name(version, "groups")
        check_weight(weight, "groups")
    if groups and abs(sum(groups.values()) - 100) > 1e-6:
        raise invalid(f"A/B weights must sum to 100, got {sum(groups.values()):g}", "groups")
    if len(groups) == 1:
        raise invalid("an A/B test needs at least two versions (use deploy for one)", "groups")

    def change(p: TrafficPolicy, versions: set[str]) -> TrafficPolicy:
        for version in groups:
            _known(version, versions, model)
        if groups and p.canary:
            raise InferBusError("conflict", f"'{model}' has a canary; promote or roll it back first", param="model")
        return msgspec.structs.replace(p, ab=dict(groups), sticky=sticky)

    return change


def shadow(model: str, version: str | None, rate: float) -> PolicyChange:
    check_weight(rate, "rate")

    def change(p: TrafficPolicy, versions: set[str]) -> TrafficPolicy:
        if version is None or rate == 0:
            return msgspec.structs.replace(p, shadow=None, shadow_rate=0.0)
        _known(version, versions, model)
        if version == p.stable:
            raise invalid(f"'{version}' is the stable version; shadow a different one", "version")
        return msgspec.structs.replace(p, shadow=version, shadow_rate=rate)

    return change


def routing(model: str, fields: dict[str, Any]) -> PolicyChange:
    """Replace the given routing fields; pool versions must be registered, fallbacks other models."""
    pool = fields.get("pool")
    if pool is not None:
        for version, weight in pool.items():
            check_name(version, "pool")
            check_weight(weight, "pool")
    for name in fields.get("fallbacks") or []:
        check_name(name, "fallbacks")
        if name == model:
            raise invalid("a model cannot fall back to itself", "fallbacks")
    for code in fields.get("fallback_on") or []:
        if code not in CATALOGUE:
            raise invalid(f"unknown error code {code!r} in fallback_on; e.g. {', '.join(FALLBACK_ON[:4])}",
                          "fallback_on")
    attempts = fields.get("max_attempts")
    if attempts is not None and not 1 <= attempts <= 10:
        raise invalid("max_attempts must be between 1 and 10", "max_attempts")
    budget = fields.get("budget_s")
    if budget is not None and not (math.isfinite(budget) and 0 < budget <= 3600):
        raise invalid("budget_s must be between 0 and 3600 seconds", "budget_s")
    breaker: Breaker | None = fields.get("breaker")
    if breaker is not None and not (
        1 <= breaker.failures <= 1000 and 0 < breaker.window_s <= 3600 and 0 < breaker.cooldown_s
        <= breaker.max_cooldown_s <= 86400
    ):
        raise invalid("breaker: failures 1-1000, window_s up to 3600, 0 < cooldown_s <= max_cooldown_s", "breaker")

    def change(p: TrafficPolicy, versions: set[str]) -> TrafficPolicy:
        for version in pool or {}:
            _known(version, versions, model)
        updated = msgspec.structs.replace(p.routing, **{k: v for k, v in fields.items() if v is not None})
        return msgspec.structs.replace(p, routing=updated)

    return change


# ---- helpers -----------------------------------------------------------------------------------


def _table(row: asyncpg.Record) -> RoutingTable:
    return RoutingTable(
        model=row["name"],
        kind=row["kind"],
        revision=row["revision"],
        versions=list(row["versions"]),
        policy=msgspec.json.decode(row["policy"], type=TrafficPolicy),
    )


def _roles(p: TrafficPolicy) -> dict[str, str]:
    roles = {v: "pool" for v in p.routing.pool}
    roles.update({v: "ab" for v in p.ab})
    if p.shadow:
        roles[p.shadow] = "shadow"
    if p.canary:
        roles[p.canary] = "canary"
    if p.stable:
        roles[p.stable] = "stable"
    return roles


def _statuses(before: TrafficPolicy, after: TrafficPolicy, action: str) -> dict[str, str]:
    """Version status follows its role; a version that lost its role is retired, or rolled_back."""
    old, new = _roles(before), _roles(after)
    out = dict(new)
    for version in old.keys() - new.keys():
        out[version] = "rolled_back" if action in ("rollback", "auto_rollback") else "retired"
    return {v: s for v, s in out.items() if old.get(v) != s or v not in old}


async def _audit(
    con: asyncpg.Connection,
    model: str,
    actor: str,
    action: str,
    reason: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
) -> None:
    await con.execute(
        "INSERT INTO registry_audit (model, actor, action, reason, before, after) VALUES ($1, $2, $3, $4, $5, $6)",
        model,
        actor,
        action,
        reason,
        json.dumps(before) if before is not None else None,
        json.dumps(after) if after is not None else None,
    )
