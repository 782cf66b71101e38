"""One error mapping for HTTP: InferBusError and aiohttp's own errors become OpenAI-style JSON."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web

from contracts.errors import InferBusError, invalid
from services.runtime import logging as log

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_AT = re.compile(r" - at `\$\.?([^`]*)`$")
_UNKNOWN = re.compile(r"Object contains unknown field `([^`]+)`")


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


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except InferBusError as exc:
        return error_response(exc)
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(InferBusError("request_too_large", f"Request body too large: {exc.text}"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = "not_found" if exc.status in (404, 405) else "invalid_request"
        message = f"{request.method} {request.path}: {exc.reason}"
        body = InferBusError(code, message).openai_body()
        return json_response(exc.status, body)
    except ConnectionError as exc:  # the client closed its connection while its answer was written: not ours
        log.get("gateway").debug("client_gone", path=request.path, error=repr(exc))
        # Nothing can reach it any more; aiohttp's write of this fails as a premature disconnection (debug level),
        # where the exception itself would be logged as an error.
        return web.Response(status=499)
    except Exception:
        log.get("gateway").exception("unhandled_error", path=request.path)
        return error_response(InferBusError("internal_error", "The server had an error processing your request"))
