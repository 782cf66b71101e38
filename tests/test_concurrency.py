"""50 concurrent streams over SSE and over WebSocket: every one complete, ordered, correctly counted."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from tests.conftest import BENCH_MODEL, Gateway

N = 50


def _body(i: int) -> dict[str, Any]:
    # Each stream asks for a different length, so a mix-up between streams would show.
    return {"model": BENCH_MODEL, "max_tokens": 20 + i, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": " ".join(["w"] * (i + 1))}]}


async def _sse(http: aiohttp.ClientSession, url: str, i: int) -> tuple[int, str, dict[str, Any], bool]:
    text, usage, done = [], None, False
    async with http.post(url + "/v1/chat/completions", json=_body(i)) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                done = True
                continue
            event = json.loads(data)
            assert "error" not in event, event
            if event["choices"]:
                text.append(event["choices"][0]["delta"].get("content") or "")
            if event.get("usage"):
                usage = event["usage"]
    assert usage is not None
    return i, "".join(text), usage, done


async def test_50_concurrent_sse_streams(gateway: Gateway, bench_worker: dict[str, Any]) -> None:
    async with aiohttp.ClientSession(headers=gateway.headers) as http:
        results = await asyncio.gather(*(_sse(http, gateway.url, i) for i in range(N)))
    for i, text, usage, done in results:
        assert done
        assert text == " tok" * (20 + i)
        assert usage == {"prompt_tokens": i + 1, "completion_tokens": 20 + i, "total_tokens": 21 + 2 * i}


async def test_50_concurrent_streams_on_one_websocket(gateway: Gateway, bench_worker: dict[str, Any]) -> None:
    deltas: dict[str, list[tuple[int, str]]] = {str(i): [] for i in range(N)}
    done: dict[str, dict[str, Any]] = {}
    async with aiohttp.ClientSession() as http, http.ws_connect(gateway.url + "/v1/ws", headers=gateway.headers) as ws:
        for i in range(N):
            await ws.send_json({"type": "request", "id": str(i), "body": _body(i)})
        while len(done) < N:
            event = await ws.receive_json(timeout=30)
            assert event["type"] != "error", event
            if event["type"] == "delta":
                deltas[event["id"]].append((event["seq"], event["text"]))
            elif event["type"] == "done":
                done[event["id"]] = event
    for i in range(N):
        seqs = [s for s, _ in deltas[str(i)]]
        assert seqs == list(range(len(seqs))), f"stream {i} has a gap: {seqs}"
        assert "".join(t for _, t in deltas[str(i)]) == " tok" * (20 + i)
        assert done[str(i)]["usage"]["completion_tokens"] == 20 + i
        assert done[str(i)]["usage"]["prompt_tokens"] == i + 1
        assert done[str(i)]["finish_reason"] == "length"
