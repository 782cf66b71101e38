"""The browser playground (GET /playground): one static page for chat and push-to-talk voice.

The page (static/playground.html, plain HTML and JavaScript, nothing loaded from elsewhere) talks to
the gateway's own public API with the key the user types in: /v1/models, streaming
/v1/chat/completions and the Realtime WebSocket at /v1/realtime. Serving it needs no key.

The key is never part of a URL the server sees (URLs end up in browser history, proxy and access
logs): the page takes it from its input field or from the fragment (`/playground#key=...`, which
browsers do not send), removes it from the address bar at once and keeps it in sessionStorage.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

routes = web.RouteTableDef()


def page() -> bytes:
    return resources.files("services.gateway").joinpath("static", "playground.html").read_bytes()


@routes.get("/playground")
async def playground(_: web.Request) -> web.Response:
    return web.Response(body=page(), content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-cache"})
