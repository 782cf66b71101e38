"""Admin HTTP endpoints (`/v1/admin/*`, admin keys only), the same operations as NATS `admin.*`; and `/v1/usage`."""

from __future__ import annotations

import time
from typing import Any

import msgspec
from aiohttp import web

from contracts import usage
from contracts.control import Reply
from contracts.errors import InferBusError, invalid
from contracts.tenancy import (
    CreateKey,
    CreateTenant,
    ListKeys,
    ListTenants,
    RevokeKey,
    RotateKey,
    UpdateKey,
    UpdateTenant,
)
from contracts.usage import UsageQuery
from services.cli.usage import moment, render_csv
from services.gateway.auth import KeyRecord
from services.gateway.errors import from_validation, json_response
from services.gateway.state import GATEWAY
from services.gateway.tenancy import TenancyAdmin

routes = web.RouteTableDef()


async def admin_key(request: web.Request) -> KeyRecord:
    """The caller's key, which must have the admin scope."""
    key = await request.app[GATEWAY].authorize(request)
    if not key.is_admin:
        raise InferBusError("permission_denied", "This endpoint needs an API key with the admin scope")
    return key


async def ask(request: web.Request, subject: str, body: msgspec.Struct, service: str, timeout_s: float = 10) -> Any:
    """A control-plane service's answer to `body` on `subject` (its `Reply.result`), or its typed error; 503
    `no_worker` naming `service` when none answers."""
    try:
        msg = await request.app[GATEWAY].service.bus.request(subject, msgspec.json.encode(body), timeout=timeout_s)
    except Exception as exc:  # no responders or a timeout: the service is down
        raise InferBusError("no_worker", f"The {service} is not answering; retry shortly") from exc
    reply = msgspec.json.decode(msg.data, type=Reply)
    if reply.error is not None:
        raise InferBusError(reply.error.code, reply.error.message, param=reply.error.param)
    return reply.result


async def admin_body(request: web.Request, typ: type[Any], **fields: Any) -> Any:
    """An admin's request: the body (a JSON object) plus `fields` as `typ`, the key's id as its `actor`."""
    key = await admin_key(request)
    raw = await request.read()
    try:
        body = msgspec.json.decode(raw) if raw else {}
    except msgspec.DecodeError as exc:
        raise from_validation(exc) from None
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object")
    try:
        return msgspec.convert({**body, **fields, "actor": f"key:{key.id}"}, typ)
    except msgspec.ValidationError as exc:
        raise from_validation(exc) from None


async def _admin(request: web.Request, typ: type[Any], **fields: Any) -> tuple[TenancyAdmin, Any]:
    parsed = await admin_body(request, typ, **fields)
    tenancy = request.app[GATEWAY].tenancy
    assert tenancy is not None
    return tenancy, parsed


def _ok(result: Any, status: int = 200) -> web.Response:
    return json_response(status, msgspec.to_builtins(result))


@routes.post("/v1/admin/tenants")
async def create_tenant(request: web.Request) -> web.Response:
    admin, body = await _admin(request, CreateTenant)
    return _ok(await admin.create_tenant(body), 201)


@routes.get("/v1/admin/tenants")
async def list_tenants(request: web.Request) -> web.Response:
    admin, body = await _admin(request, ListTenants)
    return _ok({"object": "list", "data": await admin.list_tenants(body)})


@routes.patch("/v1/admin/tenants/{tenant}")
async def update_tenant(request: web.Request) -> web.Response:
    admin, body = await _admin(request, UpdateTenant, tenant=request.match_info["tenant"])
    return _ok(await admin.update_tenant(body))


@routes.post("/v1/admin/keys")
async def create_key(request: web.Request) -> web.Response:
    admin, body = await _admin(request, CreateKey)
    return _ok(await admin.create_key(body), 201)


@routes.get("/v1/admin/keys")
async def list_keys(request: web.Request) -> web.Response:
    query = request.query
    fields: dict[str, Any] = {"include_revoked": query.get("include_revoked", "false").lower() in ("1", "true")}
    if "tenant" in query:
        fields["tenant"] = query["tenant"]
    admin, body = await _admin(request, ListKeys, **fields)
    return _ok({"object": "list", "data": await admin.list_keys(body)})


@routes.post("/v1/admin/keys/{key_id}/revoke")
async def revoke_key(request: web.Request) -> web.Response:
    admin, body = await _admin(request, RevokeKey, key_id=request.match_info["key_id"])
    return _ok(await admin.revoke_key(body))


@routes.post("/v1/admin/keys/{key_id}/rotate")
async def rotate_key(request: web.Request) -> web.Response:
    admin, body = await _admin(request, RotateKey, key_id=request.match_info["key_id"])
    return _ok(await admin.rotate_key(body), 201)


@routes.patch("/v1/admin/keys/{key_id}")
async def update_key(request: web.Request) -> web.Response:
    admin, body = await _admin(request, UpdateKey, key_id=request.match_info["key_id"])
    return _ok(await admin.update_key(body))


# ---- usage ----------------------------------------------------------------------------------------


def _moment(param: str, text: str, now: float) -> float:
    try:
        return moment(text, now)
    except ValueError as exc:
        raise invalid(str(exc), param) from None


@routes.get("/v1/usage")
async def get_usage(request: web.Request) -> web.Response:
    """Usage from the ledger. Admin keys: any tenant or key; other keys: their own usage only."""
    gw = request.app[GATEWAY]
    key = await gw.authorize(request)
    query = request.query
    now = time.time()
    fields: dict[str, Any] = {
        "since": _moment("since", query.get("since", "24h"), now),
        "group_by": [g.strip() for g in query.get("group_by", "").split(",") if g.strip()],
        "include_shadow": query.get("include_shadow", "false").lower() in ("1", "true"),
    }
    if "until" in query:
        fields["until"] = _moment("until", query["until"], now)
    if "model" in query:
        fields["model"] = query["model"]
    if key.is_admin:
        for name in ("tenant_id", "key_id"):
            if name in query:
                fields[name] = query[name]
    else:
        for name in ("tenant_id", "key_id"):
            if name in query and query[name] != (key.tenant_id if name == "tenant_id" else key.id):
                raise InferBusError("permission_denied", "A non-admin key can only read its own usage", param=name)
        fields["key_id"] = key.id
    fmt = query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise invalid("format must be json or csv", "format")
    try:
        body = msgspec.convert(fields, UsageQuery)
    except msgspec.ValidationError as exc:
        raise from_validation(exc) from None
    result = await ask(request, usage.USAGE_QUERY, body, "usage service")
    if fmt == "csv":
        return web.Response(text=render_csv(result) + "\n", content_type="text/csv")
    return json_response(200, {"object": "usage", **result})
