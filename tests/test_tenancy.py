"""Tenants, keys, rate limits and budgets through real gateways, Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import redis.asyncio as aioredis

from contracts import subjects
from contracts.control import Reply
from services.runtime import bus
from services.runtime.embedded import free_port
from services.runtime.local import EmbeddedStack, wait_http
from services.runtime.metrics import url as metrics_url
from tests.conftest import ADMIN_KEY, BENCH_MODEL, Gateway, running_gateway, start_gateway

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CREATED_KEYS: list[str] = []  # every key made here: none may ever show up in a log, metric or error body


@pytest.fixture(scope="module")
async def second_gateway(infra: EmbeddedStack) -> AsyncIterator[Gateway]:
    async with running_gateway(infra) as gw:
        yield gw


async def admin(nc: bus.Connection, op: str, **body: Any) -> Any:
    msg = await nc.request(subjects.admin(op), msgspec.json.encode(body), timeout=10)
    reply = msgspec.json.decode(msg.data, type=Reply)
    if reply.error is not None:
        raise AssertionError(f"{op}: {reply.error}")
    if op in ("keys.create", "keys.rotate"):
        CREATED_KEYS.append(reply.result["key"])
    return reply.result


async def admin_error(nc: bus.Connection, op: str, **body: Any) -> dict[str, Any]:
    msg = await nc.request(subjects.admin(op), msgspec.json.encode(body), timeout=10)
    reply = msgspec.json.decode(msg.data, type=Reply)
    assert reply.error is not None, (op, body, reply.result)
    return msgspec.to_builtins(reply.error)  # type: ignore[no-any-return]


async def complete(
    http: aiohttp.ClientSession, gw: Gateway, key: str, *, model: str = BENCH_MODEL, max_tokens: int = 2,
    prompt: str = "hello",
) -> tuple[int, dict[str, str], dict[str, Any]]:
    async with http.post(
        f"{gw.url}/v1/completions", headers={"Authorization": f"Bearer {key}"},
        json={"model": model, "prompt": prompt, "max_tokens": max_tokens},
    ) as resp:
        return resp.status, dict(resp.headers), await resp.json()


# ---- administration ---------------------------------------------------------------------------


async def test_tenant_and_key_administration_over_http(
    gateway: Gateway, bench_worker: dict[str, Any], nc: bus.Connection
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway.url}/v1/admin/tenants", headers=ADMIN,
                             json={"name": "acme-http", "limits": {"rpm": 100}, "metadata": {"plan": "pro"}}) as r:
            assert r.status == 201, await r.text()
            tenant = await r.json()
        assert tenant["limits"] == {"rpm": 100} and tenant["metadata"] == {"plan": "pro"}
        async with http.post(f"{gateway.url}/v1/admin/keys", headers=ADMIN,
                             json={"name": "acme app", "tenant": "acme-http", "scopes": ["kind:llm"]}) as r:
            assert r.status == 201
            created = await r.json()
        key = created["key"]
        CREATED_KEYS.append(key)
        assert key.startswith("ib-") and created["info"]["prefix"] == key[:10]
        assert created["info"]["tenant_id"] == tenant["id"]
        status, _, body = await complete(http, gateway, key)
        assert status == 200, body
        async with http.get(f"{gateway.url}/v1/admin/keys", headers=ADMIN, params={"tenant": "acme-http"}) as r:
            listed = await r.json()
        assert [k["id"] for k in listed["data"]] == [created["info"]["id"]]
        assert key not in msgspec.json.encode(listed).decode()  # only the prefix, never the key
        # A key without the admin scope cannot administer.
        async with http.get(f"{gateway.url}/v1/admin/tenants", headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == "permission_denied"


async def test_scopes_limit_models_and_kinds(
    gateway: Gateway, bench_worker: dict[str, Any], nc: bus.Connection
) -> None:
    only_other = await admin(nc, "keys.create", name="other-model-only", scopes=["model:some-other-model"])
    only_bench = await admin(nc, "keys.create", name="bench-only", scopes=[f"model:{BENCH_MODEL}", "kind:llm"])
    async with aiohttp.ClientSession() as http:
        status, _, body = await complete(http, gateway, only_other["key"])
        assert status == 403 and body["error"]["code"] == "permission_denied" and body["error"]["param"] == "model"
        status, _, _ = await complete(http, gateway, only_bench["key"])
        assert status == 200


async def test_bad_admin_input_is_refused_and_changes_nothing(gateway: Gateway, nc: bus.Connection) -> None:
    before_tenants = await admin(nc, "tenants.list")
    before_keys = await admin(nc, "keys.list", include_revoked=True)
    cases: list[tuple[str, dict[str, Any], str, str | None]] = [
        ("tenants.create", {"name": ""}, "invalid_request", "name"),
        ("tenants.create", {"name": "x", "limits": {"rpm": 0}}, "invalid_request", "limits.rpm"),
        ("tenants.create", {"name": "x", "budget": {"usd_per_day": -5}}, "invalid_request", "budget.usd_per_day"),
        ("tenants.create", {"name": "default"}, "conflict", "name"),
        ("tenants.update", {"tenant": "nope"}, "not_found", "tenant"),
        ("keys.create", {"name": "k", "tenant": "no-such-tenant"}, "not_found", "tenant"),
        ("keys.create", {"name": "k", "scopes": ["superuser"]}, "invalid_request", "scopes"),
        ("keys.create", {"name": "k", "scopes": ["kind:video"]}, "invalid_request", "scopes"),
        ("keys.create", {"name": "k", "expires_in_s": -1}, "invalid_request", "expires_in_s"),
        ("keys.revoke", {"key_id": "key_missing"}, "not_found", "key_id"),
        ("keys.rotate", {"key_id": "key_missing"}, "not_found", "key_id"),
        ("keys.create", {"name": "k", "surprise": True}, "invalid_request", None),
    ]
    for op, body, code, param in cases:
        error = await admin_error(nc, op, **body)
        assert (error["code"], error.get("param")) == (code, param), (op, body, error)
    assert await admin(nc, "tenants.list") == before_tenants
    assert await admin(nc, "keys.list", include_revoked=True) == before_keys
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway.url}/v1/admin/keys", headers=ADMIN, data=b"[1, 2]") as r:
            assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_request_error"
        bad = {"name": "y", "limits": {"rpm": "many"}}
        async with http.post(f"{gateway.url}/v1/admin/tenants", headers=ADMIN, json=bad) as r:
            body = await r.json()
            assert r.status == 400 and body["error"]["param"] == "limits.rpm", body


# ---- revocation, rotation, expiry ---------------------------------------------------------------


async def until_refused(http: aiohttp.ClientSession, gw: Gateway, key: str, limit_s: float) -> float:
    started = time.monotonic()
    while True:
        status, _, body = await complete(http, gw, key)
        if status == 401:
            assert key not in msgspec.json.encode(body).decode()
            return time.monotonic() - started
        assert status == 200, body
        assert time.monotonic() - started < limit_s, f"key still accepted after {limit_s}s"


async def test_revoked_key_is_refused_by_two_gateways_within_1s(
    gateway: Gateway, second_gateway: Gateway, bench_worker: dict[str, Any], nc: bus.Connection
) -> None:
    created = await admin(nc, "keys.create", name="to-revoke")
    key = created["key"]
    async with aiohttp.ClientSession() as http:
        for gw in (gateway, second_gateway):  # both have it cached now
            assert (await complete(http, gw, key))[0] == 200
        sent = time.monotonic()
        await admin(nc, "keys.revoke", key_id=created["info"]["id"])
        delays = await asyncio.gather(*(until_refused(http, gw, key, 1.0) for gw in (gateway, second_gateway)))
        assert time.monotonic() - sent < 1.0, delays


async def test_rotation_and_expiry(gateway: Gateway, bench_worker: dict[str, Any], nc: bus.Connection) -> None:
    old = await admin(nc, "keys.create", name="rotating", limits={"rpm": 1000})
    async with aiohttp.ClientSession() as http:
        assert (await complete(http, gateway, old["key"]))[0] == 200
        graceful = await admin(nc, "keys.rotate", key_id=old["info"]["id"], grace_s=600)
        assert graceful["info"]["limits"] == {"rpm": 1000} and graceful["info"]["name"] == "rotating"
        for key in (old["key"], graceful["key"]):  # both work during the grace period
            assert (await complete(http, gateway, key))[0] == 200
        hard = await admin(nc, "keys.rotate", key_id=graceful["info"]["id"])
        assert (await complete(http, gateway, hard["key"]))[0] == 200
        await until_refused(http, gateway, graceful["key"], 1.0)
        short = await admin(nc, "keys.create", name="short-lived", expires_in_s=1.5)
        assert (await complete(http, gateway, short["key"]))[0] == 200
        waited = await until_refused(http, gateway, short["key"], 5.0)
        assert waited > 0.5  # it did work for a while, then expired


# ---- rate limits ----------------------------------------------------------------------------------


async def test_two_gateways_share_one_keys_request_limit(
    gateway: Gateway, second_gateway: Gateway, bench_worker: dict[str, Any], nc: bus.Connection
) -> None:
    created = await admin(nc, "keys.create", name="rpm-10", limits={"rpm": 10})
    async with aiohttp.ClientSession() as http:
        results = await asyncio.gather(
            *(complete(http, (gateway, second_gateway)[i % 2], created["key"]) for i in range(30))
        )
    statuses = Counter(status for status, _, _ in results)
    assert statuses == {200: 10, 429: 20}, statuses
    for status, headers, body in results:
        assert headers["x-ratelimit-limit-requests"] == "10"
        if status == 429:
            assert body["error"]["type"] == "rate_limit_error" and int(headers["Retry-After"]) >= 1
            assert "10 requests per minute for this API key" in body["error"]["message"]
    remaining = sorted(int(h["x-ratelimit-remaining-requests"]) for s, h, _ in results if s == 200)
    assert remaining == list(range(10))


async def test_tenant_limit_covers_all_its_keys_and_per_model_limits(
    gateway: Gateway, bench_worker: dict[str, Any], nc: bus.Connection
) -> None:
    tenant = await admin(nc, "tenants.create", name="tenant-rpm-6", limits={"rpm": 6})
    keys = [(await admin(nc, "keys.create", name=f"t{i}", tenant=tenant["id"]))["key"] for i in range(3)]
    per_model = await admin(nc, "keys.create", name="model-limited", model_limits={BENCH_MODEL: {"rpm": 2}})
    async with aiohttp.ClientSession() as http:
        results = await asyncio.gather(*(complete(http, gateway, keys[i % 3]) for i in range(12)))
        assert Counter(s for s, _, _ in results) == {200: 6, 429: 6}
        results = await asyncio.gather(*(complete(http, gateway, per_model["key"]) for _ in range(5)))
        assert Counter(s for s, _, _ in results) == {200: 2, 429: 3}


async def test_token_limit_is_corrected_to_the_workers_count(
    gateway: Gateway, bench_worker: dict[str, Any], nc: bus.Connection
) -> None:
    # Estimate per request: prompt bytes (5) + 16 + max_tokens (50) = 71; the worker counts 1 + 50 = 51.
    created = await admin(nc, "keys.create", name="tpm-200", limits={"tpm": 200})
    async with aiohttp.ClientSession() as http:
        statuses = [(await complete(http, gateway, created["key"], max_tokens=50))[0] for _ in range(4)]
        # Uncorrected, the third would need 3 x 71 = 213 > 200; corrected, 51 + 51 + 71 = 173 fits.
        assert statuses == [200, 200, 200, 429]
        status, headers, body = await complete(http, gateway, created["key"], max_tokens=500)
        assert status == 429 and "Request too large" in body["error"]["message"]
        assert headers["x-ratelimit-limit-tokens"] == "200"


async def evalsha_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_large_limits_are_spent_from_a_lease_without_a_redis_round_trip(
    infra: EmbeddedStack, gateway: Gateway, bench_worker: dict[str, Any], nc: bus.Connection
) -> None:
    created = await admin(nc, "keys.create", name="leased", limits={"rpm": 100_000, "tpm": 10_000_000})
    client = aioredis.Redis.from_url(infra.redis_url)
    try:
        async with aiohttp.ClientSession() as http:
            before = await evalsha_calls(client)
            results = [await complete(http, gateway, created["key"]) for _ in range(60)]
            during = await evalsha_calls(client) - before
            assert [status for status, _, _ in results] == [200] * 60
            remaining = [int(h["x-ratelimit-remaining-requests"]) for _, h, _ in results]
            assert all(0 < r < 100_000 for r in remaining), remaining
            assert int(results[-1][1]["x-ratelimit-remaining-tokens"]) < 10_000_000
            # Without leases: an admission and a settle per request (120). With them: the first admission takes
            # a lease of 1,000 requests and 100,000 tokens; a second passes only if the load outlives a lease.
            assert during <= 15, during
            # Idle, the unspent lease goes back to Redis (one settle call) within about LEASE_TTL_S.
            deadline = time.monotonic() + 10
            while True:
                after = await evalsha_calls(client) - before
                if after > during or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert after > during
    finally:
        await client.aclose()


async def test_leases_never_let_two_gateways_admit_past_a_limit(
    gateway: Gateway, second_gateway: Gateway, bench_worker: dict[str, Any], nc: bus.Connection
) -> None:
    limit = 300  # leases of up to 3 requests per gateway
    created = await admin(nc, "keys.create", name="leased-rpm-300", limits={"rpm": limit})
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
        results = await asyncio.gather(
            *(complete(http, (gateway, second_gateway)[i % 2], created["key"]) for i in range(400))
        )
    refill = (time.monotonic() - started) * limit / 60  # GCRA gives one request back every 200 ms
    statuses = Counter(status for status, _, _ in results)
    assert set(statuses) == {200, 429}, statuses
    # Never past the limit (plus what refilled meanwhile); short of it by at most the two gateways' leases.
    assert limit - 2 * 3 <= statuses[200] <= limit + int(refill) + 1, (statuses, refill)
    assert all(b["error"]["code"] == "rate_limited" for s, _, b in results if s == 429)


async def test_concurrency_limit(gateway: Gateway, nc: bus.Connection, slow_worker: Any) -> None:
    created = await admin(nc, "keys.create", name="two-at-a-time", limits={"concurrency": 2})
    async with aiohttp.ClientSession() as http:
        results = await asyncio.gather(
            *(complete(http, gateway, created["key"], model="bench-slow", max_tokens=10) for _ in range(5))
        )
        assert Counter(s for s, _, _ in results) == {200: 2, 429: 3}
        # The slots were released when those finished.
        assert (await complete(http, gateway, created["key"], model="bench-slow", max_tokens=1))[0] == 200


# ---- budgets ----------------------------------------------------------------------------------------


async def test_concurrent_requests_never_overspend_a_budget(
    infra: EmbeddedStack, gateway: Gateway, bench_worker: dict[str, Any], nc: bus.Connection
) -> None:
    budget = 300
    tenant = await admin(nc, "tenants.create", name="budget-300", budget={"tokens_per_day": budget})
    created = await admin(nc, "keys.create", name="spender", tenant=tenant["id"])
    async with aiohttp.ClientSession() as http:
        results = await asyncio.gather(
            *(complete(http, gateway, created["key"], prompt="hi", max_tokens=10) for _ in range(100))
        )
    served = [body for status, _, body in results if status == 200]
    refused = [body for status, _, body in results if status != 200]
    spent = sum(body["usage"]["total_tokens"] for body in served)
    assert spent <= budget
    assert len(served) >= budget // 28  # 28 = the reservation per request (2 + 16 + 10)
    assert refused and {b["error"]["code"] for b in refused} == {"insufficient_quota"}
    assert "daily tokens budget of this organisation" in refused[0]["error"]["message"]
    client = aioredis.Redis.from_url(infra.redis_url)
    try:
        counters = [k async for k in client.scan_iter(f"ib:bud:tenant:{tenant['id']}:tokens:*")]
        assert len(counters) == 1
        deadline = time.monotonic() + 5  # settles run just after each response
        while True:
            counted = int(await client.get(counters[0]) or 0)
            if counted == spent or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        assert counted == spent  # every reservation settled to the actual
    finally:
        await client.aclose()


# ---- Redis unreachable ----------------------------------------------------------------------------


async def test_redis_down_fails_open_or_closed_as_configured(
    infra: EmbeddedStack, bench_worker: dict[str, Any], nc: bus.Connection
) -> None:
    limited = await admin(nc, "keys.create", name="limited-no-redis", limits={"rpm": 5})
    dead = f"redis://127.0.0.1:{free_port()}/0"
    gws = [start_gateway(infra, redis_url=dead, rate_limit_failure=mode) for mode in ("open", "closed")]
    try:
        for gw in gws:
            await wait_http(gw.url, gw.proc)
        async with aiohttp.ClientSession() as http:
            opened, closed = [await complete(http, gw, limited["key"]) for gw in gws]
        assert opened[0] == 200
        assert closed[0] == 503 and closed[2]["error"]["code"] == "limiter_unavailable"
        for gw in gws:
            assert "ratelimit_unavailable" in gw.proc.log()
    finally:
        for gw in gws:
            gw.proc.stop()


# ---- CLI -----------------------------------------------------------------------------------------------


def cli(infra: EmbeddedStack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**infra.env(), "INFERBUS_DATA_DIR": str(infra.root / "cli")}
    return subprocess.run([sys.executable, "-m", "services.cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=60)


async def test_tenants_and_keys_cli(infra: EmbeddedStack, gateway: Gateway, bench_worker: dict[str, Any]) -> None:
    # A token budget: a USD one would be refused (503) until this module's gateway has prices from metering.
    made = await asyncio.to_thread(cli, infra, "tenants", "create", "cli-corp", "--rpm", "50",
                                   "--tokens-per-month", "100000")
    assert made.returncode == 0 and "rpm=50" in made.stdout and "tokens_per_month=100000" in made.stdout, made.stderr
    key = await asyncio.to_thread(cli, infra, "keys", "create", "--name", "cli-app", "--tenant", "cli-corp",
                                  "--scope", "kind:llm", "--tpm", "1000", "--model-rpm", f"{BENCH_MODEL}=5",
                                  "--expires", "30d")
    assert key.returncode == 0, key.stderr
    secret = next(line.split()[-1] for line in key.stdout.splitlines() if line.startswith("key:"))
    CREATED_KEYS.append(secret)
    key_id = key.stdout.split()[2]
    async with aiohttp.ClientSession() as http:
        assert (await complete(http, gateway, secret))[0] == 200
    listed = await asyncio.to_thread(cli, infra, "keys", "list", "--tenant", "cli-corp")
    assert key_id in listed.stdout and secret not in listed.stdout and f"{BENCH_MODEL}:rpm=5" in listed.stdout
    revoked = await asyncio.to_thread(cli, infra, "keys", "revoke", key_id)
    assert revoked.returncode == 0 and "revoked at" in revoked.stdout
    for args, needle in ((("keys", "create", "--name", "x", "--scope", "superuser"), "[scopes]"),
                         (("keys", "revoke", key_id), "(conflict)"),
                         (("tenants", "update", "no-such-tenant", "--rpm", "5"), "(not_found)")):
        bad = await asyncio.to_thread(cli, infra, *args)
        assert bad.returncode == 1 and needle in bad.stderr, (args, bad.stderr)
    unparsable = await asyncio.to_thread(cli, infra, "keys", "create", "--name", "x", "--expires", "soon")
    assert unparsable.returncode == 2 and "not a duration" in unparsable.stderr


async def test_key_cache_settings_are_kept_by_create_update_rotate_and_the_cli(
    infra: EmbeddedStack, gateway: Gateway, nc: bus.Connection
) -> None:
    made = await admin(nc, "keys.create", name="cache-settings", cache="off", cache_ttl_s=90)
    info = made["info"]
    assert (info["cache"], info["cache_ttl_s"]) == ("off", 90)
    updated = await admin(nc, "keys.update", key_id=info["id"], cache="on")
    assert (updated["cache"], updated["cache_ttl_s"]) == ("on", 90)  # what the update did not name is kept
    rotated = (await admin(nc, "keys.rotate", key_id=info["id"]))["info"]
    assert (rotated["cache"], rotated["cache_ttl_s"]) == ("on", 90)
    inherited = await admin(nc, "keys.update", key_id=rotated["id"], cache="default", cache_ttl_inherit=True)
    assert (inherited["cache"], inherited["cache_ttl_s"]) == ("default", None)
    for ttl in (0, -5, 1e9):
        error = await admin_error(nc, "keys.create", name="k", cache_ttl_s=ttl)
        assert (error["code"], error.get("param")) == ("invalid_request", "cache_ttl_s"), (ttl, error)
    error = await admin_error(nc, "keys.create", name="k", cache="sometimes")
    assert error["code"] == "invalid_request" and "$.cache" in error["message"], error
    error = await admin_error(nc, "keys.update", key_id=rotated["id"], cache_ttl_s=60, cache_ttl_inherit=True)
    assert error.get("param") == "cache_ttl_inherit"
    async with aiohttp.ClientSession() as http:
        async with http.patch(f"{gateway.url}/v1/admin/keys/{rotated['id']}", headers=ADMIN,
                              json={"cache": "off", "cache_ttl_s": 30}) as r:
            assert r.status == 200, await r.text()
            patched = await r.json()
        assert (patched["cache"], patched["cache_ttl_s"]) == ("off", 30)
        async with http.post(f"{gateway.url}/v1/admin/keys", headers=ADMIN, json={"name": "k", "cache": "always"}) as r:
            refused = await r.json()
        assert r.status == 400 and refused["error"]["param"] == "cache", refused
    key = await asyncio.to_thread(cli, infra, "keys", "create", "--name", "cli-cached", "--cache", "on",
                                  "--cache-ttl", "10m")
    assert key.returncode == 0, key.stderr
    CREATED_KEYS.append(next(line.split()[-1] for line in key.stdout.splitlines() if line.startswith("key:")))
    key_id = key.stdout.split()[2]
    listed = await asyncio.to_thread(cli, infra, "keys", "list")
    row = next(line for line in listed.stdout.splitlines() if line.startswith(key_id))
    assert "cache=on" in row and "cache_ttl=600s" in row, listed.stdout
    changed = await asyncio.to_thread(cli, infra, "keys", "update", key_id, "--cache", "off", "--cache-ttl-inherit")
    assert changed.returncode == 0 and "cache=off" in changed.stdout and "cache_ttl" not in changed.stdout, changed
    wrong = await asyncio.to_thread(cli, infra, "keys", "update", key_id, "--cache", "sometimes")
    assert wrong.returncode == 2 and "--cache" in wrong.stderr


# ---- keys never leak ------------------------------------------------------------------------------------


async def test_zz_keys_never_appear_in_logs_metrics_or_errors(
    infra: EmbeddedStack, nc: bus.Connection, gateway: Gateway
) -> None:
    """Runs last in this module: every key created above, searched for in every service log and /metrics."""
    assert len(CREATED_KEYS) >= 10
    infos = await bus.discover(nc, "INFO", "inferbus-gateway")
    (scrape,) = [metrics_url(i) for i in infos if i["metadata"].get("http") == gateway.url]  # the loopback port
    assert scrape is not None
    async with aiohttp.ClientSession() as http:
        async with http.get(scrape) as r:
            assert r.status == 200
            metrics = await r.text()
        bogus = "ib-" + "z" * 43
        async with http.get(f"{gateway.url}/v1/models", headers={"Authorization": f"Bearer {bogus}"}) as r:
            assert r.status == 401 and bogus not in await r.text()
    logs = await asyncio.to_thread(lambda: [p.read_text(errors="replace") for p in Path(infra.root).glob("*.log")])
    assert logs
    for key in [*CREATED_KEYS, ADMIN_KEY]:
        secret = key[10:]  # the part after the shown prefix
        assert secret not in metrics
        for text in logs:
            assert secret not in text
