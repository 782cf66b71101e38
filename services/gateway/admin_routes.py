"""Admin HTTP endpoints (`/v1/admin/*`, admin keys only): the same operations as the NATS `admin.*` subjects."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

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
from services.gateway.errors import from_validation, json_response
from services.gateway.state import GATEWAY
from services.gateway.tenancy import TenancyAdmin

routes = web.RouteTableDef()


async def _admin(request: web.Request, typ: type[Any], **fields: Any) -> tuple[TenancyAdmin, Any]:
    """The caller must hold an admin key; the body (a JSON object) plus `fields` decode as `typ`."""
    gw = request.app[GATEWAY]
    key = await gw.authorize(request)
    if not key.is_admin:
        raise InferBusError("permission_denied", "This endpoint needs an API key with the admin scope")
    raw = await request.read()
    try:
        body = msgspec.json.decode(raw) if raw else {}
    except msgspec.DecodeError as exc:
        raise from_validation(exc) from None
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object")
    try:
        parsed = msgspec.convert({**body, **fields, "actor": f"key:{key.id}"}, typ)
    except msgspec.ValidationError as exc:
        raise from_validation(exc) from None
    assert gw.tenancy is not None
    return gw.tenancy, parsed


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
