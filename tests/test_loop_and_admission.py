"""CPU work stays off the event loop, and admission always settles: real gateway, router, registry, workers.

- Shadow comparisons (gateway and router) and LLM prompt preparation must not hold a service's loop.
- A client that leaves while it is being admitted gives its concurrency slot back.
- Budgets: speech is reserved by audio length; USD budgets wait for the price list.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import struct
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlparse

import aiohttp
import msgspec
import pytest
import redis.asyncio as aioredis
import redis.exceptions

from contracts import subjects, usage
from contracts.control import Reply
from contracts.llm import Delta, ErrorChunk, Final, GenerateRequest, Message, chunk_decoder, request_encoder
from services.runtime import bus
from services.runtime.embedded import PostgresServer
from services.runtime.local import EmbeddedStack, ServiceProcess, settings_env, wait_http, wait_service
from tests.conftest import BENCH_MODEL, DEFAULT_MODEL, Gateway, Workers, running_gateway, start_gateway
from tests.test_registry import admin as registry_admin
from tests.test_registry import completions, nats_generate, serve, until_gateway
from tests.test_tenancy import admin

# The loop may be slow on a loaded 2-core machine, but never as slow as the work these tests make:
# a 4,000-character difflib comparison (~3 s here) or a 900 KB prompt tokenized (~0.3 s, eight of them).
LOOP_BOUND_S = 0.4


@pytest.fixture(scope="module")
async def gw(infra: EmbeddedStack) -> AsyncIterator[Gateway]:
    """This module's own gateway: it has never loaded prices (no metering runs here until a test starts one)."""
    async with running_gateway(infra) as gateway:
        yield gateway


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def complete(http: aiohttp.ClientSession, gw: Gateway, key: str, **fields: Any) -> tuple[int, dict[str, Any]]:
    body = {"model": BENCH_MODEL, "prompt": "hello", "max_tokens": 2, **fields}
    async with http.post(f"{gw.url}/v1/completions", headers=bearer(key), json=body) as resp:
        return resp.status, await resp.json()


async def until_admitted(
    http: aiohttp.ClientSession, gw: Gateway, key: str, limit_s: float, pause_s: float = 0.05
) -> tuple[int, dict[str, Any]]:
    """Completions with `key` until one is admitted (200) or `limit_s` has passed; the last (status, body)."""
    deadline = time.monotonic() + limit_s
    while True:
        status, body = await complete(http, gw, key)
        if status == 200 or time.monotonic() > deadline:
            return status, body
        await asyncio.sleep(pause_s)


# ---- the event loop ---------------------------------------------------------------------------


async def test_shadow_comparisons_leave_gateway_and_router_loops_free(
    infra: EmbeddedStack, nc: bus.Connection, gw: Gateway, router: ServiceProcess, workers: Workers
) -> None:
    model = "loop-shadow"
    text = " the quick brown fox jumps over the lazy dog"
    tokens = 90  # 3,960 characters per output
    await serve(
        infra, nc, workers, model,
        live={"engine_options": {"token_text": text}},
        candidate={"engine_options": {"token_text": text.replace("fox", "cat")}},
    )
    await registry_admin(nc, "deploy", model=model, version="live")
    view = await registry_admin(nc, "shadow", model=model, version="candidate", rate=100)
    gateway_lag: list[float] = []
    router_lag: list[float] = []
    done = asyncio.Event()

    async def probe(http: aiohttp.ClientSession) -> None:
        while not done.is_set():
            started = time.perf_counter()
            async with http.get(f"{gw.url}/healthz") as resp:
                assert resp.status == 200
            gateway_lag.append(time.perf_counter() - started)
            started = time.perf_counter()
            await nc.request("$SRV.PING.inferbus-router", b"", timeout=10)
            router_lag.append(time.perf_counter() - started)
            await asyncio.sleep(0.01)

    async with aiohttp.ClientSession() as http:
        await until_gateway(http, gw, model, view["revision"], workers=2)
        probing = asyncio.create_task(probe(http))
        served = await completions(http, gw, model, 6, max_tokens=tokens)
        alias = [
            await nats_generate(nc, subjects.infer("llm", model), GenerateRequest(
                request_id=f"loop-{i}", model=model, max_tokens=tokens
            ))
            for i in range(4)
        ]
        deadline = time.monotonic() + 30
        while (report := await registry_admin(nc, "comparisons", model=model, limit=50))["count"] < 10:
            assert time.monotonic() < deadline, report["count"]
            await asyncio.sleep(0.05)
        done.set()
        await probing
    assert {(status, version) for status, version, _ in served} == {(200, "live")}
    assert all(isinstance(chunks[-1], Final) and chunks[-1].version == "live" for chunks in alias)
    assert report["count"] == 10
    for record in report["records"]:
        assert record["output_chars"] == record["shadow_output_chars"] == tokens * len(text)
        assert 0.8 < record["similarity"] < 1  # fox vs cat, twice per sentence
    assert len(gateway_lag) >= 5 and len(router_lag) >= 5
    assert max(gateway_lag) < LOOP_BOUND_S, sorted(gateway_lag)[-5:]
    assert max(router_lag) < LOOP_BOUND_S, sorted(router_lag)[-5:]


async def test_long_prompt_preparation_leaves_the_worker_loop_free(
    nc: bus.Connection, default_worker: dict[str, Any]
) -> None:
    subject = subjects.infer("llm", DEFAULT_MODEL, "q4_1", default_worker["worker_id"])
    huge = "The quick brown fox jumps over the lazy dog. " * 20_000  # 900 KB: ~200k tokens, far over n_ctx

    async def run(request: GenerateRequest) -> tuple[float | None, Any]:
        """(seconds to the first token, last chunk) of one raw NATS stream."""
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        started = time.perf_counter()
        first = None
        try:
            await nc.publish(subject, request_encoder.encode(request), reply=inbox)
            while True:
                chunk = chunk_decoder.decode((await sub.next_msg(timeout=60)).data)
                if isinstance(chunk, Delta) and first is None:
                    first = time.perf_counter() - started
                if isinstance(chunk, Final | ErrorChunk):
                    return first, chunk
        finally:
            await sub.unsubscribe()

    big = [
        asyncio.create_task(run(GenerateRequest(request_id=f"huge-{i}", model=DEFAULT_MODEL,
                                                messages=[Message("user", huge)], max_tokens=4)))
        for i in range(8)
    ]
    await asyncio.sleep(0)  # published first: their preparation is under way when the small one arrives
    ttft, last = await run(GenerateRequest(request_id="tiny", model=DEFAULT_MODEL, prompt="Hi", max_tokens=1))
    refused = await asyncio.gather(*big)
    assert all(isinstance(c, ErrorChunk) and c.code == "context_length_exceeded" for _, c in refused), refused
    assert isinstance(last, Final) and ttft is not None
    assert ttft < 1.0  # eight preparations on the loop would hold it ~2.5 s before this one's token


# ---- admission --------------------------------------------------------------------------------


async def send_and_leave(url: str, key: str, after_s: float) -> None:
    """A whole completion request, then an abortive close (RST) `after_s` later, before any answer."""
    target = urlparse(url)
    body = json.dumps({"model": BENCH_MODEL, "prompt": "hello", "max_tokens": 2}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {target.netloc}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    _, writer = await asyncio.open_connection(target.hostname, target.port)
    writer.write(head + body)
    await writer.drain()
    await asyncio.sleep(after_s)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
    await writer.wait_closed()


async def held_slots(client: aioredis.Redis, key_id: str, limit_s: float = 5) -> list[Any]:
    """The key's concurrency set once it is empty (settles run just after each request ends), or after `limit_s`."""
    deadline = time.monotonic() + limit_s
    while True:
        held: list[Any] = await client.zrange(f"ib:cc:key:{key_id}", 0, -1)
        if not held or time.monotonic() > deadline:
            return held
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def one_slot_key(
    infra: EmbeddedStack, nc: bus.Connection, gw: Gateway, name: str
) -> AsyncIterator[tuple[aiohttp.ClientSession, str, str, aioredis.Redis]]:
    """(HTTP session, key, key id, Redis client) for a new key limited to one request at a time; the key has
    been used once (authenticated: later requests go straight to admit) and its slot is free again."""
    created = await admin(nc, "keys.create", name=name, limits={"concurrency": 1})
    key, key_id = created["key"], created["info"]["id"]
    client = aioredis.Redis.from_url(infra.redis_url)
    try:
        async with aiohttp.ClientSession() as http:
            assert (await complete(http, gw, key))[0] == 200
            assert await held_slots(client, key_id) == []
            yield http, key, key_id, client
    finally:
        await client.aclose()


async def test_clients_leaving_during_admission_release_their_slot(
    infra: EmbeddedStack, nc: bus.Connection, gw: Gateway, bench_worker: dict[str, Any]
) -> None:
    async with one_slot_key(infra, nc, gw, "leaver") as (http, key, key_id, client):
        # Redis holds every write (the admit script) for 300 ms, as a slow Redis would: the clients leave
        # 50 ms after sending, while their admission is in flight. The first script to run takes the slot.
        await client.client_pause(300, all=False)  # CLIENT PAUSE 300 WRITE
        await asyncio.gather(*(send_and_leave(gw.url, key, 0.05) for _ in range(8)))
        status, body = await until_admitted(http, gw, key, limit_s=10)  # a leaked slot would be held for an hour
        assert status == 200, body
        assert await held_slots(client, key_id) == []


BUSY_SCRIPT = """
local t = redis.call('TIME')
local start = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
while true do
  t = redis.call('TIME')
  if tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000 - start > tonumber(ARGV[1]) then return 1 end
end
"""


async def redis_busy(url: str) -> None:
    """Return once Redis is running something else: a PING gets no answer within 50 ms."""
    probe = aioredis.Redis.from_url(url, socket_timeout=0.05)
    try:
        while True:
            try:
                await probe.ping()
            except (TimeoutError, redis.exceptions.TimeoutError):
                return
    finally:
        await probe.aclose()


async def test_admission_redis_answered_too_late_frees_its_slot(
    infra: EmbeddedStack, nc: bus.Connection, gw: Gateway, bench_worker: dict[str, Any]
) -> None:
    async with one_slot_key(infra, nc, gw, "late-redis") as (http, key, key_id, client):
        # Redis runs another client's script for 1.5 s: the gateway gives up on its admit script after 0.5 s
        # and admits without limits (fail-open), then Redis runs the script and takes the slot anyway.
        busy = asyncio.ensure_future(client.eval(BUSY_SCRIPT, 0, "1500"))
        await redis_busy(infra.redis_url)
        assert (await complete(http, gw, key))[0] == 200
        await busy
        status, body = await until_admitted(http, gw, key, limit_s=5)  # released once Redis answers, not in an hour
        assert status == 200, body
        assert await held_slots(client, key_id) == []


# ---- budgets ----------------------------------------------------------------------------------


async def set_price(nc: bus.Connection, **price: Any) -> None:
    msg = await nc.request(usage.PRICES_SET, msgspec.json.encode(usage.SetPrice(**price)), timeout=10)
    assert msgspec.json.decode(msg.data, type=Reply).error is None


async def test_usd_budgets_wait_for_prices(
    infra: EmbeddedStack, nc: bus.Connection, gw: Gateway, bench_worker: dict[str, Any]
) -> None:
    usd = await admin(nc, "keys.create", name="usd-budget", budget={"usd_per_day": 5.0})
    tokens = await admin(nc, "keys.create", name="token-budget", budget={"tokens_per_day": 100_000})
    opened = start_gateway(infra, unknown_prices="open")
    pg = PostgresServer(infra.root / "pg-loop-prices")
    metering: ServiceProcess | None = None
    try:
        await wait_http(opened.url, opened.proc)
        async with aiohttp.ClientSession() as http:
            status, body = await complete(http, gw, usd["key"])
            assert status == 503 and body["error"]["code"] == "limiter_unavailable"
            assert "Prices are not loaded yet" in body["error"]["message"]
            assert (await complete(http, gw, tokens["key"]))[0] == 200  # no USD budget: prices do not matter
            assert (await complete(http, opened, usd["key"]))[0] == 200  # "open": admitted unpriced
            for gateway in (gw, opened):
                assert "prices_unknown" in gateway.proc.log()

            database_url = await asyncio.to_thread(pg.start)
            env = infra.env(**settings_env(database_url=database_url, durable="loop-prices"))
            metering = ServiceProcess("metering-loop", "services.metering", env, infra.root)
            await wait_service(nc, "inferbus-metering", metering)
            await set_price(nc, model=BENCH_MODEL, input_per_1m=1.0, output_per_1m=2.0)  # gateways hear it
            status, body = await until_admitted(http, gw, usd["key"], limit_s=20, pause_s=0.1)
            assert status == 200, body
    finally:
        opened.proc.stop()
        if metering is not None:
            metering.stop()
        await asyncio.to_thread(pg.stop)


async def wait_tts(nc: bus.Connection, gw: Gateway, proc: ServiceProcess) -> None:
    deadline = time.monotonic() + 90
    async with aiohttp.ClientSession(headers=gw.headers) as http:
        while time.monotonic() < deadline:
            proc.check_alive()
            async with http.get(f"{gw.url}/v1/models/hibari") as resp:
                if resp.status == 200 and (await resp.json())["workers"] > 0:
                    return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"TTS worker not ready:\n{proc.log()[-3000:]}")


async def budget_counter(infra: EmbeddedStack, key_id: str, expected: int) -> int:
    """The key's daily token counter once it reads `expected` (settles run just after the response), or after 5 s."""
    client = aioredis.Redis.from_url(infra.redis_url)
    try:
        deadline = time.monotonic() + 5
        while True:
            keys = [k async for k in client.scan_iter(f"ib:bud:key:{key_id}:tokens:d*")]
            counted = int(await client.get(keys[0]) or 0) if keys else 0
            if counted == expected or time.monotonic() > deadline:
                return counted
            await asyncio.sleep(0.02)
    finally:
        await client.aclose()


async def test_speech_is_budgeted_by_audio_length(
    infra: EmbeddedStack, nc: bus.Connection, gw: Gateway, registry: ServiceProcess
) -> None:
    proc = ServiceProcess("tts-loop", "services.speech.tts", infra.env(), infra.root)
    try:
        await wait_tts(nc, gw, proc)
        created = await admin(nc, "keys.create", name="speech-budget", budget={"tokens_per_day": 80})
        async with aiohttp.ClientSession(headers=bearer(created["key"])) as http:
            payload = {"model": "tts-1", "voice": "alloy", "input": "Hello there.", "response_format": "pcm"}
            async with http.post(f"{gw.url}/v1/audio/speech", json=payload) as resp:
                assert resp.status == 200, await resp.text()
                rate = int(resp.headers["x-inferbus-sample-rate"])
                seconds = len(await resp.read()) / 2 / rate
            # Settled to what was synthesized: 10 tokens per second of audio.
            counted = await budget_counter(infra, created["info"]["id"], math.ceil(seconds * 10))
            assert abs(counted - math.ceil(seconds * 10)) <= 1 and counted > 0
            # 400 characters may take 51 s of audio: 510 tokens do not fit in what is left of 80.
            long = {**payload, "input": "The keeper climbed the stairs at dusk. " * 10}
            async with http.post(f"{gw.url}/v1/audio/speech", json=long) as resp:
                assert resp.status == 429
                error = (await resp.json())["error"]
            assert error["code"] == "insufficient_quota" and "daily tokens budget of this API key" in error["message"]
    finally:
        proc.stop()
