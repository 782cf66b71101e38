"""Prometheus /metrics for a service: one small aiohttp app on its own (loopback by default) port.

The public HTTP port of the gateway does not serve metrics: they name tenants and their spend.
Each service publishes its metrics port in its NATS micro metadata (`metrics_port`), which is how
scrapers and tests find it. Every service also samples its own event-loop lag here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Histogram, generate_latest

LAG_INTERVAL_S = 0.1
LOOP_LAG = Histogram(
    "inferbus_event_loop_lag_seconds",
    "How late the event loop ran a timer due every 100 ms (time the loop was blocked)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)


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


async def sample_loop_lag(
    interval_s: float = LAG_INTERVAL_S, observe: Callable[[float], None] = LOOP_LAG.observe
) -> None:
    """Forever: sleep `interval_s` and record how much later than that the loop woke us up."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval_s
        await asyncio.sleep(interval_s)
        observe(max(0.0, loop.time() - due))


def url(info: dict[str, Any], host: str = "127.0.0.1") -> str | None:
    """The /metrics URL of one micro service instance (a `$SRV.INFO` answer), if it publishes one."""
    port = (info.get("metadata") or {}).get("metrics_port")
    return f"http://{host}:{port}/metrics" if port and port != "0" else None
