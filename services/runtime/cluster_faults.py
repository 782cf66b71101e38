"""The cluster's fault drills, measured: a node or a gateway SIGKILLed under streaming load (tests and benchmarks).

On a `nats_cluster.Cluster` with the platform spread across its nodes (`start_platform`): registry, router,
metering, two gateways and three benchmark workers. `Load` sends c=16 streaming chat requests (each a usage
event) round-robin over the live gateways; `node_fault` and `gateway_fault` kill a piece under that load and
return what happened: requests, failures, the longest time without a completed request, how fast the dead
node's clients reconnected, and the ledger against the requests. tests/test_cluster.py holds the targets;
bench/bench_scaleout.py reports the numbers.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import asyncpg
import msgspec

from services.runtime.embedded import free_port
from services.runtime.local import settings_env, wait_http, wait_service, wait_worker
from services.runtime.nats_cluster import Cluster, Node, until

MODEL = "cluster-bench"
ADMIN_KEY = "ib-cluster-admin-" + "c" * 24
CONCURRENCY = 16
TOKENS = 16
WARM_REQUESTS = 20 * CONCURRENCY  # the load runs this long before a fault, and on after it
MIN_REQUESTS = 125 * CONCURRENCY  # 16 failures at most when a gateway dies: 0.8 %


async def start_platform(cluster: Cluster, replicas: int = 3) -> None:
    """The platform's streams with `replicas`, and its services spread across the (three) nodes, ready."""
    n1, n2, n3 = cluster.node(0), cluster.node(1), cluster.node(2)
    nc = await cluster.connect("platform-provision", n2)
    try:
        got = await cluster.config.provision(nc, replicas, print)
        short = {name: r for name, r in got.items() if r < replicas}
        if short:
            raise RuntimeError(f"streams with fewer than {replicas} replicas: {short}")
        models = json.dumps([{"name": MODEL, "version": "v1"}])
        worker = settings_env(model=MODEL, version="v1", engine="benchmark", engine_options={"tokens_per_s": 400})
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
    """Requests, failures, the first success per gateway after the fault and the longest time without a
    completed request from the fault on (the recovery time)."""
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


async def ledger_check(cluster: Cluster, results: list[Result], before: set[str], limit_s: float = 60
                       ) -> dict[str, int]:
    """The ledger against the requests (`before`: the ledger's ids when the load started). `missing`: requests
    a worker accepted (the client has their id) not in the ledger after `limit_s`; `duplicated`: (request,
    attempt) rows counted twice; `mismatched`: completed requests billed other tokens than their client got;
    `unseen`: rows for ids no client saw (a request that failed before the gateway could give its id)."""
    seen = {r.request_id for r in results if r.request_id}
    ok = {r.request_id: r.tokens for r in results if r.ok}
    pool = await asyncpg.create_pool(cluster.database_url, min_size=1, max_size=2)
    try:
        async def final_attempts() -> list[asyncpg.Record]:
            # The final attempt of each request (a retry before the first token is an attempt of its own, billed
            # for what it did: README, "Attempts and the billing rule").
            rows: list[asyncpg.Record] = await pool.fetch(
                "SELECT DISTINCT ON (request_id) request_id, completion_tokens, attempt FROM usage_events"
                " WHERE model = $1 ORDER BY request_id, attempt DESC", MODEL)
            return rows

        async def complete() -> list[asyncpg.Record] | None:
            rows = await final_attempts()
            return rows if seen <= {r["request_id"] for r in rows} else None

        try:
            rows = await until(complete, "every accepted request in the ledger", limit_s)
        except TimeoutError:
            rows = await final_attempts()
        ledger = {r["request_id"]: r for r in rows if r["request_id"] not in before}
        duplicated = await pool.fetchval("SELECT count(*) FROM (SELECT request_id, attempt FROM usage_events"
                                         " WHERE model = $1 GROUP BY 1, 2 HAVING count(*) > 1) d", MODEL)
    finally:
        await pool.close()
    return {
        "requests": len(results), "accepted": len(seen), "rows": len(ledger), "missing": len(seen - set(ledger)),
        "duplicated": int(duplicated),
        "mismatched": sum(1 for rid, tokens in ok.items() if rid in ledger and
                          ledger[rid]["completion_tokens"] != tokens),
        "unseen": len(set(ledger) - seen),
    }


class Fault(msgspec.Struct):
    """One drill's outcome."""

    stats: dict[str, Any]  # summary()
    ledger: dict[str, int]  # ledger_check()
    clients_before: set[str]  # the killed node's client names (node fault)
    reconnect_s: float | None = None  # every client of the killed node on another node (node fault)
    back_s: float | None = None  # the node routed and JetStream current again, from the kill (node fault)


async def node_fault(cluster: Cluster, warm: int = WARM_REQUESTS, minimum: int = MIN_REQUESTS) -> Fault:
    """SIGKILL the first node under load; once its clients are elsewhere and `warm` more requests are served,
    start it again; keep the load on until `minimum` requests (and `warm` after the node is back)."""
    n1: Node = cluster.nodes[0]
    before = await n1.clients()
    before_ids = await ledger_ids(cluster)
    load = Load(cluster.gateways)
    running = asyncio.create_task(load.run())
    await until(lambda: load.done(warm), "the load to run before the fault", 30)
    killed_at = time.monotonic()
    n1.kill()

    async def reconnected() -> bool:
        there = set().union(*[await n.clients() for n in cluster.nodes[1:]])
        return before <= there

    await until(reconnected, "every client of n1 on another node", 15)
    reconnect_s = time.monotonic() - killed_at
    served = len(load.results)  # the platform serves on with n1 down before it comes back
    await until(lambda: load.done(served + warm), "requests served while n1 is down", 30)
    n1.start()
    await until(n1.healthy, "n1 back in the cluster, JetStream current", 30)
    back_s = time.monotonic() - killed_at
    await load.settle(minimum, warm)
    await running
    for proc in cluster.services.values():
        proc.check_alive()
    return Fault(summary(load.results, killed_at), await ledger_check(cluster, load.results, before_ids), before,
                 reconnect_s, back_s)


async def gateway_fault(cluster: Cluster, name: str = "gateway-a", warm: int = WARM_REQUESTS,
                        minimum: int = MIN_REQUESTS) -> Fault:
    """SIGKILL gateway `name` under load; keep the load on until `minimum` requests (and 2 x `warm` after)."""
    before_ids = await ledger_ids(cluster)
    load = Load({k: v for k, v in cluster.gateways.items() if cluster.services[k].popen.poll() is None})
    running = asyncio.create_task(load.run())
    await until(lambda: load.done(warm), "the load to run before the fault", 30)
    killed_at = time.monotonic()
    cluster.services[name].kill()
    await load.settle(minimum, 2 * warm)
    await running
    stats = summary(load.results, killed_at)
    stats["served_by_killed_before"] = sum(1 for r in load.results if r.ok and r.gateway == name)
    return Fault(stats, await ledger_check(cluster, load.results, before_ids), set())
