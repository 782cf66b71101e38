"""The usage ledger seen from the edge: /v1/usage (JSON and CSV, scoped per key) and budgets in USD, with what
is left of a budget as the metering service exports it."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from contracts import usage
from contracts.control import Reply
from contracts.usage import SetPrice
from services.runtime import bus
from services.runtime.local import EmbeddedStack, ServiceProcess, settings_env, wait_service
from services.runtime.metrics import url as metrics_url
from tests.conftest import BENCH_MODEL, Gateway
from tests.test_tenancy import admin, complete

T = TypeVar("T")


@pytest.fixture(scope="module")
async def metering(infra: EmbeddedStack, nc: bus.Connection) -> AsyncIterator[ServiceProcess]:
    """The metering service, refreshing its budget gauges every 0.3 s (15 s by default)."""
    proc = ServiceProcess("metering", "services.metering", infra.env(**settings_env(budget_interval_s=0.3)), infra.root)
    try:
        await wait_service(nc, "inferbus-metering", proc)
        yield proc
    finally:
        proc.stop()


async def until(probe: Callable[[], Awaitable[T | None]], what: str, limit_s: float = 15) -> T:
    deadline = time.monotonic() + limit_s
    while True:
        value = await probe()
        if value is not None:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def budget_gauges(nc: bus.Connection, tenant: str) -> dict[str, float]:
    """The tenant's own day USD budget gauges, as every metering instance exports them (the last one's)."""
    found: dict[str, float] = {}
    wanted = {"tenant": tenant, "key": "", "period": "day", "unit": "usd"}
    async with aiohttp.ClientSession() as http:
        for info in await bus.discover(nc, "INFO", "inferbus-metering", wait=0.3):
            url = metrics_url(info)
            if url is None:
                continue
            async with http.get(url) as resp:
                text = await resp.text()
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name.startswith("inferbus_budget_") and sample.labels == wanted:
                        found[sample.name.removeprefix("inferbus_budget_")] = sample.value
    return found


async def usage_of(http: aiohttp.ClientSession, gw: Gateway, key: str, **params: str) -> tuple[int, Any]:
    async with http.get(f"{gw.url}/v1/usage", headers={"Authorization": f"Bearer {key}"}, params=params) as r:
        return r.status, (await r.json() if r.content_type == "application/json" else await r.text())


async def test_usage_api_scoped_per_key_json_and_csv(
    gateway: Gateway, bench_worker: dict[str, Any], metering: ServiceProcess, nc: bus.Connection
) -> None:
    tenant = await admin(nc, "tenants.create", name="usage-tenant")
    first = await admin(nc, "keys.create", name="usage-a", tenant=tenant["id"])
    second = await admin(nc, "keys.create", name="usage-b", tenant=tenant["id"])
    async with aiohttp.ClientSession() as http:
        for key, n in ((first["key"], 3), (second["key"], 2)):
            for _ in range(n):
                status, _, body = await complete(http, gateway, key, max_tokens=4, prompt="one two")
                assert status == 200, body
        admin_key = gateway.headers["Authorization"].split()[1]
        deadline = time.monotonic() + 15
        while True:  # the ledger is written in batches, just after the requests
            status, report = await usage_of(http, gateway, admin_key, tenant_id=tenant["id"], group_by="key")
            assert status == 200, report
            if report["totals"]["requests"] == 5 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        by_key = {row["key_id"]: row for row in report["rows"]}
        assert {k: r["requests"] for k, r in by_key.items()} == {first["info"]["id"]: 3, second["info"]["id"]: 2}
        assert by_key[first["info"]["id"]]["completion_tokens"] == 12
        assert by_key[first["info"]["id"]]["prompt_tokens"] == 6  # the benchmark engine counts words

        # A plain key sees only its own usage, and may not ask for another's.
        status, own = await usage_of(http, gateway, second["key"], group_by="key")
        assert status == 200 and [r["key_id"] for r in own["rows"]] == [second["info"]["id"]]
        status, denied = await usage_of(http, gateway, second["key"], key_id=first["info"]["id"])
        assert status == 403 and denied["error"]["code"] == "permission_denied"

        status, text = await usage_of(http, gateway, admin_key, tenant_id=tenant["id"], group_by="key,model",
                                      format="csv")
        rows = list(csv.DictReader(io.StringIO(text)))
        assert status == 200 and sorted(int(r["requests"]) for r in rows) == [2, 3]
        assert {r["model"] for r in rows} == {BENCH_MODEL}

        for params, param in (({"group_by": "planet"}, "group_by"), ({"since": "yesterday-ish"}, "since"),
                              ({"format": "xml"}, "format")):
            status, body = await usage_of(http, gateway, admin_key, **params)
            assert status == 400 and body["error"]["param"] == param, (params, body)


async def test_usd_budget_stops_spend_at_the_cap(
    gateway: Gateway, bench_worker: dict[str, Any], metering: ServiceProcess, nc: bus.Connection
) -> None:
    # $0.01 per token in and out. Per request ("hi", max_tokens 10): $0.28 reserved (2 + 16 + 10 tokens),
    # $0.11 spent (1 + 10). Against $1.00/day, sequentially: 7 fit (6 x 0.11 + 0.28 = 0.94), the 8th not.
    price = SetPrice(model=BENCH_MODEL, version="*", input_per_1m=10_000, output_per_1m=10_000)
    msg = await nc.request(usage.PRICES_SET, msgspec.json.encode(price), timeout=5)
    assert msgspec.json.decode(msg.data, type=Reply).error is None
    deadline = time.monotonic() + 10
    while True:
        gateways = await bus.service_stats(nc, "inferbus-gateway", wait=0.2)
        if gateways and all(BENCH_MODEL in g["priced_models"] for g in gateways):
            break
        assert time.monotonic() < deadline, "the gateway never heard the price"
    tenant = await admin(nc, "tenants.create", name="usd-budget", budget={"usd_per_day": 1.0})
    key = (await admin(nc, "keys.create", name="usd-spender", tenant=tenant["id"]))["key"]

    async def gauges(remaining: float) -> dict[str, float] | None:
        found = await budget_gauges(nc, tenant["id"])
        return found if found.get("remaining") == pytest.approx(remaining) else None

    assert (await until(lambda: gauges(1.0), "the budget gauge of the new tenant"))["limit"] == 1.0
    async with aiohttp.ClientSession() as http:
        results = [await complete(http, gateway, key, prompt="hi", max_tokens=10) for _ in range(9)]
    statuses = [status for status, _, _ in results]
    assert statuses == [200] * 7 + [429] * 2, statuses
    assert results[7][2]["error"]["code"] == "insufficient_quota" and "$1.00" in results[7][2]["error"]["message"]

    # Metering exports what the ledger says is left: $1.00 less the 7 requests' $0.11 each.
    async def spent() -> float | None:
        query = usage.UsageQuery(since=time.time() - 3600, tenant_id=tenant["id"])
        msg = await nc.request(usage.USAGE_QUERY, msgspec.json.encode(query), timeout=5)
        totals = msgspec.json.decode(msg.data, type=Reply).result["totals"]
        return float(totals["cost_usd"]) if totals["requests"] == 7 else None

    cost = await until(spent, "the 7 requests in the ledger")
    assert cost == pytest.approx(0.77)
    assert (await until(lambda: gauges(1.0 - cost), "the budget gauge to show the spend"))["limit"] == 1.0
