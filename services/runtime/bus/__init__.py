"""The one door to NATS: connections with their identity, discovery, and the nats-py names other modules use.

Only this package imports nats-py. Services take the types they need from here (`bus.Msg`,
`bus.JetStreamContext`, `bus.errors.TimeoutError`, …), so a change of client library, or of how we
authenticate, reconnect or fetch, is a change here alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
from typing import Any

import nats.errors
import nats.errors as errors
import nats.js.errors as js_errors
import nats.micro as micro
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore
from nats.micro.request import Request as MicroRequest
from nats.micro.service import EndpointStats
from nats.micro.service import Service as MicroService
from prometheus_client import Gauge

from services.runtime import logging as log
from services.runtime.natsauth import inbox_prefix, read_credentials

Connection = Client
HEADROOM = 1024  # bytes of a message left for its headers under the server's max payload
__all__ = [
    "HEADROOM", "AckPolicy", "Connection", "ConsumerConfig", "DeliverPolicy", "DiscardPolicy", "EndpointStats",
    "Identity", "JetStreamContext", "KeyValue", "KeyValueConfig", "MicroRequest", "MicroService", "Msg", "ObjectStore",
    "ObjectStoreConfig", "RetentionPolicy", "StorageType", "StreamConfig", "connect", "discover", "errors",
    "js_errors", "micro", "service_stats", "stats_data",
]


# Set from nats-py's connection callbacks only: nothing on the publish path touches it.
CONNECTED = Gauge(
    "inferbus_nats_connected", "1 while this connection to NATS is up, 0 while it is down or closed", ["connection"]
)


class Identity:
    """How one connection authenticates: a role's credentials file, or an API key (internal clients)."""

    def __init__(
        self,
        credentials: str = "",
        *,
        api_key: str = "",
        tls_ca: str = "",
        tls_cert: str = "",
        tls_key: str = "",
    ) -> None:
        self.credentials = credentials
        self.api_key = api_key
        self.tls_ca, self.tls_cert, self.tls_key = tls_ca, tls_cert, tls_key

    @classmethod
    def of(cls, settings: Any) -> Identity:
        """From a service's settings (CommonSettings: nats_credentials, nats_tls_*)."""
        return cls(
            settings.nats_credentials, tls_ca=settings.nats_tls_ca, tls_cert=settings.nats_tls_cert,
            tls_key=settings.nats_tls_key,
        )

    @classmethod
    def from_env(cls) -> Identity:
        env = os.environ
        return cls(
            env.get("INFERBUS_NATS_CREDENTIALS", ""), tls_ca=env.get("INFERBUS_NATS_TLS_CA", ""),
            tls_cert=env.get("INFERBUS_NATS_TLS_CERT", ""), tls_key=env.get("INFERBUS_NATS_TLS_KEY", ""),
        )

    def with_credentials(self, credentials: str) -> Identity:
        """The same TLS settings, another user (a service's second connection, e.g. the auth callout's)."""
        return Identity(credentials, tls_ca=self.tls_ca, tls_cert=self.tls_cert, tls_key=self.tls_key)

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.credentials:
            opts["user"], opts["password"] = read_credentials(self.credentials)
        elif self.api_key:
            opts["token"] = self.api_key
            opts["inbox_prefix"] = inbox_prefix(self.api_key)
        if self.tls_ca:
            context = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert:
                context.load_cert_chain(self.tls_cert, self.tls_key or None)
            opts["tls"] = context
        return opts


async def connect(
    url: str, name: str, *, connect_timeout: int = 5, identity: Identity | None = None, reconnect: bool = True
) -> Client:
    """A reconnecting connection; `identity` defaults to INFERBUS_NATS_CREDENTIALS / INFERBUS_NATS_TLS_*."""
    logger = log.get("bus")

    async def on_error(exc: Exception) -> None:
        logger.warning("nats_error", error=str(exc))

    connected = CONNECTED.labels(name)

    async def on_disconnect() -> None:
        connected.set(0)
        if not (nc.is_closed or nc.is_draining):
            logger.warning("nats_disconnected")

    async def on_reconnect() -> None:
        connected.set(1)
        logger.info("nats_reconnected")

    async def on_closed() -> None:
        connected.set(0)

    nc = Client()
    await nc.connect(
        servers(url),  # "nats://a:4222,nats://b:4222": any node of a cluster will do to start
        name=name,
        connect_timeout=connect_timeout,
        max_reconnect_attempts=-1 if reconnect else 0,
        reconnect_time_wait=0.5,  # type: ignore[arg-type]  # nats-py annotates int, takes float
        allow_reconnect=reconnect,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        closed_cb=on_closed,
        **(identity or Identity.from_env()).options(),
    )
    connected.set(1)
    return nc


def servers(url: str) -> list[str]:
    """A NATS URL, or several separated by commas (a cluster's nodes), as nats-py's server list."""
    return [u.strip() for u in url.split(",") if u.strip()]


_NEWLINES = str.maketrans("\r\n", "  ")

# Whitespace as str.isspace sees it in an ASCII header name (bytes.isspace leaves out \x1c-\x1f).
_NAME_SPACE = re.compile(rb"[\t\n\x0b\x0c\r\x1c-\x1f ]")


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """nats-py's `Client._parse_header_lines`, the same result for every input, without its generator over
    each name's characters (a worker parses a request's headers on every request; it showed in profiles)."""
    out: dict[str, str] = {}
    for line in raw.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        name = name.strip()
        if not name.isascii() or _NAME_SPACE.search(name):  # not a token: skipped, as nats-py does
            continue
        out[name.decode("ascii")] = value.strip().decode("utf-8", "replace")
    return out


NATS_PARSE_HEADER_LINES = Client.__dict__.get("_parse_header_lines")  # nats-py's own, for the equivalence test
if NATS_PARSE_HEADER_LINES is not None:  # a nats-py that parses this way (2.10+): ours instead
    Client._parse_header_lines = staticmethod(parse_header_lines)  # type: ignore[method-assign]


async def publish(
    nc: Client, subject: str, payload: bytes, *, reply: str = "", headers: dict[str, str] | None = None
) -> None:
    """`nc.publish` through `publish_nowait` (without nats-py's per-header regex checks: our header names are
    constants; values have CR/LF replaced so none can inject a header); nats-py's own path where only it may send."""
    if not publish_nowait(nc, subject, payload, reply=reply, headers=headers):
        await nc.publish(subject, payload, reply=reply, headers=headers)


def publish_nowait(
    nc: Client, subject: str, payload: bytes, *, reply: str = "", headers: dict[str, str] | None = None
) -> bool:
    """Queue a publish for nats-py's flusher without awaiting anything: callable from a loop callback, and no
    coroutine, Future or queue hand-off per message (they showed in a streaming worker's profile).

    Returns False, having sent nothing, where only nats-py's own (awaited) path may send: not connected
    (it buffers or refuses), draining, a payload over the server's limit (it raises), the outbound buffer
    over its limit (it flushes first), or no flusher task. The message is in the connection's outbound
    buffer when this returns, so publishes keep their order whichever path each takes.
    """
    try:
        flush_queue = nc._flush_queue
        flusher = nc._flusher_task
        limit = nc._max_pending_size
    except AttributeError:  # another client library: its own path
        return False
    if (flush_queue is None or flusher is None or flusher.done() or not nc.is_connected or nc.is_draining_pubs
            or len(payload) > nc.max_payload):
        return False
    if headers:
        lines = ["NATS/1.0"]
        for key, value in headers.items():
            lines.append(f"{key}: {value.translate(_NEWLINES).strip()}")
        block = ("\r\n".join(lines) + "\r\n\r\n").encode()
        cmd = b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
            subject.encode(), reply.encode(), len(block), len(block) + len(payload), block, payload)
    else:
        cmd = b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), len(payload), payload)
    size = nc._pending_data_size + len(cmd)
    if limit > 0 and size > limit:
        return False
    nc._pending.append(cmd)
    nc._pending_data_size = size
    stats = nc.stats
    stats["out_msgs"] += 1
    stats["out_bytes"] += len(payload)
    if flush_queue.empty():  # kick the flusher, as nats-py does, with a token it has nothing to resolve on
        kick: asyncio.Future[None] | None = getattr(nc, "_inferbus_kick", None)
        if kick is None or kick.get_loop() is not flusher.get_loop():
            kick = flusher.get_loop().create_future()
            kick.set_result(None)
            nc._inferbus_kick = kick  # type: ignore[attr-defined]
        flush_queue.put_nowait(kick)
    return True


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream if it does not exist (idempotent: several services may race to create it)."""
    assert config.name is not None
    try:
        await js.stream_info(config.name)
    except js_errors.NotFoundError:
        try:
            await js.add_stream(config)
        except js_errors.BadRequestError:  # created meanwhile by another service
            await js.stream_info(config.name)


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
