"""Bad input gets a clear OpenAI-style 4xx, never a 5xx, and the gateway keeps serving."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.conftest import BENCH_MODEL, Gateway

MSG = [{"role": "user", "content": "hi"}]

CASES: list[tuple[str, bytes, int, str | None]] = [
    ("malformed json", b'{"model": "x", "messages": [', 400, None),
    ("not an object", b"[1, 2, 3]", 400, None),
    ("empty body", b"", 400, None),
    ("messages wrong type", b'{"model": "bench-fast", "messages": "hello"}', 400, "messages"),
    ("max_tokens string", b'{"model": "bench-fast", "messages": [], "max_tokens": "ten"}', 400, "max_tokens"),
    ("max_tokens zero", b'{"model": "bench-fast", "messages": [{"role":"user","content":"x"}], "max_tokens": 0}',
     400, "max_tokens"),
    ("unknown role", b'{"model": "bench-fast", "messages": [{"role": "wizard", "content": "x"}]}', 400,
     "messages[0].role"),
    ("unknown field", b'{"model": "bench-fast", "messages": [], "frobnicate": true}', 400, "frobnicate"),
    ("n=17", b'{"model": "bench-fast", "messages": [{"role":"user","content":"x"}], "n": 17}', 400, "n"),
    ("missing model", b'{"messages": [{"role":"user","content":"x"}]}', 400, None),
    ("empty messages", b'{"model": "bench-fast", "messages": []}', 400, "messages"),
    ("tools", b'{"model": "bench-fast", "messages": [{"role":"user","content":"x"}], "tools": [{"type": "f"}]}',
     400, "tools[0].type"),
    ("five stops", b'{"model": "bench-fast", "messages": [{"role":"user","content":"x"}], "stop": '
     b'["a","b","c","d","e"]}', 400, "stop"),
]


@pytest.mark.parametrize(("name", "body", "status", "param"), CASES, ids=[c[0] for c in CASES])
async def test_bad_chat_requests(
    gateway: Gateway, bench_worker: dict[str, Any], name: str, body: bytes, status: int, param: str | None
) -> None:
    async with aiohttp.ClientSession(headers={**gateway.headers, "Content-Type": "application/json"}) as http:
        async with http.post(gateway.url + "/v1/chat/completions", data=body) as resp:
            payload = await resp.json()
        assert resp.status == status, payload
        error = payload["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
        if param is not None:
            assert error["param"] == param
        async with http.post(gateway.url + "/v1/chat/completions",
                             json={"model": BENCH_MODEL, "messages": MSG, "max_tokens": 2}) as ok:
            assert ok.status == 200


async def test_oversized_body_is_413_and_gateway_survives(gateway: Gateway, bench_worker: dict[str, Any]) -> None:
    huge = {"model": BENCH_MODEL, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    async with aiohttp.ClientSession(headers=gateway.headers) as http:
        async with http.post(gateway.url + "/v1/chat/completions", json=huge) as resp:
            payload = await resp.json()
        assert resp.status == 413
        assert payload["error"]["code"] == "request_too_large"
        async with http.post(gateway.url + "/v1/chat/completions",
                             json={"model": BENCH_MODEL, "messages": MSG, "max_tokens": 2}) as ok:
            assert ok.status == 200


async def test_auth_errors_and_unknown_route(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.url + "/v1/models") as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "invalid_api_key"
        async with http.get(gateway.url + "/v1/models", headers={"Authorization": "Basic abc"}) as resp:
            assert resp.status == 401
        async with http.get(gateway.url + "/v1/nope", headers=gateway.headers) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_bad_websocket_events_get_error_events(gateway: Gateway, bench_worker: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as http, http.ws_connect(gateway.url + "/v1/ws") as ws:
        await ws.send_json({"type": "request", "id": "x", "body": {"model": BENCH_MODEL, "messages": MSG}})
        event = await ws.receive_json(timeout=5)
        assert event["type"] == "error" and event["error"]["code"] == "invalid_api_key"
        await ws.send_json({"type": "auth", "api_key": gateway.headers["Authorization"].split()[1]})
        assert (await ws.receive_json(timeout=5))["type"] == "authenticated"
        await ws.send_str("{not json")
        event = await ws.receive_json(timeout=5)
        assert event["type"] == "error" and event["error"]["type"] == "invalid_request_error"
        await ws.send_json({"type": "request", "id": "y", "body": {"model": BENCH_MODEL, "messages": "bad"}})
        event = await ws.receive_json(timeout=5)
        assert event["type"] == "error" and event["id"] == "y" and event["error"]["param"] == "messages"
        await ws.send_json({"type": "request", "id": "z", "body": {"model": BENCH_MODEL, "messages": MSG,
                                                                    "max_tokens": 2}})
        kinds = []
        while not kinds or kinds[-1] != "done":
            kinds.append((await ws.receive_json(timeout=5))["type"])
        assert kinds == ["accepted", "delta", "done"]
