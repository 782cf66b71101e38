"""The one NATS connection wrapper: reconnecting client, discovery of micro services."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import nats.errors
from nats.aio.client import Client

from services.runtime import logging as log

Connection = Client


async def connect(url: str, name: str, *, connect_timeout: int = 5) -> Client:
    logger = log.get("bus")

    async def on_error(exc: Exception) -> None:
        logger.warning("nats_error", error=str(exc))

    async def on_disconnect() -> None:
        if not (nc.is_closed or nc.is_draining):
            logger.warning("nats_disconnected")

    async def on_reconnect() -> None:
        logger.info("nats_reconnected")

    nc = Client()
    await nc.connect(
        url,
        name=name,
        connect_timeout=connect_timeout,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,  # type: ignore[arg-type]  # nats-py annotates int, takes float
        allow_reconnect=True,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
    )
    return nc


async def discover(nc: Client, verb: str = "STATS", name: str | None = None, wait: float = 0.5) -> list[dict[str, Any]]:
    """Ask every micro service (or every instance of `name`) and gather the answers for `wait` s."""
    subject = f"$SRV.{verb}" + (f".{name}" if name else "")
    inbox = nc.new_inbox()
    replies: list[dict[str, Any]] = []
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish(subject, b"", reply=inbox)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while (remaining := deadline - loop.time()) > 0:
            try:
                msg = await sub.next_msg(timeout=remaining)
            except nats.errors.TimeoutError:
                break
            if msg.data:
                replies.append(json.loads(msg.data))
    finally:
        await sub.unsubscribe()
    return replies


async def service_stats(nc: Client, name: str | None = None, wait: float = 0.5) -> list[dict[str, Any]]:
    """The live data (the service's stats source) of every instance of `name` that answered STATS."""
    return [stats_data(svc) for svc in await discover(nc, "STATS", name, wait)]


def stats_data(svc: dict[str, Any]) -> dict[str, Any]:
    # Every endpoint of one instance carries the same data; the health endpoint always exists.
    for endpoint in svc.get("endpoints", []):
        if endpoint.get("data"):
            return dict(endpoint["data"])
    return {}
