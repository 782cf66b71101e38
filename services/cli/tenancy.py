"""`inferbus tenants ...` and `inferbus keys ...`: organisations, API keys, their limits and budgets."""

from __future__ import annotations

import argparse
import getpass
from typing import Any

import msgspec

from contracts import subjects
from contracts.tenancy import (
    DEFAULT_LOG_RETENTION_DAYS,
    Budget,
    CreateKey,
    CreateTenant,
    Limits,
    ListKeys,
    ListTenants,
    RevokeKey,
    RotateKey,
    UpdateKey,
    UpdateTenant,
)
from services.cli import admin
from services.cli.admin import duration, table


def _governance_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rpm", type=int, help="requests per minute")
    p.add_argument("--tpm", type=int, help="tokens per minute")
    p.add_argument("--concurrency", type=int, help="requests in flight at once")
    p.add_argument("--tokens-per-day", type=int)
    p.add_argument("--tokens-per-month", type=int)
    p.add_argument("--usd-per-day", type=float)
    p.add_argument("--usd-per-month", type=float)
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE", help="metadata (repeatable)")
    p.add_argument("--log-bodies", action=argparse.BooleanOptionalAction, default=None,
                   help="keep request and response bodies in the request log (a key's setting wins over its tenant's)")
    p.add_argument("--log-retention-days", type=int, help="days logged bodies are kept (default 7)")


def _cache_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", choices=["default", "off", "on"],
                   help="response cache: default (deterministic requests or the x-inferbus-cache header), off "
                        "(never), on (every request)")
    p.add_argument("--cache-ttl", metavar="DURATION",
                   help="the longest this key's cache entries live and are used, e.g. 10m (shorter than the "
                        "model's TTL to matter)")


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("tenants", help="organisations that own API keys, with their limits and budgets")
    p.add_argument("--json", action="store_true")
    ts = p.add_subparsers(dest="tenants_command", required=True)
    s = ts.add_parser("create", help="create a tenant")
    s.add_argument("name")
    _governance_flags(s)
    ts.add_parser("list", help="list tenants")
    s = ts.add_parser("update", help="change a tenant's limits, budget or metadata (given flags only)")
    s.add_argument("tenant", help="tenant id or name")
    _governance_flags(s)

    p = sub.add_parser("keys", help="API keys: create (shown once), list, revoke, rotate, update")
    p.add_argument("--json", action="store_true")
    ks = p.add_subparsers(dest="keys_command", required=True)
    s = ks.add_parser("create", help="create an API key (printed once)")
    s.add_argument("--name", required=True)
    s.add_argument("--tenant", default="default", help="tenant id or name (default: default)")
    s.add_argument("--scope", action="append", dest="scopes",
                   help="admin, inference (default), kind:<kind> or model:<name>; repeatable")
    s.add_argument("--expires", help="lifetime, e.g. 30d, 12h")
    s.add_argument("--model-rpm", action="append", default=[], metavar="MODEL=N", help="per-model requests/min")
    s.add_argument("--model-tpm", action="append", default=[], metavar="MODEL=N", help="per-model tokens/min")
    _governance_flags(s)
    _cache_flags(s)
    s = ks.add_parser("list", help="list keys (prefixes only; a key is never shown again)")
    s.add_argument("--tenant")
    s.add_argument("--all", action="store_true", help="include revoked keys")
    s = ks.add_parser("revoke", help="revoke a key: every gateway refuses it within a second")
    s.add_argument("key_id")
    s = ks.add_parser("rotate", help="a new key with the same settings; the old one stops after --grace")
    s.add_argument("key_id")
    s.add_argument("--grace", default="0s", help="how long the old key keeps working, e.g. 1h (default 0s)")
    s = ks.add_parser("update", help="change a key's limits, budget or metadata (given flags only)")
    s.add_argument("key_id")
    s.add_argument("--model-rpm", action="append", default=[], metavar="MODEL=N")
    s.add_argument("--model-tpm", action="append", default=[], metavar="MODEL=N")
    s.add_argument("--log-inherit", action="store_true", help="drop the key's logging settings (the tenant's apply)")
    s.add_argument("--cache-ttl-inherit", action="store_true", help="drop the key's cache TTL (the model's applies)")
    _governance_flags(s)
    _cache_flags(s)


def _limits(args: argparse.Namespace) -> Limits | None:
    values = {"rpm": args.rpm, "tpm": args.tpm, "concurrency": args.concurrency}
    given = {k: v for k, v in values.items() if v is not None}
    return Limits(**given) if given else None


def _budget(args: argparse.Namespace) -> Budget | None:
    values = {
        "tokens_per_day": args.tokens_per_day, "tokens_per_month": args.tokens_per_month,
        "usd_per_day": args.usd_per_day, "usd_per_month": args.usd_per_month,
    }
    given = {k: v for k, v in values.items() if v is not None}
    return Budget(**given) if given else None


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _model_limits(args: argparse.Namespace) -> dict[str, Limits] | None:
    rpm = {m: int(v) for m, v in _pairs(args.model_rpm, "--model-rpm").items()}
    tpm = {m: int(v) for m, v in _pairs(args.model_tpm, "--model-tpm").items()}
    if not rpm and not tpm:
        return None
    return {m: Limits(rpm=rpm.get(m), tpm=tpm.get(m)) for m in rpm.keys() | tpm.keys()}


def _cache_ttl(args: argparse.Namespace) -> float | None:
    return duration(args.cache_ttl) if args.cache_ttl else None


def build(args: argparse.Namespace) -> tuple[str, msgspec.Struct]:
    actor = f"cli:{getpass.getuser()}"
    meta = _pairs(args.meta, "--meta") if "meta" in args else {}
    if args.command == "tenants":
        cmd = args.tenants_command
        if cmd == "create":
            return "tenants.create", CreateTenant(
                name=args.name, limits=_limits(args) or Limits(), budget=_budget(args) or Budget(), metadata=meta,
                log_bodies=bool(args.log_bodies),
                log_retention_days=args.log_retention_days or DEFAULT_LOG_RETENTION_DAYS, actor=actor,
            )
        if cmd == "list":
            return "tenants.list", ListTenants(actor=actor)
        return "tenants.update", UpdateTenant(
            tenant=args.tenant, limits=_limits(args), budget=_budget(args), metadata=meta or None,
            log_bodies=args.log_bodies, log_retention_days=args.log_retention_days, actor=actor,
        )
    cmd = args.keys_command
    if cmd == "create":
        return "keys.create", CreateKey(
            name=args.name, tenant=args.tenant, scopes=args.scopes or ["inference"],
            expires_in_s=duration(args.expires) if args.expires else None, limits=_limits(args) or Limits(),
            model_limits=_model_limits(args) or {}, budget=_budget(args) or Budget(), metadata=meta,
            log_bodies=args.log_bodies, log_retention_days=args.log_retention_days,
            cache=args.cache or "default", cache_ttl_s=_cache_ttl(args), actor=actor,
        )
    if cmd == "list":
        return "keys.list", ListKeys(tenant=args.tenant, include_revoked=args.all, actor=actor)
    if cmd == "revoke":
        return "keys.revoke", RevokeKey(key_id=args.key_id, actor=actor)
    if cmd == "rotate":
        return "keys.rotate", RotateKey(key_id=args.key_id, grace_s=duration(args.grace), actor=actor)
    return "keys.update", UpdateKey(
        key_id=args.key_id, limits=_limits(args), model_limits=_model_limits(args), budget=_budget(args),
        metadata=meta or None, log_bodies=args.log_bodies, log_retention_days=args.log_retention_days,
        log_inherit=args.log_inherit, cache=args.cache, cache_ttl_s=_cache_ttl(args),
        cache_ttl_inherit=args.cache_ttl_inherit, actor=actor,
    )


def _governance(item: dict[str, Any], key: bool = False) -> str:
    parts = [f"{k}={v}" for k, v in item.get("limits", {}).items()]
    parts += [f"{m}:{k}={v}" for m, lim in item.get("model_limits", {}).items() for k, v in lim.items()]
    parts += [f"{k}={v}" for k, v in item.get("budget", {}).items()]
    return " ".join(parts + _logging(item, key) + _caching(item)) or "-"


def _logging(item: dict[str, Any], key: bool) -> list[str]:
    """A key's own logging settings (None: its tenant's); a tenant's when it logs bodies."""
    bodies, days = item.get("log_bodies"), item.get("log_retention_days")
    if not key and not bodies:
        return []
    parts = [] if bodies is None else [f"log_bodies={'on' if bodies else 'off'}"]
    return parts + ([] if days is None else [f"log_retention={days}d"])


def _caching(item: dict[str, Any]) -> list[str]:
    """A key's cache settings where they differ from the default."""
    parts = [] if item.get("cache", "default") == "default" else [f"cache={item['cache']}"]
    ttl = item.get("cache_ttl_s")
    return parts + ([] if ttl is None else [f"cache_ttl={ttl:g}s"])


def render(op: str, result: Any) -> str:
    if op == "tenants.list":
        return table([["ID", "NAME", "LIMITS / BUDGET", "CREATED"],
                      *[[t["id"], t["name"], _governance(t), t["created_at"][:19]] for t in result]])
    if op.startswith("tenants."):
        return f"tenant {result['id']} ({result['name']}): {_governance(result)}"
    if op == "keys.list":
        return table([["ID", "NAME", "PREFIX", "TENANT", "SCOPES", "LIMITS / BUDGET", "EXPIRES", "REVOKED"],
                      *[[k["id"], k["name"], k["prefix"] + "…", k["tenant_id"], ",".join(k["scopes"]),
                         _governance(k, key=True),
                         (k["expires_at"] or "-")[:19], (k["revoked_at"] or "-")[:19]] for k in result]])
    if op in ("keys.create", "keys.rotate"):
        info = result["info"]
        return (f"key id: {info['id']}  tenant: {info['tenant_id']}  scopes: {','.join(info['scopes'])}\n"
                f"key:    {result['key']}\n(shown once: store it now)")
    return f"key {result['id']} ({result['name']}): {_governance(result, key=True)}" + (
        f", revoked at {result['revoked_at'][:19]}" if result.get("revoked_at") else "")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        op, body = build(args)
    except ValueError as exc:
        parser.error(str(exc))
    return admin.run(subjects.admin(op), body, lambda result: render(op, result), args.json, "gateway")
