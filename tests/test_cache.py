"""The response cache through the gateway: exact hits in Redis, replayed streams, bypass, tenant isolation,
invalidation when the served version changes; semantic hits on a labelled set of paraphrases and near misses.

One platform for the module: a registry, a gateway, benchmark workers (deterministic answers) and an embed
worker for the semantic part.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from services.runtime import bus
from services.runtime.local import EmbeddedStack, ServiceProcess, wait_worker
from tests.conftest import Gateway, running_gateway, start_worker
from tests.test_metering import until
from tests.test_registry import admin
from tests.test_tenancy import admin as tenancy

MODEL = "cached"


@pytest.fixture(scope="module")
async def platform(
    infra: EmbeddedStack, nc: bus.Connection, registry: ServiceProcess
) -> AsyncIterator[dict[str, Any]]:
    await admin(nc, "register", model=MODEL, version="v1", engine="benchmark")
    await admin(nc, "register", model=MODEL, version="v2", engine="benchmark")
    procs = {v: start_worker(infra, MODEL, version=v, engine_options={"token_text": f" {v}"}) for v in ("v1", "v2")}
    try:
        stats = {v: await wait_worker(nc, MODEL, p) for v, p in procs.items()}
        view = await admin(nc, "deploy", model=MODEL, version="v1")
        async with running_gateway(infra) as gw, aiohttp.ClientSession() as http:
            async def routed() -> bool:
                async with http.get(f"{gw.url}/v1/models/{MODEL}", headers=gw.headers) as resp:
                    ib = (await resp.json())["inferbus"]
                    return bool(ib["revision"] >= view["revision"] and len(ib["live_workers"]) == 2)

            await until(routed, "the gateway to route the model")
            yield {"gw": gw, "workers": stats}
    finally:
        for proc in procs.values():
            proc.stop()


async def chat(
    http: aiohttp.ClientSession, gw: Gateway, content: str, *, key: str | None = None, stream: bool = False,
    headers: dict[str, str] | None = None, **fields: Any,
) -> tuple[int, Any, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4,
            "temperature": 0, "stream": stream, **fields}
    auth = {"Authorization": f"Bearer {key}"} if key else gw.headers
    async with http.post(f"{gw.url}/v1/chat/completions", headers={**auth, **(headers or {})}, json=body) as resp:
        if stream:
            return resp.status, resp.headers, [line for line in (await resp.text()).splitlines() if line]
        return resp.status, resp.headers, await resp.json()


async def test_a_deterministic_request_is_answered_from_the_cache_the_second_time(platform: dict[str, Any]) -> None:
    gw = platform["gw"]
    async with aiohttp.ClientSession() as http:
        status, first_headers, first = await chat(http, gw, "exact question one")
        assert status == 200 and first_headers["x-inferbus-cache"] == "miss"

        async def hit() -> Any:  # the store is off the response path: the next request may still miss
            _, headers, body = await chat(http, gw, "exact question one")
            return (headers, body) if headers["x-inferbus-cache"] == "hit" else None

        headers, again = await until(hit, "a cache hit")
    assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"] == " v1" * 4
    assert headers["x-inferbus-model-version"] == "v1"
    assert again["usage"] == first["usage"]  # the original answer's counts (billed as nothing: governance)


async def test_sampling_requests_bypass_and_opt_in_uses_it(platform: dict[str, Any]) -> None:
    gw = platform["gw"]
    async with aiohttp.ClientSession() as http:
        for _ in range(2):
            _, headers, _ = await chat(http, gw, "sampled question", temperature=0.8)
            assert "x-inferbus-cache" not in headers
        for bypass in ({"x-inferbus-cache": "off"}, {"Cache-Control": "no-cache"}):
            await chat(http, gw, "bypassed question")
            _, headers, _ = await chat(http, gw, "bypassed question", headers=bypass)
            assert "x-inferbus-cache" not in headers
        await chat(http, gw, "opted in", temperature=0.8, headers={"x-inferbus-cache": "on"})

        async def hit() -> bool:
            _, headers, _ = await chat(http, gw, "opted in", temperature=0.8, headers={"x-inferbus-cache": "on"})
            return bool(headers["x-inferbus-cache"] == "hit")

        await until(hit, "an opted-in hit")


async def test_a_stream_that_hits_is_replayed_with_the_same_event_shapes(platform: dict[str, Any]) -> None:
    gw = platform["gw"]
    async with aiohttp.ClientSession() as http:
        _, _, live = await chat(http, gw, "streamed question", stream=True, stream_options={"include_usage": True})

        async def hit() -> Any:
            _, headers, events = await chat(http, gw, "streamed question", stream=True,
                                            stream_options={"include_usage": True})
            return events if headers["x-inferbus-cache"] == "hit" else None

        replay = await until(hit, "a replayed stream")
    shapes = [(e.count('"role"'), e.count('"content"'), e.count('"finish_reason":"stop"') + e.count('"usage":{'))
              for e in live]
    assert [(e.count('"role"'), e.count('"content"'), e.count('"finish_reason":"stop"') + e.count('"usage":{'))
            for e in replay][:1] == shapes[:1]
    assert replay[-1] == "data: [DONE]" and live[-1] == "data: [DONE]"
    assert "".join(e for e in replay if '"content"' in e).count(" v1") == 4


async def test_tenants_never_share_entries(platform: dict[str, Any], nc: bus.Connection) -> None:
    gw = platform["gw"]
    keys = []
    for name in ("cache-tenant-a", "cache-tenant-b"):
        tenant = await tenancy(nc, "tenants.create", name=name)
        keys.append((await tenancy(nc, "keys.create", name=name, tenant=tenant["id"]))["key"])
    async with aiohttp.ClientSession() as http:
        await chat(http, gw, "the same question", key=keys[0])

        async def hit_a() -> bool:
            return bool((await chat(http, gw, "the same question", key=keys[0]))[1]["x-inferbus-cache"] == "hit")

        await until(hit_a, "tenant A's hit")
        _, headers, _ = await chat(http, gw, "the same question", key=keys[1])
        assert headers["x-inferbus-cache"] == "miss"  # tenant B never sees A's entry


async def test_a_new_served_version_invalidates_entries(platform: dict[str, Any], nc: bus.Connection) -> None:
    gw = platform["gw"]
    async with aiohttp.ClientSession() as http:
        await chat(http, gw, "versioned question")

        async def hit() -> bool:
            return bool((await chat(http, gw, "versioned question"))[1]["x-inferbus-cache"] == "hit")

        await until(hit, "a hit on v1")
        view = await admin(nc, "deploy", model=MODEL, version="v2")

        async def moved() -> bool:
            async with http.get(f"{gw.url}/v1/models/{MODEL}", headers=gw.headers) as resp:
                return bool((await resp.json())["inferbus"]["revision"] >= view["revision"])

        await until(moved, "the gateway to see v2 deployed")
        _, headers, body = await chat(http, gw, "versioned question")
        await admin(nc, "deploy", model=MODEL, version="v1")
    assert headers["x-inferbus-cache"] == "miss" and body["choices"][0]["message"]["content"] == " v2" * 4


async def test_a_reported_false_hit_is_dropped(platform: dict[str, Any]) -> None:
    gw = platform["gw"]
    async with aiohttp.ClientSession() as http:
        await chat(http, gw, "reported question")

        async def hit() -> Any:
            _, headers, _ = await chat(http, gw, "reported question")
            return headers if headers["x-inferbus-cache"] == "hit" else None

        headers = await until(hit, "a hit to report")
        report = {"request_id": headers["x-request-id"]}
        async with http.post(f"{gw.url}/v1/cache/false-hits", headers=gw.headers, json=report) as resp:
            assert resp.status == 200 and (await resp.json())["dropped"] is True
        async with http.post(f"{gw.url}/v1/cache/false-hits", headers=gw.headers, json=report) as resp:
            assert resp.status == 404  # once
        _, after, _ = await chat(http, gw, "reported question")
    assert after["x-inferbus-cache"] == "miss"


# ---- per-key settings -----------------------------------------------------------------------------------


async def test_a_key_with_cache_off_never_hits_even_when_asking_for_it(
    platform: dict[str, Any], nc: bus.Connection
) -> None:
    gw = platform["gw"]
    off = (await tenancy(nc, "keys.create", name="cache-off", cache="off"))["key"]  # the default tenant's
    async with aiohttp.ClientSession() as http:
        await chat(http, gw, "a question its tenant cached")

        async def cached() -> bool:  # the tenant has the entry (the admin key is the default tenant's too)
            return bool((await chat(http, gw, "a question its tenant cached"))[1]["x-inferbus-cache"] == "hit")

        await until(cached, "the tenant's entry")
        for headers in (None, {"x-inferbus-cache": "on"}):
            status, got, body = await chat(http, gw, "a question its tenant cached", key=off, headers=headers)
            assert status == 200 and "x-inferbus-cache" not in got, got  # not looked up, not stored
            assert body["choices"][0]["message"]["content"] == " v1" * 4


async def test_a_key_with_cache_on_hits_a_sampled_repeat_unless_the_request_bypasses(
    platform: dict[str, Any], nc: bus.Connection
) -> None:
    gw = platform["gw"]
    on = (await tenancy(nc, "keys.create", name="cache-on", cache="on"))["key"]
    async with aiohttp.ClientSession() as http:
        _, first, _ = await chat(http, gw, "a sampled question", key=on, temperature=1)
        assert first["x-inferbus-cache"] == "miss"

        async def hit() -> bool:
            _, headers, _ = await chat(http, gw, "a sampled question", key=on, temperature=1)
            return bool(headers["x-inferbus-cache"] == "hit")

        await until(hit, "a hit on a temperature-1 repeat")
        for bypass in ({"x-inferbus-cache": "off"}, {"Cache-Control": "no-cache"}):  # the request still decides
            _, headers, _ = await chat(http, gw, "a sampled question", key=on, temperature=1, headers=bypass)
            assert "x-inferbus-cache" not in headers


async def test_a_key_ttl_shorter_than_the_models_expires_first(platform: dict[str, Any], nc: bus.Connection) -> None:
    """The model's TTL is an hour: the key's 1 s entry goes, another tenant's entry of the same question stays."""
    gw = platform["gw"]
    keys = {}
    for name, ttl in (("short", 1.0), ("model-ttl", None)):
        tenant = await tenancy(nc, "tenants.create", name=f"cache-ttl-{name}")
        made = await tenancy(nc, "keys.create", name=name, tenant=tenant["id"], cache_ttl_s=ttl)
        assert made["info"]["cache_ttl_s"] == ttl
        keys[name] = made["key"]
    async with aiohttp.ClientSession() as http:
        def answered(name: str, how: str) -> Callable[[], Awaitable[bool]]:
            async def probe() -> bool:
                _, headers, _ = await chat(http, gw, "a short-lived question", key=keys[name])
                return bool(headers["x-inferbus-cache"] == how)
            return probe

        for name in keys:
            await chat(http, gw, "a short-lived question", key=keys[name])
            await until(answered(name, "hit"), f"{name}'s hit")
        await until(answered("short", "miss"), "the 1 s entry to expire", limit_s=15)
        assert await answered("model-ttl", "hit")()


# ---- semantic: the labelled set -----------------------------------------------------------------------

PAIRS = json.loads((Path(__file__).parent / "data" / "cache_pairs.json").read_text())["pairs"]


@pytest.fixture(scope="module")
async def semantic_gateway(
    infra: EmbeddedStack, nc: bus.Connection, platform: dict[str, Any]
) -> AsyncIterator[Gateway]:
    """A gateway with semantic caching on for MODEL, and an embed worker (all-MiniLM-L6-v2) for the questions."""
    embed = ServiceProcess("embed-cache", "services.embed", infra.env(), infra.root)
    try:
        async def ready() -> bool:
            embed.check_alive()
            return any(s.get("pid") == embed.pid and s.get("ready")
                       for s in await bus.service_stats(nc, "inferbus-embed", wait=0.2))

        await until(ready, "the embed worker", limit_s=120)
        async with running_gateway(infra, cache={"semantic_models": [MODEL]}) as gw:
            yield gw
    finally:
        embed.stop()


async def test_semantic_hits_paraphrases_and_never_a_near_miss(
    infra: EmbeddedStack, nc: bus.Connection, semantic_gateway: Gateway
) -> None:
    gw = semantic_gateway
    conn = await asyncpg.connect(infra.database_url)
    try:
        async with aiohttp.ClientSession() as http:
            for asked in dict.fromkeys(q for q, _, _ in PAIRS):  # each cached question once, stored for sure
                rows = await conn.fetchval("SELECT count(*) FROM response_cache")
                status, headers, _ = await chat(http, gw, asked)
                assert status == 200 and headers["x-inferbus-cache"] == "miss", (asked, headers)

                async def stored(rows: int = rows) -> bool:
                    return bool(await conn.fetchval("SELECT count(*) FROM response_cache") > rows)

                try:
                    await until(stored, f"the semantic entry of {asked!r}")
                except TimeoutError:
                    raise AssertionError(await bus.service_stats(nc, "inferbus-gateway", wait=0.3)) from None
            results = []
            for asked, probe, same in PAIRS:
                status, headers, _ = await chat(http, gw, probe)
                assert status == 200
                results.append((asked, probe, same, headers["x-inferbus-cache"]))
    finally:
        await conn.close()
    false_hits = [r for r in results if not r[2] and r[3].startswith("semantic")]
    hits = [r for r in results if r[2] and r[3].startswith("semantic")]
    positives = sum(1 for _, _, same in PAIRS if same)
    assert not false_hits, false_hits  # a near miss (another number, name, unit, a negation) is never a hit
    assert len(hits) >= 0.8 * positives, [r for r in results if r[2] and not r[3].startswith("semantic")]
    assert all(0.86 <= float(r[3].split("similarity=")[1]) <= 1.0 for r in hits)


async def test_a_question_is_embedded_once_for_its_lookup_store_and_repeats(
    nc: bus.Connection, semantic_gateway: Gateway
) -> None:
    """The gateway remembers question vectors: the miss's lookup embeds, its store and the repeats do not."""
    gw = semantic_gateway

    async def embedded() -> int:
        (stats,) = await bus.service_stats(nc, "inferbus-embed", wait=0.3)
        return int(stats["inputs"])

    before = await embedded()
    async with aiohttp.ClientSession() as http:
        _, headers, _ = await chat(http, gw, "Which river flows through Paris?")
        assert headers["x-inferbus-cache"] == "miss"

        async def hit() -> bool:
            return bool((await chat(http, gw, "Which river flows through Paris?"))[1]["x-inferbus-cache"] == "hit")

        await until(hit, "the exact hit")
        for _ in range(3):
            assert (await chat(http, gw, "Which river flows through Paris?"))[1]["x-inferbus-cache"] == "hit"
    assert await embedded() - before == 1
