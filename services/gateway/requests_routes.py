"""`GET /v1/admin/requests` (admin keys only): the request log, asked of the metering service over NATS."""

from __future__ import annotations

import time
from typing import Any

import msgspec
from aiohttp import web

from contracts.errors import invalid
from contracts.requestlog import REQUESTS_QUERY, RequestQuery
from services.cli.admin import duration
from services.gateway.admin_routes import admin_key, ask
from services.gateway.errors import from_validation, json_response

routes = web.RouteTableDef()
FILTERS = ("key_id", "tenant_id", "model", "status", "error_code", "cursor")
PARAMS = frozenset({*FILTERS, "since", "until", "limit", "include_bodies"})


def register(app: web.Application) -> None:
    app.add_routes(routes)


def _moment(text: str, now: float) -> float | str:
    """A duration ago ('1h', '30m') as unix seconds; anything else (unix seconds, ISO 8601) for metering to read."""
    stripped = text.strip()
    if stripped[-1:].isalpha():
        try:
            return now - duration(stripped)
        except ValueError:
            pass
    return stripped


def query_of(params: Any, now: float) -> RequestQuery:
    unknown = sorted(set(params) - PARAMS)
    if unknown:
        raise invalid(f"unknown query parameter {unknown[0]!r}: use {', '.join(sorted(PARAMS))}", unknown[0])
    fields: dict[str, Any] = {name: params[name] for name in FILTERS if name in params}
    for name in ("since", "until"):
        if name in params:
            fields[name] = _moment(params[name], now)
    if "limit" in params:
        try:
            fields["limit"] = int(params["limit"])
        except ValueError:
            raise invalid("limit must be an integer", "limit") from None
    fields["include_bodies"] = params.get("include_bodies", "false").lower() in ("1", "true", "yes")
    try:
        return msgspec.convert(fields, RequestQuery)
    except msgspec.ValidationError as exc:
        raise from_validation(exc) from None


@routes.get("/v1/admin/requests")
async def list_requests(request: web.Request) -> web.Response:
    await admin_key(request)
    body = query_of(request.query, time.time())
    return json_response(200, {"object": "list", **await ask(request, REQUESTS_QUERY, body, "request log service")})
