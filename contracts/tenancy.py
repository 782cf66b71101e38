"""Tenants, API keys, limits and budgets: admin requests (NATS `admin.*` and HTTP `/v1/admin/*` alike).

Scopes on a key: "admin" (everything, admin endpoints included), "inference" (every kind and model),
or a narrower set of "kind:<kind>" and/or "model:<model>" (a request must match both sets when both
are given).

Request logging: a tenant says whether its requests' bodies go into the request log (`log_bodies`)
and for how many days they are kept (`log_retention_days`); a key may say otherwise, and where it
does (not None) its own setting wins.

Response cache: a key's `cache` is "default" (the request decides: deterministic requests, or the header
`x-inferbus-cache: on`), "off" (never, whatever the header says) or "on" (every request, as if it sent
the header); its `cache_ttl_s` (None: the model's TTL) shortens the life of the entries it writes and
bounds the age of those it reads.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import msgspec
from msgspec import Struct

DEFAULT_TENANT: Final = "default"
DEFAULT_LOG_RETENTION_DAYS: Final = 7
MAX_LOG_RETENTION_DAYS: Final = 3650
KeyCache = Literal["default", "off", "on"]  # a key's use of the response cache


class Limits(Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Rate limits; None means no limit at this level."""

    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens per minute (prompt estimate + max_tokens, corrected to the actual)
    concurrency: int | None = None  # requests in flight at once


class Budget(Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Spend caps per UTC day / month, in tokens and in USD (from the metering price table)."""

    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    usd_per_day: float | None = None
    usd_per_month: float | None = None


class Tenant(Struct, frozen=True, kw_only=True):
    id: str
    name: str
    created_at: str
    limits: Limits = Limits()
    budget: Budget = Budget()
    metadata: dict[str, Any] = {}
    log_bodies: bool = False
    log_retention_days: int = DEFAULT_LOG_RETENTION_DAYS


class KeyInfo(Struct, frozen=True, kw_only=True):
    """A key as admins see it: never the key itself, only its recognisable prefix."""

    id: str
    name: str
    prefix: str
    tenant_id: str
    scopes: list[str]
    created_at: str
    expires_at: str | None
    revoked_at: str | None
    limits: Limits = Limits()
    model_limits: dict[str, Limits] = {}
    budget: Budget = Budget()
    metadata: dict[str, Any] = {}
    log_bodies: bool | None = None  # None: the tenant's setting
    log_retention_days: int | None = None
    cache: KeyCache = "default"
    cache_ttl_s: float | None = None  # None: the model's TTL


class NewKey(Struct, frozen=True, kw_only=True):
    key: str  # shown once
    info: KeyInfo


def body_logging(
    key_bodies: bool | None, key_days: int | None, tenant_bodies: bool, tenant_days: int
) -> tuple[bool, int]:
    """Whether a request's bodies are logged, and for how many days: the key's settings where it has them."""
    return (
        tenant_bodies if key_bodies is None else key_bodies,
        tenant_days if key_days is None else key_days,
    )


# ---- admin requests ------------------------------------------------------------------------


class _Admin(Struct, kw_only=True, forbid_unknown_fields=True):
    actor: str = "admin"


class CreateTenant(_Admin, kw_only=True, forbid_unknown_fields=True):
    name: str
    limits: Limits = Limits()
    budget: Budget = Budget()
    metadata: dict[str, Any] = {}
    log_bodies: bool = False
    log_retention_days: int = DEFAULT_LOG_RETENTION_DAYS


class UpdateTenant(_Admin, kw_only=True, forbid_unknown_fields=True):
    tenant: str  # id or name
    limits: Limits | None = None
    budget: Budget | None = None
    metadata: dict[str, Any] | None = None
    log_bodies: bool | None = None
    log_retention_days: int | None = None


class ListTenants(_Admin, kw_only=True, forbid_unknown_fields=True):
    pass


class CreateKey(_Admin, kw_only=True, forbid_unknown_fields=True):
    name: str
    tenant: str = DEFAULT_TENANT  # id or name
    scopes: list[str] = msgspec.field(default_factory=lambda: ["inference"])
    expires_in_s: float | None = None
    limits: Limits = Limits()
    model_limits: dict[str, Limits] = {}
    budget: Budget = Budget()
    metadata: dict[str, Any] = {}
    log_bodies: bool | None = None  # None: the tenant's setting
    log_retention_days: int | None = None
    cache: KeyCache = "default"
    cache_ttl_s: float | None = None  # None: the model's TTL


class ListKeys(_Admin, kw_only=True, forbid_unknown_fields=True):
    tenant: str | None = None
    include_revoked: bool = False


class RevokeKey(_Admin, kw_only=True, forbid_unknown_fields=True):
    key_id: str


class RotateKey(_Admin, kw_only=True, forbid_unknown_fields=True):
    """A new key with the same tenant, scopes, limits and budget; the old one stops after `grace_s`."""

    key_id: str
    grace_s: float = 0.0


class UpdateKey(_Admin, kw_only=True, forbid_unknown_fields=True):
    key_id: str
    limits: Limits | None = None
    model_limits: dict[str, Limits] | None = None
    budget: Budget | None = None
    metadata: dict[str, Any] | None = None
    log_bodies: bool | None = None
    log_retention_days: int | None = None
    log_inherit: bool = False  # drop the key's own logging settings: the tenant's apply again
    cache: KeyCache | None = None
    cache_ttl_s: float | None = None
    cache_ttl_inherit: bool = False  # drop the key's cache TTL: the model's applies again


class Revoked(Struct, frozen=True, kw_only=True):
    """Broadcast on `admin.keys.revoked` so every gateway drops the key from its cache at once."""

    key_id: str
    at: float  # unix seconds from which the key is refused (now, or the end of a rotation's grace)


revoked_encoder = msgspec.json.Encoder()
revoked_decoder = msgspec.json.Decoder(Revoked)
