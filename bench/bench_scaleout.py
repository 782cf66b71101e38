#!/usr/bin/env python
"""Benchmark scale-out on one machine: 1 vs 2 gateways and 1 vs 2 NATS nodes at c=64, and the cluster's faults.

    python bench/bench_scaleout.py [--quick] [--note TEXT]

On one machine scale-out cannot add CPU, so this measures the shape, not the absolute: what a second gateway or
a second NATS node costs in CPU per request, and whether throughput holds.

1. Throughput. Two stacks run side by side on the harness's PostgreSQL and Redis: **1 node**, the embedded
   nats-server (the accounts, role users and auth callout of a cluster node's auth.conf; JetStream standalone:
   a cluster.conf node alone never elects JetStream's meta leader), and **2 nodes**, a cluster of two
   nats-servers running infra/nats/cluster.conf (services/runtime/nats_cluster.py). The platform's streams are
   made with one replica on both. Each stack has two gateways (a on node 1, b on node 2) and four
   benchmark-engine workers, two per model (one on each node): the same workers in every configuration, enough
   that the gateways are what saturates. Configurations (gateways / nodes): 1/1, 2/1, 1/2, 2/2. Load: one wrk,
   two threads, 64 keep-alive connections: both threads on gateway a, or one thread (32 connections) on each
   gateway; non-streaming (`max_tokens` 16, one JSON response) and streaming (32 content chunks as SSE), the
   requests of bench/bench_floor.py's c=64 case. Windows in rounds, the order of the configurations rotated and
   reversed, so drift hits all four. Per configuration: req/s, p50/p99, and CPU ms per request of every process
   group (gateways, workers, nats-servers, stores, the client), with the ratios to 1/1.
2. Faults: the drills of tests/test_cluster.py (services/runtime/cluster_faults.py) on a 3-node cluster with the
   platform spread across it (registry, router, metering, two gateways, three workers; streams with three
   replicas), streaming load at c=16: a node SIGKILLed and started again, then a gateway SIGKILLed. Requests,
   failures, the longest time without a completed request (recovery), how fast the dead node's clients were on
   another node, and the ledger against the requests.

Prints "[bench] ..." progress lines and the tables; a full run (not --quick) writes section `scaleout` of
bench/RESULTS.md (~4 min on 2 cores). --quick: one round of 2 s windows, shorter drills (a smoke run, ~1 min).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from bench import fleet, harness  # noqa: E402
from bench.bench_floor import (  # noqa: E402
    MAX_TOKENS,
    STREAM_OPTIONS,
    STREAM_PIECES,
    Cell,
    Target,
    Window,
    body,
    cell,
    check,
    fingerprint,
    ms,
    window,
    x,
)
from bench.bench_spine import machine  # noqa: E402
from bench.harness import Report, TreeMeter, say, wrk, wrk_binary, wrk_script  # noqa: E402
from bench.results import write_section  # noqa: E402
from services.cli import config  # noqa: E402
from services.runtime import bus, cluster_faults  # noqa: E402
from services.runtime.embedded import free_port  # noqa: E402
from services.runtime.local import EmbeddedStack, ServiceProcess, settings_env, wait_http, wait_worker  # noqa: E402
from services.runtime.nats_cluster import Cluster  # noqa: E402

ADMIN_KEY = "ib-bench-admin-scaleout-" + "s" * 24
MODEL = "bench-scaleout"  # benchmark engine, defaults: 16 tokens at once -> one Delta
STREAM_MODEL = "bench-scaleout-stream"  # yields to the loop after every token -> 32 Deltas
MODELS = [{"name": MODEL, "version": "v1"}, {"name": STREAM_MODEL, "version": "v1"}]
CONCURRENCY = 64
THREADS = 2  # wrk threads, in every configuration: one per gateway when there are two
CONFIGS = ("1/1", "2/1", "1/2", "2/2")  # gateways / NATS nodes
LABELS = {c: f"{c[0]} gateway{'s' if c[0] == '2' else ''} / {c[2]} NATS node{'s' if c[2] == '2' else ''}"
          for c in CONFIGS}
MODES = ("json", "stream")
MODE_LABELS = {"json": f"non-streaming (max_tokens {MAX_TOKENS})", "stream": f"streaming ({STREAM_PIECES} chunks)"}
GROUPS = ("gateways", "workers", "nats-servers", "stores")
RESULTS_PATH = ROOT / "bench" / "RESULTS.md"

FULL = {"seconds": 4, "rounds": 3, "warmup": 2, "fault_warm": cluster_faults.WARM_REQUESTS,
        "fault_min": cluster_faults.MIN_REQUESTS}
QUICK = {"seconds": 2, "rounds": 1, "warmup": 1, "fault_warm": 5 * cluster_faults.CONCURRENCY,
         "fault_min": 25 * cluster_faults.CONCURRENCY}

TITLES = {
    "main": "Throughput and CPU per request at c=64, by configuration (ratios to 1 gateway / 1 node)",
    "cpu": "CPU per request by process group (ms; platform = gateways + workers + nats-servers + stores)",
    "faults": "The cluster's fault drills (3 nodes, streaming load at c=16)",
}


class Stack(NamedTuple):
    """One NATS deployment (1 or 2 nodes) with its two gateways and four workers."""

    nodes: int
    gateways: list[str]  # base URLs: a (node 1), b (node 2)
    gateway_pids: list[int]
    worker_pids: list[int]
    nats_pids: list[int]
    procs: list[ServiceProcess]


# ---- the two stacks -------------------------------------------------------------------------------------


def worker_settings(stream: bool) -> dict[str, Any]:
    return {"model": STREAM_MODEL if stream else MODEL, "version": "v1", "engine": "benchmark",
            **({"engine_options": STREAM_OPTIONS} if stream else {})}


async def provision(nc: bus.Connection) -> None:
    """The platform's streams, one replica (the same on both stacks), before any service."""
    got = await config.provision(nc, 1, say)
    if any(r != 1 for r in got.values()):
        raise RuntimeError(f"expected one replica everywhere: {got}")


async def ready(nc: bus.Connection, gateways: list[tuple[ServiceProcess, str]], workers: list[ServiceProcess]
                ) -> None:
    for proc in workers:
        await wait_worker(nc, STREAM_MODEL if "stream" in proc.name else MODEL, proc)
    for proc, base in gateways:
        await wait_http(base, proc)


async def one_node(infra: EmbeddedStack, procs: list[ServiceProcess]) -> Stack:
    nc = await bus.connect(infra.nats_url, "bench-scaleout", identity=infra.identity())
    try:
        await provision(nc)
        gateways = [fleet.start_gateway(infra, f"1node-gateway-{g}", procs, ADMIN_KEY, models=MODELS)
                    for g in "ab"]
        workers = [ServiceProcess(f"1node-{'stream-' if stream else ''}worker-{i}", "services.llm",
                                  infra.env(**settings_env(**worker_settings(stream))), infra.root)
                   for stream in (False, True) for i in (1, 2)]
        procs += workers
        await ready(nc, gateways, workers)
    finally:
        await nc.close()
    return Stack(1, [b for _, b in gateways], [p.pid for p, _ in gateways], [w.pid for w in workers],
                 [infra.nats_pid], [p for p, _ in gateways] + workers)


async def two_nodes(infra: EmbeddedStack, procs: list[ServiceProcess]) -> tuple[Cluster, Stack]:
    root = infra.root / "two-nodes"
    root.mkdir()
    cluster = Cluster(root, config, size=2)
    cluster.start_nodes()
    await cluster.formed()
    cluster.database_url, cluster.redis_url = infra.database_url, infra.redis_url  # the stores are shared
    n1, n2 = cluster.nodes
    nc = await cluster.connect("bench-scaleout", n1)
    try:
        await provision(nc)
        gateways = []
        for g, node in (("a", n1), ("b", n2)):
            port = free_port()
            proc = cluster.start(f"2node-gateway-{g}", "services.gateway", node, INFERBUS_PORT=str(port),
                                 INFERBUS_ADMIN_KEY=ADMIN_KEY, **settings_env(models=MODELS))
            gateways.append((proc, f"http://127.0.0.1:{port}"))
        workers = [cluster.start(f"2node-{'stream-' if stream else ''}worker-{i + 1}", "services.llm", node,
                                 **settings_env(**worker_settings(stream)))
                   for stream in (False, True) for i, node in enumerate((n1, n2))]
        procs += [p for p, _ in gateways] + workers
        await ready(nc, gateways, workers)
    finally:
        await nc.close()
    return cluster, Stack(2, [b for _, b in gateways], [p.pid for p, _ in gateways], [w.pid for w in workers],
                          [n.pid for n in cluster.nodes], [p for p, _ in gateways] + workers)


def targets(stack: Stack, gateways: int, stores: list[int], root: Path) -> Target:
    """The configuration `gateways` / `stack.nodes` as wrk sees it: its scripts and the processes it counts."""
    ports = [urlsplit(base).port or 80 for base in stack.gateways[:gateways]]
    name = f"{gateways}gw-{stack.nodes}node"
    scripts = {mode: wrk_script(root / f"wrk-{name}-{mode}.lua", body(MODEL if mode == "json" else STREAM_MODEL,
                                                                      mode == "stream"),
                                ADMIN_KEY, ports if gateways > 1 else ())
               for mode in MODES}
    pids = {"gateways": stack.gateway_pids[:gateways], "workers": stack.worker_pids,
            "nats-servers": stack.nats_pids, "stores": stores}
    return Target(stack.gateways[0] + "/v1/chat/completions", scripts, pids, THREADS)


async def checked(stacks: list[Stack]) -> list[str]:
    """One request per gateway and mode, as wrk will send it: the answer has what it should."""
    shapes = []
    async with aiohttp.ClientSession() as http:
        for stack in stacks:
            for base in stack.gateways:
                for mode, model in (("json", MODEL), ("stream", STREAM_MODEL)):
                    got = await check(http, base + "/v1/chat/completions", ADMIN_KEY, model, mode == "stream")
                    want = STREAM_PIECES if mode == "stream" else MAX_TOKENS
                    if got["tokens"] != want or (mode == "stream" and got["chunks"] != STREAM_PIECES):
                        raise RuntimeError(f"{base} {mode}: {got}")
                    shapes.append(f"{mode} {got['bytes']} B")
    return sorted(set(shapes))


def closed_early(procs: list[ServiceProcess]) -> tuple[int, int]:
    """The gateways' `unhandled_error` events, and how many of them are writes to a closed client."""
    lines = [line for p in procs if "gateway" in p.name for line in p.log().splitlines()
             if '"unhandled_error"' in line]
    return len(lines), sum(1 for line in lines if "closing transport" in line)


# ---- the measurement ----------------------------------------------------------------------------------


class Figures(NamedTuple):
    cell: Cell
    client_ms: float  # wrk's CPU per request


async def measure(cfg: dict[str, Any], by_config: dict[str, Target]) -> dict[tuple[str, str], Figures]:
    for mode in MODES:
        say(f"warm-up, {MODE_LABELS[mode]}: {cfg['warmup']} s at c={CONCURRENCY} on each configuration")
        for name in CONFIGS:
            t = by_config[name]
            await wrk(t.url, t.scripts[mode], CONCURRENCY, cfg["warmup"], t.threads)
    out: dict[tuple[str, str], Figures] = {}
    for mode in MODES:
        say(f"{MODE_LABELS[mode]}, c={CONCURRENCY}: {cfg['rounds']} round(s) of {cfg['seconds']} s per "
            "configuration, order rotating")
        got: dict[str, list[Window]] = {c: [] for c in CONFIGS}
        for r in range(cfg["rounds"]):
            order = CONFIGS[r % 4:] + CONFIGS[:r % 4]
            order = order[::-1] if r % 2 else order
            for name in order:
                w = await window(by_config[name], mode, CONCURRENCY, cfg["seconds"])
                got[name].append(w)
                say(f"    round {r + 1} {name}  p50 {ms(w.run.p50)}  p99 {ms(w.run.p99)}  {w.run.rps:,.0f}/s  "
                    f"CPU {1000 * sum(w.cpu.values()) / max(w.run.requests, 1):.3f} ms/req  errors "
                    f"{w.run.errors}  other {w.other:.2f} cores")
        for name in CONFIGS:
            c = cell(got[name])
            out[(name, mode)] = Figures(c, 1000 * sum(w.run.cpu for w in got[name]) / max(c.requests, 1))
    return out


def tabulate(figures: dict[tuple[str, str], Figures], rep: Report) -> None:
    rep.table("main", ["Mode", "Configuration", "req/s", "p50", "p99", "req/s vs 1/1", "CPU ms/request (platform)",
                       "CPU/request vs 1/1", "errors"])
    rep.table("cpu", ["Mode", "Configuration", *GROUPS, "platform", "client (wrk)", "all", "other load (cores)"])
    for mode in MODES:
        base = figures[("1/1", mode)].cell
        for name in CONFIGS:
            f = figures[(name, mode)]
            c = f.cell
            rep.row("main", MODE_LABELS[mode], LABELS[name], f"{c.rps:,.0f}", ms(c.p50), ms(c.p99), x(c.rps, base.rps),
                    f"{c.cpu_ms:.3f}", x(c.cpu_ms, base.cpu_ms), str(c.errors))
            rep.row("cpu", MODE_LABELS[mode], LABELS[name], *[f"{c.per_process[g]:.3f}" for g in GROUPS],
                    f"{c.cpu_ms:.3f}", f"{f.client_ms:.3f}", f"{c.cpu_ms + f.client_ms:.3f}", f"{c.other:.2f}")


def interpret(figures: dict[tuple[str, str], Figures], rep: Report) -> None:
    def fig(name: str, mode: str = "json") -> Cell:
        return figures[(name, mode)].cell

    def change(name: str, mode: str = "json") -> str:
        a, b = fig("1/1", mode), fig(name, mode)
        return f"throughput {x(b.rps, a.rps)}, platform CPU per request {x(b.cpu_ms, a.cpu_ms)}"

    g1, g2 = fig("1/1").per_process, fig("2/1").per_process
    n1, n2 = fig("1/1").per_process, fig("1/2").per_process
    rep.note(
        "On 2 cores scale-out cannot add CPU: every configuration shares the same two cores with wrk, so the "
        "absolute req/s is the machine's and the shape is the finding. Non-streaming: a second gateway gives "
        f"{change('2/1')} (the gateways' share {g1['gateways']:.3f} -> {g2['gateways']:.3f} ms/request); a second "
        f"NATS node gives {change('1/2')} (the nats-servers' share {n1['nats-servers']:.3f} -> "
        f"{n2['nats-servers']:.3f} ms/request: a request crosses a route whenever its gateway and its worker "
        f"sit on different nodes, about half the time here); both give {change('2/2')}. Streaming: "
        f"{change('2/1', 'stream')} with a second gateway, {change('1/2', 'stream')} with a second node, "
        f"{change('2/2', 'stream')} with both. Where CPU per request holds, a machine with more cores gets the "
        "throughput of each added process; what it rises by is what each added gateway or node costs.")
    rep.note("1 node is the embedded nats-server (`EmbeddedStack`), 2 nodes are infra/nats/cluster.conf: the same "
             "accounts, role users and auth callout (the cluster's auth.conf is cut from the embedded server's "
             "config), every stream with one replica on both; JetStream runs standalone on the one node and "
             "clustered (a meta group over the routes) on two — a cluster.conf node alone never elects a meta "
             "leader. Both stacks and the shared PostgreSQL and Redis are up for the whole measurement; the "
             "idle stack, and gateway b during 1-gateway windows, count under \"other load\", not in the figures.")


# ---- the faults ----------------------------------------------------------------------------------------


async def faults(cfg: dict[str, Any], infra: EmbeddedStack, procs: list[ServiceProcess], rep: Report) -> None:
    root = infra.root / "three-nodes"
    root.mkdir()
    cluster = Cluster(root, config, size=3)
    try:
        say("faults: starting a 3-node cluster and the platform spread across it (streams with three replicas)")
        cluster.start_nodes()
        await cluster.formed()
        cluster.database_url, cluster.redis_url = infra.database_url, infra.redis_url
        try:
            await cluster_faults.start_platform(cluster, replicas=3)
        finally:
            procs += list(cluster.services.values())
        warm, minimum = cfg["fault_warm"], cfg["fault_min"]
        say(f"faults: SIGKILL node n1 under c={cluster_faults.CONCURRENCY} streaming load ({warm} requests "
            f"before, at least {minimum} in all), start it again")
        node = await cluster_faults.node_fault(cluster, warm, minimum)
        say(f"faults: node done: {node.stats}; ledger {node.ledger}")
        say("faults: SIGKILL gateway-a under the same load")
        gateway = await cluster_faults.gateway_fault(cluster, "gateway-a", warm, minimum)
        say(f"faults: gateway done: {gateway.stats}; ledger {gateway.ledger}")
    finally:
        cluster.stop()
    rep.table("faults", ["Fault", "Requests (req/s)", "Failed", "Longest time without a completed request",
                         "First success after the fault, per gateway", "Killed node's clients on another node",
                         "Ledger rows / requests accepted (missing, duplicated, mismatched tokens, unseen)"])
    for label, f in (("SIGKILL node n1 (registry, gateway-a, w1 on it), then start it", node),
                     ("SIGKILL gateway-a (of two)", gateway)):
        s, led = f.stats, f.ledger
        firsts = ", ".join(f"{g} {t:.2f} s" for g, t in sorted(s["first_success_after_fault_s"].items())
                           if t != float("inf")) or "—"
        moved = "—" if f.reconnect_s is None else f"{f.reconnect_s:.2f} s (node current again {f.back_s:.1f} s)"
        rep.row("faults", label, f"{s['requests']:,} ({s['rate_per_s']:,.0f}/s)",
                f"{s['failed']} ({s['failed_pct']:.2f} %)", f"{s['longest_gap_s']:.2f} s", firsts, moved,
                f"{led['rows']:,} / {led['accepted']:,} ({led['missing']}, {led['duplicated']}, "
                f"{led['mismatched']}, {led['unseen']})")
        if s["errors"]:
            rep.note(f"{label}: the failed requests' errors: {'; '.join(s['errors'])}")
    rep.note("Faults: targets (tests/test_cluster.py) < 1 % failed, every client of the dead node on another within "
             "5 s, never 5 s without a completed request, the ledger holds every accepted request once with the "
             "tokens its client got (missing = duplicated = mismatched = 0; unseen <= failed: a request that "
             "failed before the gateway had its id to give).")


# ---- the run --------------------------------------------------------------------------------------------


async def bench(cfg: dict[str, Any], infra: EmbeddedStack, procs: list[ServiceProcess], rep: Report,
                about: list[str]) -> None:
    wrk_binary()
    code = fingerprint()
    say(f"code under test: {code}")
    assert infra.postgres.proc is not None and infra.redis.proc is not None
    stores = [infra.postgres.proc.pid, infra.redis.proc.pid]
    cluster: Cluster | None = None
    try:
        say("starting the 1-node stack: embedded nats-server, gateways a and b, four benchmark workers")
        single = await one_node(infra, procs)
        say("starting the 2-node stack: cluster.conf on two nodes, gateway a and two workers on each node")
        cluster, double = await two_nodes(infra, procs)
        say("checking one request per gateway and mode")
        shapes = await checked([single, double])
        by_config = {f"{g}/{s.nodes}": targets(s, g, stores, infra.root) for s in (single, double) for g in (1, 2)}
        say("measuring: " + ", ".join(LABELS[c] for c in CONFIGS))
        figures = await measure(cfg, by_config)
        tabulate(figures, rep)
        interpret(figures, rep)
        bad = sum(f.cell.errors for f in figures.values())
        if bad:
            rep.note(f"{bad} wrk errors in all (non-2xx, timeouts or socket errors)")
        unhandled, closed = closed_early(single.procs + double.procs)
        if unhandled:
            rep.note(f"{closed} of the gateways' {unhandled} `unhandled_error` events are writes to a client that had "
                     "already closed its connection (`Cannot write to closing transport`): wrk closes its "
                     "connections, requests in flight, at the end of every window.")
        say("stopping the two stacks")
        for stack in (single, double):
            for p in stack.procs:
                p.stop()
    finally:
        if cluster is not None:
            for node in cluster.nodes:
                node.stop()
    await faults(cfg, infra, procs, rep)
    about += [f"Code under test: {code}.", "Response sizes (checked before the load): " + "; ".join(shapes) + "."]


def main() -> int:
    args = harness.arguments(__doc__, "one round of 2 s windows, shorter drills (a smoke run, ~1 min)", note=True)
    cfg = QUICK if args.quick else FULL
    rep = Report(TITLES)
    about: list[str] = []
    outcome = harness.run("scaleout", lambda infra, procs: bench(cfg, infra, procs, rep, about),
                          quick=args.quick, machine=machine())
    if outcome is None:
        return 1
    head = [
        "What: the platform on the benchmark engine at c=64 with 1 or 2 gateways on 1 or 2 NATS nodes, the same "
        "workers throughout (two per model, one on each node); then tests/test_cluster.py's fault drills.",
        f"Load: one wrk, {THREADS} threads, {CONCURRENCY} keep-alive connections (one thread per gateway when "
        f"there are two); per configuration and mode {cfg['rounds']} round(s) of {cfg['seconds']} s, the order "
        "rotated and reversed between rounds. p50/p99: wrk's, the median over rounds; req/s: requests over all "
        "rounds / their seconds; CPU per request: user+system CPU of each group's process trees during its "
        "windows / the requests completed. wrk runs on the same cores.",
        *about,
        *harness.noise(TreeMeter.others, outcome, args.note),
    ]
    tables = "\n".join(rep.section(k) for k in TITLES)
    text = harness.markdown("Scale-out on one machine: gateways, NATS nodes, faults", "bench_scaleout.py",
                            args.quick, outcome, head, tables, rep.notes)
    print()
    print(rep.titled())
    for finding in outcome.findings:
        say(f"service log: {finding}")
    if args.quick:  # a smoke run never replaces the measured figures
        say(f"quick run: bench/RESULTS.md left as it was ({outcome.elapsed:.0f} s)")
    else:
        write_section(RESULTS_PATH, "scaleout", text)
        say(f"wrote section scaleout of {RESULTS_PATH.name} in {outcome.elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
