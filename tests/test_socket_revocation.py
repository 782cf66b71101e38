"""Keys on open sockets: revocation and rotation close /v1/ws and /v1/realtime; failed auth is bounded."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import aiohttp
import pytest

from services.gateway.auth import KeyStore, key_hash
from services.runtime import db
from services.runtime.local import EmbeddedStack
from tests.conftest import ADMIN_KEY, BENCH_MODEL, Gateway

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def new_key(http: aiohttp.ClientSession, gw: Gateway, name: str) -> tuple[str, str]:
    async with http.post(f"{gw.url}/v1/admin/keys", headers=ADMIN, json={"name": name}) as resp:
        assert resp.status == 201, await resp.text()
        body = await resp.json()
    return body["key"], body["info"]["id"]


async def ws_request(ws: aiohttp.ClientWebSocketResponse, rid: str) -> dict[str, Any]:
    """One generation on a /v1/ws socket: its `done` event (or the error that ended it)."""
    await ws.send_json({"type": "request", "id": rid, "body": {
        "model": BENCH_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}})
    async with asyncio.timeout(10):
        while True:
            event = await ws.receive_json()
            if event.get("id") == rid and event["type"] in ("done", "error"):
                return event  # type: ignore[no-any-return]


async def closed_after_error(ws: aiohttp.ClientWebSocketResponse, limit_s: float) -> tuple[dict[str, Any], float]:
    """Wait for the socket's error event and then its close frame (policy violation); return the error and when
    the close came."""
    error: dict[str, Any] | None = None
    async with asyncio.timeout(limit_s):
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.TEXT:
                event = msg.json()
                if event["type"] == "error":
                    error = event
            else:
                assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1008, msg
                assert error is not None, "closed without an error event"
                return error, time.monotonic()


def realtime_url(gw: Gateway) -> str:
    return gw.url.replace("http", "ws", 1) + f"/v1/realtime?model={BENCH_MODEL}"


async def test_revoked_key_closes_its_sockets_within_1s_and_no_other(
    gateway: Gateway, bench_worker: dict[str, Any]
) -> None:
    async with aiohttp.ClientSession() as http:
        doomed, doomed_id = await new_key(http, gateway, "socket-doomed")
        other, _ = await new_key(http, gateway, "socket-other")
        chat = await http.ws_connect(f"{gateway.url}/v1/ws", headers=bearer(doomed))
        voice = await http.ws_connect(realtime_url(gateway), headers=bearer(doomed))
        bystander = await http.ws_connect(f"{gateway.url}/v1/ws")
        await bystander.send_json({"type": "auth", "api_key": other})
        assert (await bystander.receive_json(timeout=5))["type"] == "authenticated"
        assert (await voice.receive_json(timeout=5))["type"] == "session.created"
        assert (await ws_request(chat, "before"))["type"] == "done"  # the key works on its socket
        sent = time.monotonic()
        async with http.post(f"{gateway.url}/v1/admin/keys/{doomed_id}/revoke", headers=ADMIN) as resp:
            assert resp.status == 200, await resp.text()
        (chat_error, chat_at), (voice_error, voice_at) = await asyncio.gather(
            closed_after_error(chat, 3), closed_after_error(voice, 3)
        )
        assert chat_error["error"]["code"] == "invalid_api_key"
        assert voice_error["error"]["code"] == "invalid_api_key"
        assert max(chat_at, voice_at) - sent < 1.0, (chat_at - sent, voice_at - sent)
        assert doomed not in str(chat_error) + str(voice_error)
        # The other key's socket is untouched and still serves.
        assert not bystander.closed
        assert (await ws_request(bystander, "after"))["type"] == "done"
        await bystander.close()


async def test_rotation_grace_keeps_sockets_until_it_ends(gateway: Gateway, bench_worker: dict[str, Any]) -> None:
    grace = 1.5
    async with aiohttp.ClientSession() as http:
        old, old_id = await new_key(http, gateway, "socket-rotating")
        chat = await http.ws_connect(f"{gateway.url}/v1/ws", headers=bearer(old))
        async with http.post(f"{gateway.url}/v1/admin/keys/{old_id}/rotate", headers=ADMIN,
                             json={"grace_s": grace}) as resp:
            assert resp.status == 201, await resp.text()
        rotated = time.monotonic()
        assert (await ws_request(chat, "in-grace"))["type"] == "done"  # still served during the grace
        error, closed_at = await closed_after_error(chat, grace + 3)
        assert error["error"]["code"] == "invalid_api_key"
        assert grace - 0.3 < closed_at - rotated < grace + 1.0, closed_at - rotated


async def test_failed_ws_auth_attempts_close_the_socket(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{gateway.url}/v1/ws")
        for _ in range(2):  # a typo or two is answered, the socket stays
            await ws.send_json({"type": "auth", "api_key": "ib-wrong-" + secrets.token_hex(8)})
            event = await ws.receive_json(timeout=5)
            assert event["type"] == "error" and event["error"]["code"] == "invalid_api_key"
        await ws.send_json({"type": "auth", "api_key": ADMIN_KEY})  # and the right key still works
        assert (await ws.receive_json(timeout=5))["type"] == "authenticated"
        await ws.close()

        ws = await http.ws_connect(f"{gateway.url}/v1/ws")
        for _ in range(3):  # a guesser is cut off after a few attempts
            await ws.send_json({"type": "auth", "api_key": "ib-guess-" + secrets.token_hex(8)})
        for _ in range(3):
            event = await ws.receive_json(timeout=5)
            assert event["type"] == "error" and event["error"]["code"] == "invalid_api_key"
        msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1008, msg


@pytest.fixture(scope="module")
async def keystore(infra: EmbeddedStack, gateway: Gateway) -> Any:
    """A key store of its own on the platform's PostgreSQL (the gateway applied the schema)."""
    pool = await db.connect(infra.database_url, max_size=4)
    yield KeyStore(pool, negative_ttl=0.5, max_cached=50)
    await pool.close()


async def test_failed_lookups_are_cached_briefly_and_bounded(keystore: KeyStore) -> None:
    wrong = ["ib-flood-" + secrets.token_hex(12) for _ in range(400)]
    results = await asyncio.gather(*(keystore.authenticate(k) for k in wrong + wrong), return_exceptions=True)
    assert all(getattr(r, "code", None) == "invalid_api_key" for r in results)
    assert keystore.cached <= 50  # not one entry per key ever tried

    # A miss is remembered, but only for a moment: a key created just after is accepted soon.
    late = "ib-late-" + secrets.token_hex(12)
    with pytest.raises(Exception, match="Incorrect API key"):
        await keystore.authenticate(late)
    await keystore.pool.execute(
        "INSERT INTO api_keys (id, name, prefix, key_hash, scopes) VALUES ($1, 'late', $2, $3, $4)",
        "key_" + secrets.token_hex(6), late[:10], key_hash(late), ["inference"],
    )
    created = time.monotonic()
    with pytest.raises(Exception, match="Incorrect API key"):
        await keystore.authenticate(late)  # the cached miss
    deadline = created + 3
    while True:
        try:
            record = await keystore.authenticate(late)
            break
        except Exception:
            assert time.monotonic() < deadline, "a cached miss outlived its TTL"
            await asyncio.sleep(0.05)
    assert record.name == "late"
