"""CORS: preflights answered for every route, and the allowed origins (`cors_origins`) on every response.

With no origins configured, browsers on other origins are refused as before (no CORS headers), but an OPTIONS
request still gets 204 and its `Allow` header rather than a 405.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
# What a browser client may read: who served, the request id, limits and retry hints.
EXPOSED = ("x-request-id, x-inferbus-model, x-inferbus-model-version, x-inferbus-provider, x-inferbus-fallbacks,"
           " x-inferbus-cache, retry-after, x-ratelimit-limit-requests, x-ratelimit-remaining-requests,"
           " x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, x-ratelimit-reset-requests,"
           " x-ratelimit-reset-tokens")


class Cors:
    def __init__(self, origins: list[str], max_age_s: int = 600) -> None:
        self.any = "*" in origins
        self.origins = frozenset(o.rstrip("/") for o in origins)
        self.max_age_s = max_age_s

    def allowed(self, origin: str | None) -> str | None:
        """The Access-Control-Allow-Origin value for `origin`, or None."""
        if not origin:
            return None
        if self.any:
            return "*"
        return origin if origin.rstrip("/") in self.origins else None

    def headers(self, origin: str | None) -> dict[str, str]:
        allow = self.allowed(origin)
        if allow is None:
            return {}
        out = {"Access-Control-Allow-Origin": allow, "Access-Control-Expose-Headers": EXPOSED}
        if allow != "*":
            out["Vary"] = "Origin"
        return out

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "OPTIONS":
            return await handler(request)
        missing = request.match_info.http_exception
        if isinstance(missing, web.HTTPNotFound):
            return await handler(request)  # no such route: the error middleware's 404
        allowed = getattr(missing, "allowed_methods", None) or set()
        headers = {"Allow": ", ".join(sorted({*allowed, "OPTIONS"}))}
        cors = self.headers(request.headers.get("Origin"))
        if cors and request.headers.get("Access-Control-Request-Method"):
            headers.update(cors)
            headers["Access-Control-Allow-Methods"] = METHODS
            requested = request.headers.get("Access-Control-Request-Headers")
            headers["Access-Control-Allow-Headers"] = requested or "authorization, content-type, x-api-key"
            headers["Access-Control-Max-Age"] = str(self.max_age_s)
        return web.Response(status=204, headers=headers)

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Every response (streams too: their headers go out at prepare) carries the allowed origin."""
        if request.method == "OPTIONS":
            return
        for name, value in self.headers(request.headers.get("Origin")).items():
            response.headers.setdefault(name, value)


def install(app: web.Application, origins: list[str], max_age_s: int = 600) -> Cors:
    """Preflights first (before the error middleware turns them into 405s), origins on every response."""
    cors = Cors(origins, max_age_s)
    app.middlewares.insert(0, cors.middleware)
    if cors.origins:  # none allowed (the default): no headers to add, no hook on every response
        app.on_response_prepare.append(cors.on_prepare)
    return cors
