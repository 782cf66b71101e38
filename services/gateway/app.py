"""Build the aiohttp application and run the gateway process."""

from __future__ import annotations

import asyncio

from aiohttp import web

from services.gateway import (
    admin_routes,
    audio_routes,
    batch_routes,
    cache_routes,
    console,
    cors,
    embeddings_routes,
    files_routes,
    messages_routes,
    openai_routes,
    openapi,
    playground,
    realtime,
    requests_routes,
    responses_routes,
    speech_routes,
    traced,
    vision_routes,
    websocket,
)
from services.gateway.errors import error_middleware
from services.gateway.state import GATEWAY, Gateway, GatewaySettings
from services.runtime import logging as log
from services.runtime import service, settings, tracing


def build_app(gw: Gateway) -> web.Application:
    middlewares = [error_middleware] if tracing.tracer is None else [error_middleware, traced.server_spans]
    app = web.Application(middlewares=middlewares, client_max_size=gw.settings.max_body_bytes)
    app[GATEWAY] = gw
    app.add_routes(openai_routes.routes)
    app.add_routes(websocket.routes)
    app.add_routes(admin_routes.routes)
    app.add_routes(audio_routes.routes)
    app.add_routes(speech_routes.routes)
    app.add_routes(embeddings_routes.routes)
    app.add_routes(vision_routes.routes)
    app.add_routes(realtime.routes)
    app.add_routes(playground.routes)
    app.add_routes(console.routes)  # the ops console and the admin JSON it reads
    requests_routes.register(app)
    app.add_routes(files_routes.routes)
    batch_routes.register(app)  # the Batch API, and batch lines run through this gateway's dispatch
    app.add_routes(cache_routes.routes)
    app.add_routes(responses_routes.routes)
    app.add_routes(messages_routes.routes)
    app.add_routes(openapi.routes)  # /openapi.json describes every route above
    cors.install(app, gw.settings.cors_origins, gw.settings.cors_max_age_s)
    # No /metrics here: it names tenants and their spend. It is on the loopback metrics port.
    return app


async def serve(gw: Gateway) -> web.AppRunner:
    runner = web.AppRunner(build_app(gw), access_log=None, handler_cancellation=True, shutdown_timeout=5)
    await runner.setup()
    await web.TCPSite(runner, gw.settings.host, gw.settings.port, backlog=1024).start()
    return runner


async def main(stop: asyncio.Event) -> None:
    cfg = settings.load(GatewaySettings, "gateway")
    log.configure("gateway", cfg.log_level)
    gw = Gateway(cfg)
    await gw.start()
    runner = await serve(gw)
    log.get("gateway").info("gateway_ready", url=f"http://{cfg.host}:{cfg.port}")
    await stop.wait()
    await runner.cleanup()
    await gw.close()


def run() -> None:
    service.run(main)


if __name__ == "__main__":
    run()
