"""Trust on the bus: role users with least privilege, API-key clients through auth callout, the NATS edge."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import nats
import nats.errors
import pytest

from contracts import headers as h
from contracts import subjects, usage
from contracts.llm import Accepted, Delta, ErrorChunk, Final, GenerateRequest, Message, chunk_decoder, request_encoder
from services.runtime import bus, natsauth
from services.runtime.local import EmbeddedStack
from services.runtime.metrics import url as metrics_url
from tests.conftest import BENCH_MODEL, DEFAULT_MODEL, SLOW_MODEL, Gateway
from tests.test_secrets_and_metrics import instance_info, scrape, value

pytestmark = pytest.mark.asyncio(loop_scope="session")


class Client:
    """An API-key NATS client (as the README shows), collecting the errors the server sends it."""

    def __init__(self, nc: Any, errors: list[str], key: str) -> None:
        self.nc, self.errors, self.key = nc, errors, key

    @classmethod
    async def connect(cls, infra: EmbeddedStack, key: str, **kw: Any) -> Client:
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        nc = await nats.connect(infra.nats_url, token=key, inbox_prefix=natsauth.inbox_prefix(key),
                                error_cb=on_error, **kw)
        return cls(nc, errors, key)

    async def stream(
        self, model: str, *, request_id: str = "r1", max_tokens: int = 8, raw: bytes | None = None,
        headers: dict[str, str] | None = None, subject: str | None = None,
    ) -> tuple[list[Any], dict[str, str]]:
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        payload = raw if raw is not None else request_encoder.encode(GenerateRequest(
            request_id=request_id, model=model, max_tokens=max_tokens, temperature=0,
            messages=[Message("user", "hello")]))
        await self.nc.publish(subject or f"infer.llm.{model}", payload, reply=inbox, headers=headers)
        chunks: list[Any] = []
        first_headers: dict[str, str] = {}
        try:
            while True:
                msg = await sub.next_msg(timeout=10)
                chunk = chunk_decoder.decode(msg.data)
                if not chunks:
                    first_headers = dict(msg.headers or {})
                chunks.append(chunk)
                if isinstance(chunk, Final | ErrorChunk):
                    return chunks, first_headers
        finally:
            await sub.unsubscribe()

    async def refused(self, what: str, before: int) -> bool:
        """Did the server report a permissions violation naming `what` since `before` errors?"""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            await self.nc.flush()
            if any("permissions violation" in e and what.lower() in e.lower() for e in self.errors[before:]):
                return True
            await asyncio.sleep(0.02)
        return False


async def _create_key(gateway: Gateway, **body: Any) -> tuple[str, str]:
    async with aiohttp.ClientSession() as http, http.post(
        gateway.url + "/v1/admin/keys", json={"name": "nats-client", **body}, headers=gateway.headers
    ) as resp:
        assert resp.status == 201, await resp.text()
        data = await resp.json()
    return data["key"], data["info"]["id"]


async def _revoke(gateway: Gateway, key_id: str) -> None:
    async with aiohttp.ClientSession() as http, http.post(
        gateway.url + f"/v1/admin/keys/{key_id}/revoke", json={}, headers=gateway.headers
    ) as resp:
        assert resp.status == 200, await resp.text()


@pytest.fixture(scope="module")
async def narrow(gateway: Gateway, bench_worker: dict[str, Any]) -> tuple[str, str]:
    return await _create_key(gateway, scopes=[f"model:{BENCH_MODEL}"])


@pytest.fixture(scope="module")
async def client(infra: EmbeddedStack, narrow: tuple[str, str]) -> AsyncIterator[Client]:
    c = await Client.connect(infra, narrow[0])
    yield c
    await c.nc.close()


async def test_unauthenticated_and_wrong_credentials_are_refused(
    infra: EmbeddedStack, gateway: Gateway, nc: bus.Connection
) -> None:
    for kw in ({}, {"token": "ib-not-a-key-" + "z" * 30}, {"user": "gateway", "password": "guess"}):
        with pytest.raises(nats.errors.Error, match="Authorization"):
            await nats.connect(infra.nats_url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=3,
                               **kw)
    log = gateway.proc.log()
    assert "nats_auth_refused" in log
    assert "ib-not-a-key-" not in log  # refusals are logged without the key
    # ... and counted, on the gateway's metrics port
    info = await instance_info(nc, "inferbus-gateway", http=gateway.url)
    url = metrics_url(info)
    assert url is not None
    samples = await scrape(url)
    assert value(samples, "inferbus_nats_auth_total", decision="refused", reason="invalid_key") >= 1
    assert value(samples, "inferbus_nats_auth_total", decision="refused", reason="no_key") >= 1


async def test_a_key_calls_its_model_and_the_stream_comes_back(client: Client, narrow: tuple[str, str]) -> None:
    chunks, first = await client.stream(BENCH_MODEL)
    assert isinstance(chunks[0], Accepted)
    assert isinstance(chunks[-1], Final) and chunks[-1].finish_reason in ("stop", "length")
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert any(isinstance(c, Delta) for c in chunks)
    assert first[h.REQUEST_ID].startswith("nats-")  # minted by the platform, not the client's "r1"


async def test_a_key_cannot_reach_other_models_or_the_control_plane(client: Client) -> None:
    forbidden_pub = [
        f"infer.llm.{DEFAULT_MODEL}", f"infer.llm.{BENCH_MODEL}.v1", "admin.keys.create", "registry.admin.deploy",
        "metering.admin.prices.set", "usage.llm.x", f"registry.heartbeat.llm.{BENCH_MODEL}.v1.w1",
        f"registry.outcome.llm.{BENCH_MODEL}", "$KV.INFERBUS_ROUTING.llm.x", "edge.llm.x",
    ]
    for subject in forbidden_pub:
        before = len(client.errors)
        await client.nc.publish(subject, b"{}", reply=client.nc.new_inbox())
        assert await client.refused(subject, before), subject
    for subject in ("infer.>", "_INBOX.>", "_INBOX.ib-other00.>", "registry.heartbeat.>"):
        before = len(client.errors)
        sub = await client.nc.subscribe(subject)
        assert await client.refused(subject, before), subject
        await sub.unsubscribe()
    assert client.nc.is_connected  # refusals, not a dropped connection


async def test_forged_identity_headers_change_nothing(
    infra: EmbeddedStack, client: Client, narrow: tuple[str, str], nc: bus.Connection
) -> None:
    events: list[Any] = []

    arrived = asyncio.Event()

    async def on_event(msg: Any) -> None:
        events.extend(usage.events_of(msg.data))
        arrived.set()

    sub = await nc.subscribe("usage.>", cb=on_event)
    await nc.flush()
    forged = {h.KEY_ID: "key_admin", h.TENANT: "someone-else", natsauth.INFO_HEADER: '{"acc":"APP","user":"x"}'}
    chunks, first = await client.stream(BENCH_MODEL, headers=forged)
    assert isinstance(chunks[-1], Final)
    rid = first[h.REQUEST_ID]
    async with asyncio.timeout(5):
        while arrived.clear() or not any(e.request_id == rid for e in events):
            await arrived.wait()
    await sub.unsubscribe()
    billed = [e for e in events if e.request_id == rid]
    assert len(billed) == 1
    assert billed[0].key_id == narrow[1] and billed[0].tenant_id == "default"
    assert billed[0].completion_tokens == chunks[-1].usage.completion_tokens


async def test_garbage_gets_typed_errors_and_the_edge_keeps_serving(client: Client, gateway: Gateway) -> None:
    cases = [
        b"", b"\x00\xff\x13garbage", msgspec.msgpack.encode({"model": BENCH_MODEL}),
        msgspec.msgpack.encode([1, 2, 3]), b"\xc1" * 1000,
        request_encoder.encode(GenerateRequest(request_id="x", model=BENCH_MODEL, max_tokens=0, prompt="hi")),
        request_encoder.encode(GenerateRequest(request_id="x", model=BENCH_MODEL, max_tokens=4,
                                               temperature=float("nan"), prompt="hi")),
        request_encoder.encode(GenerateRequest(request_id="x", model=BENCH_MODEL, max_tokens=4)),
        request_encoder.encode(GenerateRequest(request_id="x", model="other-model", max_tokens=4, prompt="hi")),
    ]
    for raw in cases:
        chunks, _ = await client.stream(BENCH_MODEL, raw=raw)
        assert len(chunks) == 1 and isinstance(chunks[0], ErrorChunk), raw
        assert chunks[0].code == "invalid_request", (raw, chunks[0])
    assert gateway.proc.log().count("nats_edge_refused") >= len(cases)  # each refusal is logged
    await client.nc.publish("infer.cancel.nothing-here", b"\xff")
    chunks, _ = await client.stream(BENCH_MODEL)
    assert isinstance(chunks[-1], Final)


async def test_limits_apply_to_nats_clients(infra: EmbeddedStack, gateway: Gateway,
                                            bench_worker: dict[str, Any]) -> None:
    key, _ = await _create_key(gateway, scopes=["inference"], limits={"rpm": 2})
    c = await Client.connect(infra, key)
    try:
        codes = []
        for i in range(3):
            chunks, _ = await c.stream(BENCH_MODEL, request_id=f"r{i}")
            codes.append(chunks[-1].code if isinstance(chunks[-1], ErrorChunk) else "ok")
        assert codes == ["ok", "ok", "rate_limited"]
    finally:
        await c.nc.close()


async def test_cancel_by_the_clients_own_odd_id(infra: EmbeddedStack, gateway: Gateway, slow_worker: Any) -> None:
    c = await Client.connect(infra, (await _create_key(gateway, scopes=["inference"]))[0])
    other = await Client.connect(infra, (await _create_key(gateway, scopes=["inference"]))[0])
    try:
        odd = "my.req *>1"
        inbox = c.nc.new_inbox()
        sub = await c.nc.subscribe(inbox)
        await c.nc.publish(f"infer.llm.{SLOW_MODEL}", request_encoder.encode(GenerateRequest(
            request_id=odd, model=SLOW_MODEL, max_tokens=400, messages=[Message("user", "go on")])), reply=inbox)
        chunks = [chunk_decoder.decode((await sub.next_msg(timeout=10)).data)]
        while not isinstance(chunks[-1], Delta):  # streaming now
            chunks.append(chunk_decoder.decode((await sub.next_msg(timeout=10)).data))
        await other.nc.publish(subjects.cancel(odd), b"")  # another key's cancel is ignored
        await other.nc.flush()
        await c.nc.publish(subjects.cancel(odd), b"")
        while not isinstance(chunks[-1], Final | ErrorChunk):
            chunks.append(chunk_decoder.decode((await sub.next_msg(timeout=10)).data))
        assert isinstance(chunks[-1], ErrorChunk) and chunks[-1].code == "cancelled"
        assert sum(isinstance(x, Delta) for x in chunks) < 200  # 400 tokens at 20/s would take 20 s
    finally:
        await c.nc.close()
        await other.nc.close()


async def test_a_revoked_keys_connection_is_closed(infra: EmbeddedStack, gateway: Gateway) -> None:
    key, key_id = await _create_key(gateway, scopes=["inference"])
    closed = asyncio.Event()

    async def on_closed() -> None:
        closed.set()

    c = await Client.connect(infra, key, allow_reconnect=False, closed_cb=on_closed)
    await c.nc.flush()
    started = time.monotonic()
    await _revoke(gateway, key_id)
    await asyncio.wait_for(closed.wait(), 5)
    assert time.monotonic() - started < 1.0  # revocation reaches the open connection within a second
    with pytest.raises(nats.errors.Error, match="Authorization"):
        await nats.connect(infra.nats_url, token=key, allow_reconnect=False, max_reconnect_attempts=0)


ROLE_FORBIDDEN = {
    "worker": ["registry.outcome.llm.m", "$KV.INFERBUS_ROUTING.llm.m", "admin.keys.create", "registry.admin.deploy",
               "metering.admin.prices.set"],
    "gateway": ["$KV.INFERBUS_ROUTING.llm.m", "registry.admin.deploy", "metering.admin.prices.set", "usage.llm.m",
                "registry.heartbeat.llm.m.v.w", "$JS.API.CONSUMER.CREATE.USAGE"],
    "router": ["registry.heartbeat.llm.m.v.w", "usage.llm.m", "admin.keys.create", "$KV.INFERBUS_ROUTING.llm.m"],
    "metering": ["infer.llm.m", "registry.outcome.llm.m", "admin.keys.create", "registry.heartbeat.llm.m.v.w"],
    "admin": ["infer.llm.m", "usage.llm.m", "registry.heartbeat.llm.m.v.w", "$KV.INFERBUS_ROUTING.llm.m"],
}


@pytest.mark.parametrize("role", sorted(ROLE_FORBIDDEN))
async def test_service_roles_hold_least_privilege(infra: EmbeddedStack, role: str) -> None:
    errors: list[str] = []
    heard = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))
        heard.set()

    options = infra.identity(role).options()
    nc = await nats.connect(infra.nats_url, error_cb=on_error, **options)
    try:
        for subject in ROLE_FORBIDDEN[role]:
            await nc.publish(subject, b"x")
        await nc.flush()
        async with asyncio.timeout(5):
            while heard.clear() or len(errors) < len(ROLE_FORBIDDEN[role]):
                await heard.wait()
        for subject in ROLE_FORBIDDEN[role]:
            assert any(subject.lower() in e.lower() for e in errors), (role, subject, errors)
    finally:
        await nc.close()


async def test_the_generated_config_and_credentials_are_private(infra: EmbeddedStack) -> None:
    root = infra.nats.secrets.root
    assert root.stat().st_mode & 0o777 == 0o700
    for path in root.iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path
    conf = infra.root / "nats" / "nats.conf"
    assert conf.stat().st_mode & 0o777 == 0o600
    text = conf.read_text()
    assert "auth_callout" in text and natsauth.CLIENTS in text


async def test_the_docs_hold_the_permission_table_the_code_enforces() -> None:
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "infra" / "nats" / "README.md").read_text()
    documented = readme.split("<!-- permission-table:start -->")[1].split("<!-- permission-table:end -->")[0]
    assert documented.strip() == natsauth.permission_table().strip()
