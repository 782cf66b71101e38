"""The gateway's HTTP server span per inference request (installed only when tracing is on)."""

from __future__ import annotations

import asyncio

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
