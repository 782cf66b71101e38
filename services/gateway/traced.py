"""The gateway's server span per inference request: HTTP routes through a middleware (installed only when tracing
is on), a WebSocket's requests (/v1/ws, /v1/realtime) one by one with `socket_span`."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from contracts.errors import InferBusError
from services.gateway.errors import Handler
from services.runtime import tracing

# Inference routes, and their `gen_ai.operation.name` (OpenTelemetry's names where it has one).
OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/responses": "chat",
    "/v1/messages": "chat",
    "/v1/embeddings": "embeddings",
    "/v1/audio/transcriptions": "transcription",
    "/v1/audio/translations": "translation",
    "/v1/audio/speech": "speech",
    "/v1/vision/classify": "classification",
    "/v1/vision/ocr": "ocr",
    "/v1/moderations": "moderation",
}

TRANSPORT = "inferbus.transport"  # "websocket" (/v1/ws), "realtime" (/v1/realtime); HTTP spans have http.*


def socket_span(name: str, traceparent: str | None, attributes: dict[str, Any]) -> tracing.Active | None:
    """A SERVER span for one request on a socket (None when tracing is off), current in the calling task until
    its `end`: the child of `traceparent` (the request's own or the upgrade request's), else a root."""
    if tracing.tracer is None:
        return None
    return tracing.start(name, {"traceparent": traceparent} if traceparent else None, attributes)


@web.middleware
async def server_spans(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A SERVER span around an inference route (child of the client's `traceparent`), current while it runs:
    the dispatcher adds the model, version and usage, the bus headers carry it to the worker. Inside the
    error middleware, so it sees the error code before that turns it into a response."""
    operation = OPERATIONS.get(request.path) if request.method == "POST" else None
    if operation is None:
        return await handler(request)
    span = tracing.start(f"POST {request.path}", request.headers, {
        "http.request.method": "POST", "http.route": request.path, tracing.OPERATION: operation,
    })
    status: int = 500
    code: str | None = "internal_error"  # an exception of another kind: the error middleware's 500
    try:
        response = await handler(request)
        status, code = response.status, None
        return response
    except InferBusError as exc:
        status, code = exc.http_status, exc.code
        raise
    except web.HTTPException as exc:
        status, code = exc.status, (None if exc.status < 400 else "invalid_request")
        raise
    except asyncio.CancelledError:
        status, code = 499, "cancelled"  # the client went away
        raise
    finally:
        span.end(code, {"http.response.status_code": status})
