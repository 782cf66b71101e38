"""Prometheus /metrics for a service: one small aiohttp app on its own port."""

from __future__ import annotations

import asyncio
from typing import cast

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest


async def metrics_handler(_: web.Request) -> web.Response:
    body = generate_latest(REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def serve(host: str, port: int) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = cast(asyncio.Server | None, site._server)
    actual = port
    if server is not None and server.sockets:
        actual = server.sockets[0].getsockname()[1]
    return runner, actual
