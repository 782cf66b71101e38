"""Batch webhooks, signed the Standard Webhooks way, delivered with retries, and only where they may go.

A delivery is a row written in the same transaction as the batch's terminal status, so none is lost to
a crash; the sender leases due rows (a replica that dies mid-send leaves the lease to run out), posts
them, and records each attempt. Receivers may see an event twice (at-least-once): `webhook-id` is stable.

Signature: `webhook-signature: v1,<base64 HMAC-SHA256(key, "<webhook-id>.<webhook-timestamp>.<body>")>`,
the key being the base64 after `whsec_` in the endpoint's secret.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import secrets
import socket
import time
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from prometheus_client import Counter

from contracts.errors import invalid
from services.batch.store import Due, Store
from services.runtime import logging as log

DELIVERIES = Counter("inferbus_batch_webhook_attempts_total", "Webhook delivery attempts", ["outcome"])
LEASE_S = 60.0  # a row being sent is not due again for this long


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(secret: str, headers: dict[str, str], body: bytes, tolerance_s: float = 300.0) -> bool:
    """What a receiver does (the tests' receiver uses it): signature and timestamp checks."""
    msg_id, stamp = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "")
    if not msg_id or not stamp.isdigit() or abs(time.time() - int(stamp)) > tolerance_s:
        return False
    expected = sign(secret, msg_id, int(stamp), body).split(",", 1)[1]
    offered = [s.split(",", 1)[1] for s in headers.get("webhook-signature", "").split() if s.startswith("v1,")]
    return any(hmac.compare_digest(expected, s) for s in offered)


def public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
                or ip.is_unspecified or (ip.version == 6 and ip.ipv4_mapped is not None
                                         and not public(str(ip.ipv4_mapped))))


def check_url(url: str, allow_private: bool) -> str:
    """A webhook URL as given, if it may be used; an invalid_request error naming what is wrong otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise invalid("webhook_url must be an http(s) URL", "metadata.webhook_url")
    if parts.username or parts.password:
        raise invalid("webhook_url must not carry credentials", "metadata.webhook_url")
    if not allow_private:
        try:
            literal = ipaddress.ip_address(parts.hostname)
        except ValueError:
            literal = None
        if (literal is not None and not public(str(literal))) or parts.hostname.lower() == "localhost":
            raise invalid("webhook_url may not point at a private or loopback address", "metadata.webhook_url")
    return url


class PublicResolver(AbstractResolver):
    """Resolves like aiohttp's default, but refuses names that lead to private or loopback addresses."""

    def __init__(self) -> None:
        self.inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        found = await self.inner.resolve(host, port, family)
        allowed = [r for r in found if public(r["host"])]
        if not allowed:
            raise OSError(f"{host} resolves only to private or loopback addresses")
        return allowed

    async def close(self) -> None:
        await self.inner.close()


class Sender:
    """Delivers due webhooks: one POST per attempt, backoff between, a row per event in the delivery log."""

    def __init__(self, store: Store, *, allow_private: bool, backoff_s: list[float], timeout_s: float) -> None:
        self.store = store
        self.allow_private = allow_private
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.wake = asyncio.Event()
        self._http: aiohttp.ClientSession | None = None
        self.logger = log.get("batch-webhooks")

    async def loop(self, stop: asyncio.Event) -> None:
        connector = aiohttp.TCPConnector(resolver=None if self.allow_private else PublicResolver(), limit=32)
        self._http = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        try:
            while not stop.is_set():
                try:
                    sent = await self.round()
                except Exception as exc:  # PostgreSQL away: the rows wait
                    self.logger.warning("webhook_round_failed", error=repr(exc))
                    sent = 0
                if sent:
                    continue
                try:
                    async with asyncio.timeout(1.0):
                        await self.wake.wait()
                except TimeoutError:
                    pass
                self.wake.clear()
        finally:
            await self._http.close()

    async def round(self, limit: int = 16) -> int:
        async with self.store.pool.acquire() as conn, conn.transaction():
            due = await self.store.due(conn, limit)
            for d in due:  # leased: not due again while this round sends it
                await conn.execute("UPDATE batch_deliveries SET next_at = now() + make_interval(secs => $2)"
                                   " WHERE event_id = $1", d.event_id, LEASE_S)
        await asyncio.gather(*(self._send(d) for d in due))
        return len(due)

    async def _send(self, due: Due) -> None:
        hook = await self.store.webhook(due.key_id)
        status: int | None = None
        error: str | None = None
        if hook is None:
            error = "the key's webhook secret was deleted"
        else:
            try:
                check_url(due.url, self.allow_private)
                status = await self._post(due, hook[1])
                if not 200 <= status < 300:
                    error = f"the receiver answered HTTP {status}"
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"[:500]
        ok = error is None
        attempt = due.attempts + 1
        next_in = None if ok or attempt > len(self.backoff_s) else self.backoff_s[attempt - 1]
        DELIVERIES.labels("ok" if ok else ("retry" if next_in is not None else "failed")).inc()
        if not ok:
            self.logger.warning("webhook_attempt_failed", event_id=due.event_id, attempt=attempt, error=error,
                                retry_in=next_in)
        async with self.store.pool.acquire() as conn:
            await self.store.delivered(conn, due.event_id, status, error, ok, next_in)

    async def _post(self, due: Due, secret: str) -> int:
        assert self._http is not None
        stamp = int(time.time())
        headers = {"content-type": "application/json", "webhook-id": due.event_id,
                   "webhook-timestamp": str(stamp), "webhook-signature": sign(secret, due.event_id, stamp, due.payload),
                   "user-agent": "InferBus-Webhooks/1"}
        async with self._http.post(due.url, data=due.payload, headers=headers, allow_redirects=False) as resp:
            await resp.read()
            return resp.status

