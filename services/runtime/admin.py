"""Admin request handling shared by services: a typed JSON request in, a `Reply` with a result or a typed error out."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from contracts.control import AdminError, Reply
from contracts.errors import InferBusError
from services.runtime.bus import MicroRequest

MicroHandler = Callable[[MicroRequest], Awaitable[None]]


async def call(typ: type[Any], fn: Callable[[Any], Awaitable[Any]], data: bytes, logger: Any, what: str) -> Reply:
    """Decode `data` as `typ`, run `fn` on it; every failure becomes a typed error in the reply."""
    try:
        body = msgspec.json.decode(data or b"{}", type=typ)
        return Reply(result=await fn(body))
    except msgspec.ValidationError as exc:
        return Reply(error=AdminError("invalid_request", f"invalid request: {exc}"))
    except msgspec.DecodeError as exc:
        return Reply(error=AdminError("invalid_request", f"request body is not valid JSON: {exc}"))
    except InferBusError as exc:
        return Reply(error=AdminError(exc.code, exc.message, exc.param))
    except Exception:
        logger.exception("admin_request_failed", request=what)
        return Reply(error=AdminError("internal_error", "the service failed to handle the request"))


def handler(logger: Any, typ: type[Any], fn: Callable[[Any], Awaitable[Any]]) -> MicroHandler:
    """A NATS micro endpoint for one admin operation."""

    async def handle(request: MicroRequest) -> None:
        reply = await call(typ, fn, request.data, logger, request.subject)
        await request.respond(msgspec.json.encode(reply))

    return handle
