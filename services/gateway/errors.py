"""One error mapping for HTTP: InferBusError and aiohttp's own errors become OpenAI-style JSON; every response
that passes is counted by route, status and error code."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web
from prometheus_client import Counter

from contracts.errors import InferBusError, invalid
from services.runtime import logging as log

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_AT = re.compile(r" - at `\$\.?([^`]*)`$")
_UNKNOWN = re.compile(r"Object contains unknown field `([^`]+)`")

# Bounded labels: `route` is the matched route's template (`/v1/models/{model}`), never the raw path, or UNMATCHED;
# `code` is the error catalogue's code of an error raised to this middleware, "" when the handler answered itself
# (every success, and the routes that shape their own errors: /v1/messages's Anthropic ones, /readyz).
# CORS preflights are answered before this middleware and not counted.
RESPONSES = Counter(
    "inferbus_http_responses_total", "HTTP responses by route template, status and error code",
    ["route", "status", "code"],
)
UNMATCHED = "unmatched"  # no route has the path (404) or the method (405)
# One pre-bound child per (route, status, code): a request pays a dict lookup, not a labels() call.
_responses: dict[tuple[str, int, str], Counter] = {}


def json_response(status: int, body: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=msgspec.json.encode(body), content_type="application/json", headers=headers
    )


def error_response(exc: InferBusError) -> web.Response:
    return json_response(exc.http_status, exc.openai_body(), exc.headers or None)


def from_validation(exc: msgspec.MsgspecError) -> InferBusError:
    """A msgspec decode/validation failure as the OpenAI-style 400 a client can act on."""
    text = str(exc)
    unknown = _UNKNOWN.search(text)
    if unknown:
        return invalid(f"Unrecognized request argument supplied: {unknown.group(1)}", unknown.group(1))
    if isinstance(exc, msgspec.ValidationError):
        at = _AT.search(text)
        param = at.group(1) if at else None
        message = _AT.sub("", text)
        return invalid(f"Invalid value for '{param}': {message}" if param else message, param)
    return invalid(f"We could not parse the JSON body of your request: {text}")


def _count(request: web.Request, status: int, code: str = "") -> None:
    resource = request.match_info.route.resource
    key = (resource.canonical if resource is not None else UNMATCHED, status, code)
    child = _responses.get(key)
    if child is None:
        child = _responses[key] = RESPONSES.labels(key[0], str(status), code)
    child.inc()


def _counted(request: web.Request, exc: InferBusError) -> web.Response:
    _count(request, exc.http_status, exc.code)
    return error_response(exc)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except InferBusError as exc:
        return _counted(request, exc)
    except web.HTTPRequestEntityTooLarge as exc:
        return _counted(request, InferBusError("request_too_large", f"Request body too large: {exc.text}"))
    except web.HTTPException as exc:
        if exc.status < 400:
            _count(request, exc.status)
            raise
        code = "not_found" if exc.status in (404, 405) else "invalid_request"
        message = f"{request.method} {request.path}: {exc.reason}"
        body = InferBusError(code, message).openai_body()
        _count(request, exc.status, code)
        return json_response(exc.status, body)
    except ConnectionError as exc:  # the client closed its connection while its answer was written: not ours
        log.get("gateway").debug("client_gone", path=request.path, error=repr(exc))
        _count(request, 499, "cancelled")
        # Nothing can reach it any more; aiohttp's write of this fails as a premature disconnection (debug level),
        # where the exception itself would be logged as an error.
        return web.Response(status=499)
    except asyncio.CancelledError:  # the client went away mid-request (handler cancellation)
        _count(request, 499, "cancelled")
        raise
    except Exception:
        log.get("gateway").exception("unhandled_error", path=request.path)
        error = InferBusError("internal_error", "The server had an error processing your request")
        return _counted(request, error)
    _count(request, response.status)
    return response
