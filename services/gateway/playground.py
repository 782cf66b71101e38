"""The browser playground (GET /playground): one static page for chat and push-to-talk voice.

The page (static/playground.html, plain HTML and JavaScript, nothing loaded from elsewhere) talks to
the gateway's own public API with the key the user types in: /v1/models, streaming
/v1/chat/completions and the Realtime WebSocket at /v1/realtime. Serving it needs no key.
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
