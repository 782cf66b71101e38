#!/usr/bin/env python
"""Benchmark the model registry and routing: policy propagation, the alias hop, load-aware dispatch.

    python bench/bench_registry.py [--quick]

Starts its own embedded nats-server, PostgreSQL and Redis on free loopback ports, the registry
(`python -m services.registry`), the alias router (`python -m services.router`), two gateways (one with
the default P2C dispatch, one with INFERBUS_DISPATCH=queue) and benchmark-engine LLM workers, then
measures:

  a. policy propagation: for each of N canary weight changes, the time from sending the admin request
     to (i) a KV watcher in this process holding the new routing-table revision and (ii) each gateway's
     GET /v1/models/<model> reporting it (polled every ~5 ms);
  b. the alias hop: 1-token generations straight to `infer.llm.<model>.<version>` vs through the router
     on `infer.llm.<model>`, interleaved in rounds, at concurrency 1 and 32;
  c. fast vs slow worker: one version served by a fast (1000 tokens/s) and a slow (100 tokens/s) worker,
     the same load through the P2C gateway and the queue-group gateway in alternating rounds; requests
     each worker served (deltas of its `served` stat), client latency and throughput.

Prints "[bench] ..." progress lines and tables, and writes section `registry` of bench/RESULTS.md (see
bench/results.py). Every process it starts is stopped at the end, on error too. The load generator
shares the machine's cores with the system under test.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from bench import fleet, harness  # noqa: E402
from bench.bench_spine import (  # noqa: E402
    CpuMeter,
    Direct,
    Http,
    machine,
    ms,
    pct,
    run_load,
    say,
    side_by_side,
)
from bench.fleet import admin, start_worker  # noqa: E402
from bench.harness import Report  # noqa: E402
from bench.results import write_section  # noqa: E402
from contracts import subjects  # noqa: E402
from contracts.registry import RoutingTable  # noqa: E402
from services.runtime import bus  # noqa: E402
from services.runtime.local import EmbeddedStack, ServiceProcess, wait_http, wait_service, wait_worker  # noqa: E402
from services.runtime.routing import Tables  # noqa: E402
from services.runtime.streaming import StreamClient  # noqa: E402

ADMIN_KEY = "ib-bench-admin-" + secrets.token_hex(16)
POLICY_MODEL = "bench-policy"  # v1 stable, v2 canary; the weight changes N times
ALIAS_MODEL = "bench-alias"  # v1 only, unlimited rate: the router's hop is all that differs
SPLIT_MODEL = "bench-split"  # v1 on two workers: fast (1000 tokens/s) and slow (100 tokens/s)
FAST_RATE, SLOW_RATE = 1000, 100
SPLIT_TOKENS = 10
RESULTS_PATH = ROOT / "bench" / "RESULTS.md"

FULL = {
    "changes": 30,
    "hop_c1": 1000,
    "hop_c1_rounds": 5,
    "hop_c32": 3200,
    "hop_c32_rounds": 4,
    "split": 400,
    "split_rounds": 4,
    "split_concurrency": 8,
}
QUICK = {
    "changes": 10,
    "hop_c1": 300,
    "hop_c1_rounds": 3,
    "hop_c32": 960,
    "hop_c32_rounds": 2,
    "split": 150,
    "split_rounds": 3,
    "split_concurrency": 8,
}
POLL_S = 0.005  # gateway polling interval during policy propagation
ROUND_PAUSE_S = 1.2  # between split rounds: longer than the worker heartbeat (1 s), so no stale load carries over


class WatchedTables(Tables):
    """The routing-table watcher the gateway and router use, noting when each revision of a model arrived."""

    def __init__(self, model: str) -> None:
        super().__init__()
        self.model = model
        self.arrived: dict[int, float] = {}  # revision -> perf_counter()

    def apply(self, table: RoutingTable) -> None:
        if table.model == self.model:
            self.arrived.setdefault(table.revision, time.perf_counter())
        super().apply(table)


class GatewayProc:
    def __init__(self, name: str, proc: ServiceProcess, url: str) -> None:
        self.name = name
        self.proc = proc
        self.url = url

    async def revision(self, http: aiohttp.ClientSession, model: str) -> int:
        view = await fleet.model_view(http, self.url, ADMIN_KEY, model)
        return int((view or {}).get("inferbus", {}).get("revision") or 0)

    async def until(
        self, http: aiohttp.ClientSession, model: str, revision: int, workers: int = 0, limit_s: float = 15
    ) -> None:
        await fleet.until_gateway(http, self.url, ADMIN_KEY, model, revision, workers, limit_s, name=self.name)


def start_gateway(infra: EmbeddedStack, name: str, procs: list[ServiceProcess], **settings: Any) -> GatewayProc:
    return GatewayProc(name, *fleet.start_gateway(infra, name, procs, ADMIN_KEY, **settings))


async def worker_served(nc: bus.Connection, ids: dict[str, str]) -> dict[str, int]:
    """`served` of each worker in `ids` (label -> worker_id)."""
    by_id = await fleet.worker_stats(nc)
    out = {}
    for label, worker_id in ids.items():
        if worker_id not in by_id:
            raise RuntimeError(f"worker {label} ({worker_id}) did not answer STATS")
        out[label] = int(by_id[worker_id]["served"])
    return out


# ---- results ------------------------------------------------------------------------------------


TITLES = {
    "a": "a. Policy propagation (canary weight change -> routing table in use)",
    "b": "b. Alias hop: direct version subject vs the router (max_tokens=1)",
    "c": f"c. Fast ({FAST_RATE} tok/s) vs slow ({SLOW_RATE} tok/s) worker, max_tokens={SPLIT_TOKENS}",
}


# ---- a. policy propagation ----------------------------------------------------------------------


async def policy_propagation(
    cfg: dict[str, Any],
    nc: bus.Connection,
    http: aiohttp.ClientSession,
    gateways: list[GatewayProc],
    watched: WatchedTables,
    pids: dict[str, int],
    rep: Report,
) -> None:
    n = cfg["changes"]
    say(f"a. policy propagation: {n} canary weight changes on {POLICY_MODEL}, {len(gateways)} gateways")
    view = await admin(nc, "canary", model=POLICY_MODEL, version="v2", weight=5)
    revision = int(view["revision"])
    for gw in gateways:
        await gw.until(http, POLICY_MODEL, revision, workers=2)
    reply_t: list[float] = []
    kv_t: list[float] = []
    gw_t: dict[str, list[float]] = {gw.name: [] for gw in gateways}
    polls = [0]

    async def poll(gw: GatewayProc, before: int, t0: float) -> tuple[float, int]:
        deadline = t0 + 10
        while True:
            rev = await gw.revision(http, POLICY_MODEL)
            polls[0] += 1
            if rev > before:
                return time.perf_counter() - t0, rev
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{gw.name} still at revision {rev} (want > {before}) after 10 s")
            await asyncio.sleep(POLL_S)

    meter = CpuMeter(pids)
    with meter:
        for i in range(n):
            weight = 5.0 * ((i + 1) % 10 + 1)  # 10, 15, ... 50, 5, 10, ...: always differs from the last
            t0 = time.perf_counter()
            pollers = [asyncio.create_task(poll(gw, revision, t0)) for gw in gateways]  # run from the next await
            view = await admin(nc, "canary", model=POLICY_MODEL, version="v2", weight=weight)
            reply_t.append(time.perf_counter() - t0)
            new = int(view["revision"])
            if new != revision + 1 or view["policy"].get("canary_weight") != weight:
                raise RuntimeError(f"unexpected reply: revision {new} after {revision}, policy {view['policy']}")
            while new not in watched.arrived:
                if time.perf_counter() - t0 > 10:
                    raise TimeoutError(f"KV watcher never saw revision {new}")
                await asyncio.sleep(0.001)
            kv_t.append(watched.arrived[new] - t0)
            for gw, task in zip(gateways, pollers, strict=True):
                took, seen = await task
                if seen != new:
                    raise RuntimeError(f"{gw.name} showed revision {seen}, expected {new}")
                gw_t[gw.name].append(took)
            revision = new
            await asyncio.sleep(0.05)
    slowest = [max(vals) for vals in zip(*gw_t.values(), strict=True)]
    key = "a"
    rep.table(key, ["From sending the admin request to ...", "p50", "max"])
    rep.row(key, "the registry's reply (PG write + KV put + view)", ms(pct(reply_t, 0.5)), ms(max(reply_t)))
    rep.row(key, "(i) KV watcher in the bench process has the new revision", ms(pct(kv_t, 0.5)), ms(max(kv_t)))
    for name, vals in gw_t.items():
        rep.row(key, f"(ii) {name}: GET /v1/models/{POLICY_MODEL} reports it", ms(pct(vals, 0.5)), ms(max(vals)))
    rep.row(key, "(ii) both gateways report it (slower of the two)", ms(pct(slowest, 0.5)), ms(max(slowest)))
    rep.note(
        f"propagation: {n} changes, revisions {revision - n + 1}..{revision}; gateways polled every "
        f"{POLL_S * 1000:.0f} ms ({polls[0]} polls), so their figures are upper bounds with ~{POLL_S * 1000:.0f} ms "
        f"+ one HTTP round trip of resolution; {meter.summary()}"
    )


# ---- b. alias hop -------------------------------------------------------------------------------


async def alias_hop(cfg: dict[str, Any], client: StreamClient, pids: dict[str, int], rep: Report) -> None:
    direct = Direct(client, ALIAS_MODEL, "v1")
    routed = Direct(client, ALIAS_MODEL, "v1")
    routed.subject = subjects.infer("llm", ALIAS_MODEL)
    await fleet.until_router_serves(routed.once, ALIAS_MODEL)
    ways: dict[str, Callable[[], Awaitable[float]]] = {"direct": direct.once, "router": routed.once}
    say("b. warm-up")
    await side_by_side(ways, 400, 16, 2)
    key = "b"
    rep.table(key, ["Path", "Concurrency", "p50", "p99"])
    for conc, n, rounds in (
        (1, cfg["hop_c1"], cfg["hop_c1_rounds"]),
        (32, cfg["hop_c32"], cfg["hop_c32_rounds"]),
    ):
        say(f"b. alias hop, concurrency {conc}: {n} requests each way, {rounds} interleaved rounds")
        meter = CpuMeter(pids)
        with meter:
            r = await side_by_side(ways, n, conc, rounds)
        d, a = r["direct"], r["router"]
        rep.row(key, f"direct `infer.llm.{ALIAS_MODEL}.v1`", str(conc), ms(d["p50"]), ms(d["p99"]))
        rep.row(key, f"router `infer.llm.{ALIAS_MODEL}`", str(conc), ms(a["p50"]), ms(a["p99"]))
        rep.row(key, "**added by the router hop**", str(conc), ms(a["p50"] - d["p50"]), ms(a["p99"] - d["p99"]))
        rep.note(
            f"alias hop c={conc}: {len(d['lat'])}+{len(a['lat'])} requests, {d['errors'] + a['errors']} errors, "
            f"{d['rps']:,.0f} vs {a['rps']:,.0f} req/s (direct vs router); {meter.summary()}"
        )


# ---- c. fast vs slow worker ---------------------------------------------------------------------


async def split(
    cfg: dict[str, Any],
    nc: bus.Connection,
    session: aiohttp.ClientSession,
    gateways: dict[str, GatewayProc],
    ids: dict[str, str],
    pids: dict[str, int],
    rep: Report,
) -> None:
    n, rounds, conc = cfg["split"], cfg["split_rounds"], cfg["split_concurrency"]
    per = n // rounds
    https = {mode: Http(session, gw.url, ADMIN_KEY) for mode, gw in gateways.items()}
    bodies = {mode: h.body(SPLIT_MODEL, SPLIT_TOKENS) for mode, h in https.items()}
    say(f"c. fast vs slow worker: warm-up through {', '.join(gateways)}")
    for mode, h in https.items():
        _, _, errors = await run_load(lambda h=h, mode=mode: h.once(bodies[mode]), 4 * conc, conc)
        if errors:
            raise RuntimeError(f"warm-up through the {mode} gateway failed")
    await asyncio.sleep(ROUND_PAUSE_S)
    say(f"c. {n} requests per mode, concurrency {conc}, {rounds} alternating rounds of {per}")
    out = {mode: {"lat": [], "wall": 0.0, "errors": 0, "fast": 0, "slow": 0} for mode in gateways}
    cpu: dict[str, dict[str, float]] = {mode: {} for mode in gateways}  # CPU seconds in the load windows only
    modes = list(gateways)
    before = await worker_served(nc, ids)
    for r in range(rounds):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            h, body = https[mode], bodies[mode]
            meter = CpuMeter(pids)
            with meter:
                lat, wall, errors = await run_load(lambda h=h, body=body: h.once(body), per, conc)
            for name, used in [*meter.used.items(), ("OTHER (not bench)", meter.other), ("wall", meter.wall)]:
                cpu[mode][name] = cpu[mode].get(name, 0.0) + used
            await asyncio.sleep(0.05)  # `served` counts after the Final is sent
            after = await worker_served(nc, ids)
            o = out[mode]
            o["lat"] += lat
            o["wall"] += wall
            o["errors"] += errors
            for label in ids:
                o[label] += after[label] - before[label]
            say(
                f"  round {r + 1} {mode}: fast {after['fast'] - before['fast']}, slow "
                f"{after['slow'] - before['slow']}, p50 {ms(pct(lat, 0.5))}, {len(lat) / wall:,.0f} req/s"
            )
            await asyncio.sleep(ROUND_PAUSE_S)
            before = await worker_served(nc, ids)
    key = "c"
    rep.table(key, ["Dispatch mode", "Fast worker requests", "Slow worker requests", "p50", "p99", "req/s", "mean"])
    for mode, o in out.items():
        total = o["fast"] + o["slow"]
        mean = sum(o["lat"]) / len(o["lat"]) if o["lat"] else float("nan")
        fast_share = f" ({o['fast'] / total:.0%})" if total else ""
        slow_share = f" ({o['slow'] / total:.0%})" if total else ""
        rep.row(
            key,
            mode,
            f"{o['fast']}{fast_share}",
            f"{o['slow']}{slow_share}",
            ms(pct(o["lat"], 0.5)),
            ms(pct(o["lat"], 0.99)),
            f"{len(o['lat']) / o['wall']:,.0f}" if o["wall"] else "—",
            ms(mean),
        )
        if total != len(o["lat"]) + o["errors"]:
            rep.note(f"{mode}: workers counted {total} requests, the client sent {len(o['lat']) + o['errors']}")
        wall_s = cpu[mode].pop("wall") or 1.0
        busy = ", ".join(f"{name} {used / wall_s:.2f}" for name, used in cpu[mode].items())
        rep.note(
            f"{mode}: {len(o['lat'])} requests, {o['errors']} errors; "
            f"cores busy during its rounds: {busy}"
        )


# ---- the benchmark ------------------------------------------------------------------------------


async def bench(cfg: dict[str, Any], infra: EmbeddedStack, procs: list[ServiceProcess], rep: Report) -> None:
    nc = await bus.connect(infra.nats_url, "bench", identity=infra.identity())
    client = StreamClient(nc)
    await client.start()
    watched = WatchedTables(POLICY_MODEL)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
    try:
        say("starting the registry")
        registry = await fleet.start_registry(infra, nc, procs)
        for model, versions in ((POLICY_MODEL, ("v1", "v2")), (ALIAS_MODEL, ("v1",)), (SPLIT_MODEL, ("v1",))):
            await fleet.register(nc, model, versions)
        await watched.watch(nc.jetstream())

        say("starting the router, two gateways (p2c, queue) and five benchmark workers")
        router = fleet.start_router(infra, procs)
        p2c = start_gateway(infra, "gateway-p2c", procs)
        await wait_http(p2c.url, p2c.proc)  # one at a time: both apply the gateway migrations at start
        queue = start_gateway(infra, "gateway-queue", procs, dispatch="queue")
        workers = {
            "policy-v1": start_worker(infra, "llm-policy-v1", POLICY_MODEL, "v1", procs),
            "policy-v2": start_worker(infra, "llm-policy-v2", POLICY_MODEL, "v2", procs),
            "alias": start_worker(infra, "llm-alias", ALIAS_MODEL, "v1", procs),
            "fast": start_worker(
                infra, "llm-split-fast", SPLIT_MODEL, "v1", procs, engine_options={"tokens_per_s": FAST_RATE}
            ),
            "slow": start_worker(
                infra, "llm-split-slow", SPLIT_MODEL, "v1", procs, engine_options={"tokens_per_s": SLOW_RATE}
            ),
        }
        await wait_http(queue.url, queue.proc)
        await wait_service(nc, "inferbus-router", router)
        stats = {}
        for label, proc in workers.items():
            model = {"policy": POLICY_MODEL, "alias": ALIAS_MODEL}.get(label.split("-")[0], SPLIT_MODEL)
            stats[label] = await wait_worker(nc, model, proc)
        gateways = [p2c, queue]
        async with aiohttp.ClientSession() as http:
            for gw in gateways:
                await gw.until(http, SPLIT_MODEL, 1, workers=2)
        say(
            f"registry pid {registry.pid}, router pid {router.pid}, gateways {p2c.url} (pid {p2c.proc.pid}, p2c) "
            f"and {queue.url} (pid {queue.proc.pid}, queue), nats pid {infra.nats_pid}"
        )
        base_pids = {"nats": infra.nats_pid, "bench": os.getpid()}

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8)) as http:
            await policy_propagation(
                cfg,
                nc,
                http,
                gateways,
                watched,
                {"registry": registry.pid, "gateway-p2c": p2c.proc.pid, "gateway-queue": queue.proc.pid, **base_pids},
                rep,
            )
        await alias_hop(cfg, client, {"router": router.pid, "worker": workers["alias"].pid, **base_pids}, rep)
        ids = {"fast": stats["fast"]["worker_id"], "slow": stats["slow"]["worker_id"]}
        split_pids = {
            "gateway-p2c": p2c.proc.pid,
            "gateway-queue": queue.proc.pid,
            "fast": workers["fast"].pid,
            "slow": workers["slow"].pid,
            **base_pids,
        }
        await split(cfg, nc, session, {"p2c": p2c, "queue": queue}, ids, split_pids, rep)
    finally:
        await watched.close()
        await session.close()
        await nc.close()


def write_results(rep: Report, quick: bool, outcome: harness.Outcome, note: str) -> str:
    about = [
        "Stack: embedded nats-server, PostgreSQL and Redis; the registry, the alias router, two gateways "
        "(default P2C dispatch, and INFERBUS_DISPATCH=queue) and five benchmark-engine workers, all as "
        "separate processes. The load generator (Python asyncio: aiohttp for HTTP, the gateway's own "
        "`StreamClient` for NATS) runs **on the same 2 cores**, so every figure includes its CPU contention.",
        *harness.noise(CpuMeter.others, outcome, note),
    ]
    tables = [
        "What the numbers mean:",
        "",
        "- **a** is how long an operator's traffic change takes to be in force: the registry writes the policy "
        "to PostgreSQL, puts the routing table in the NATS KV bucket, and every gateway (and router) holds a KV "
        "watch, so the table reaches them as a pushed message, no polling. (i) is when that message reaches a "
        "watcher in the bench process; (ii) is when each gateway answers with the new revision (measured by "
        "polling, so it includes up to one polling interval).",
        "- **b** is the cost of the alias router for plain NATS publishers who name no version: one extra "
        "publish through nats-server and a routing decision in the router (the reply stream goes straight from "
        "the worker to the caller). The baseline publishes to the version's queue-group subject; the router "
        "forwards to the worker's own subject. Both ways are interleaved in rounds, one worker, no gateway. "
        "At concurrency 32 the p99 is set by occasional stalls of tens of ms (a pause in any one process holds "
        "up all 32 requests in flight), which land in one way's rounds or the other's from run to run; a "
        "separate check with 800-request windows saw them on the version subject, the worker's own subject "
        "and the router path alike, so the c=32 p99 difference says nothing about the hop.",
        "- **c** shows what load-aware dispatch buys when workers differ in speed: the queue group spreads "
        "requests evenly, so about half land on the 10x slower worker; P2C sends each request to the less busy "
        "of two live workers (with exactly two workers it compares both every time), busy meaning requests "
        "outstanding from this gateway, or the worker's last heartbeat if that is higher. It balances "
        "outstanding requests, not latency, so the slow worker still gets a share (with equal outstanding "
        "counts it would be about 1 in 11), and as long as that share is above 1 % the slow worker's ~100 ms "
        "sets p99 in both modes. With about half its requests on each worker, the queue group's latency is "
        "bimodal (fast worker ~15-20 ms, slow ~100 ms) and its p50 sits on the edge between the two modes, so "
        "it flips between them from run to run (20 ms in one full run, 103 ms in another, alike otherwise); "
        "req/s and the mean are the steady comparison. Same client load (HTTP, keep-alive) "
        f"through each gateway, alternating rounds with {ROUND_PAUSE_S} s pauses so no stale heartbeat load "
        "carries over from one mode's round to the other's.",
        "",
        rep.section("a"),
        rep.section("b"),
        rep.section("c"),
    ]
    text = harness.markdown(
        "InferBus registry and routing benchmark", "bench_registry.py", quick, outcome, about,
        "\n".join(tables), rep.notes,
    )
    write_section(RESULTS_PATH, "registry", text)
    return text


def main() -> int:
    args = harness.arguments(__doc__, "smaller counts", note=True)
    cfg = QUICK if args.quick else FULL
    rep = Report(TITLES)
    outcome = harness.run(
        "registry", lambda infra, procs: bench(cfg, infra, procs, rep), quick=args.quick, machine=machine()
    )
    if outcome is None:
        return 1
    write_results(rep, args.quick, outcome, args.note)
    harness.report("registry", rep.titled(), outcome, RESULTS_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
