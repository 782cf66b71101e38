"""Stream failures: dead worker, no worker, client gone. Never a clean end, never a hang."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import openai
import pytest

from services.runtime import bus
from tests.conftest import ADMIN_KEY, GHOST_MODEL, SLOW_MODEL, Gateway, SlowWorker, worker_stats

LONG = {"model": SLOW_MODEL, "max_tokens": 1000, "messages": [{"role": "user", "content": "go"}]}


async def test_worker_killed_mid_stream_sse(gateway: Gateway, slow_worker: SlowWorker) -> None:
    proc, _ = slow_worker
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    stream = await client.chat.completions.create(**LONG, stream=True)
    received = 0
    with pytest.raises(openai.APIError) as failure:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received += 1
                if received == 3:
                    proc.kill()
                    killed = time.monotonic()
    assert received >= 3
    assert time.monotonic() - killed < 2.0
    assert "stopped answering" in str(failure.value)


async def test_worker_killed_mid_stream_ws(gateway: Gateway, slow_worker: SlowWorker) -> None:
    proc, _ = slow_worker
    async with aiohttp.ClientSession() as http, http.ws_connect(gateway.url + "/v1/ws", headers=gateway.headers) as ws:
        await ws.send_json({"type": "request", "id": "r1", "body": LONG})
        deltas = 0
        while True:
            event = json.loads((await asyncio.wait_for(ws.receive(), 5)).data)
            if event["type"] == "delta":
                deltas += 1
                if deltas == 3:
                    proc.kill()
                    killed = time.monotonic()
            elif event["type"] in ("done", "error"):
                break
    assert event["type"] == "error" and event["id"] == "r1"
    assert event["error"]["code"] == "stream_broken"
    assert time.monotonic() - killed < 2.0


async def test_no_worker_fails_fast(gateway: Gateway) -> None:
    async with aiohttp.ClientSession(headers=gateway.headers) as http:
        body = {"model": GHOST_MODEL, "messages": [{"role": "user", "content": "hi"}]}
        async with http.post(gateway.url + "/v1/chat/completions", json=body) as warm:
            assert warm.status == 503  # first call also warms the key cache and the connection
        start = time.perf_counter()
        async with http.post(gateway.url + "/v1/chat/completions", json={**body, "stream": True}) as resp:
            elapsed = time.perf_counter() - start
            payload = await resp.json()
    assert resp.status == 503
    assert payload["error"]["code"] == "no_worker"
    assert elapsed < 0.1


async def _wait_idle(nc: bus.Connection, worker_id: str, limit: float) -> dict[str, Any]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        stats = await worker_stats(nc, worker_id)
        if stats["in_flight"] == 0:
            return stats
    raise AssertionError(f"worker still busy after {limit}s: {stats}")


async def test_sse_disconnect_cancels_generation(
    gateway: Gateway, nc: bus.Connection, slow_worker: SlowWorker
) -> None:
    _, stats = slow_worker
    async with aiohttp.ClientSession(headers=gateway.headers) as http:
        resp = await http.post(gateway.url + "/v1/chat/completions", json={**LONG, "stream": True})
        await resp.content.readuntil(b"\n\n")
        await resp.content.readuntil(b"\n\n")
        busy = await worker_stats(nc, stats["worker_id"])
        assert busy["in_flight"] == 1
        resp.close()
    idle = await _wait_idle(nc, stats["worker_id"], 3.0)
    assert idle["cancelled"] == busy["cancelled"] + 1


async def test_ws_close_and_cancel_event_free_the_worker(
    gateway: Gateway, nc: bus.Connection, slow_worker: SlowWorker
) -> None:
    _, stats = slow_worker
    async with aiohttp.ClientSession() as http, http.ws_connect(gateway.url + "/v1/ws", headers=gateway.headers) as ws:
        await ws.send_json({"type": "request", "id": "a", "body": LONG})
        await ws.send_json({"type": "request", "id": "b", "body": LONG})
        seen: set[str] = set()
        while seen != {"a", "b"}:
            event = await ws.receive_json(timeout=5)
            if event["type"] == "delta":
                seen.add(event["id"])
        await ws.send_json({"type": "cancel", "id": "a"})
        while True:
            event = await ws.receive_json(timeout=5)
            if event["type"] == "error":
                break
        assert event["id"] == "a" and event["error"]["code"] == "cancelled"
    idle = await _wait_idle(nc, stats["worker_id"], 3.0)
    assert idle["cancelled"] == 2
