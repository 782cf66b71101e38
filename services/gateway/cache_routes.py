"""`POST /v1/cache/false-hits`: a client says a cached answer was for another question (drop it, count it)."""

from __future__ import annotations

import msgspec
from aiohttp import web

from contracts.errors import InferBusError, invalid
from services.gateway.errors import json_response
from services.gateway.state import GATEWAY

routes = web.RouteTableDef()


class FalseHit(msgspec.Struct, forbid_unknown_fields=True):
    request_id: str  # the x-request-id of the response that came from the cache


@routes.post("/v1/cache/false-hits")
async def report_false_hit(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    await gw.authorize(request)
    try:
        body = msgspec.json.decode(await request.read(), type=FalseHit)
    except msgspec.MsgspecError as exc:
        raise invalid(f"send {{\"request_id\": \"...\"}}: {exc}", "request_id") from None
    if gw.cache is None or not await gw.cache.report_false_hit(body.request_id):
        raise InferBusError("not_found", f"no recent cache hit has the request id {body.request_id!r}",
                            param="request_id")
    return json_response(200, {"request_id": body.request_id, "dropped": True})
