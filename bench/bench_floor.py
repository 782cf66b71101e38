#!/usr/bin/env python
"""Benchmark the hot path against its floor: InferBus vs a bare aiohttp + nats-py pair, same load, one run.

    python bench/bench_floor.py [--quick] [--note TEXT] [--section NAME]

Starts its own embedded nats-server, PostgreSQL and Redis (the platform's secure bus, as `inferbus up`), a
gateway and two benchmark-engine LLM workers, and, on a second, plain nats-server of its own, the floor
(bench/floor_server.py: a bare aiohttp handler making one nats-py request/reply to a nats-py responder, both
separate processes, uvloop when installed). Then, with `wrk` (HTTP/1.1 keep-alive, one thread; POST bodies and
the percentiles from a Lua script), for each of

  - **floor**: the bare pair;
  - **InferBus**: the gateway with the admin key, benchmark engine, everything else default;
  - **limits key**: the same gateway with an API key that has requests/min and tokens/min limits (too high to
    ever refuse), created through POST /v1/admin/keys;

at concurrency 1, 16 and 64, non-streaming (`max_tokens` 16, one JSON response) and streaming (32 content
chunks as SSE; wrk times the whole response): p50, p99, req/s (streams/s), and the CPU time per request of
every process of the platform under test (gateway, workers, nats-server, Redis, PostgreSQL with its
backends; for the floor: handler, responder, its nats-server), from psutil CPU times before and after each
window. The windows of a concurrency run in rounds, the order of the three rotated and reversed, so drift
hits all three.

Prints "[bench] ..." progress lines and tables, and writes section `floor` of bench/RESULTS.md (see
bench/results.py), with the ratios to the floor against the targets of issue 16. wrk shares the machine's
cores with the system under test; its CPU is reported beside the figures. The hot path's profile under the
same load: bench/profile_hot_path.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import msgspec  # noqa: E402

from bench import fleet, harness  # noqa: E402
from bench.bench_spine import machine  # noqa: E402
from bench.harness import WRK_INSTALL, Report, TreeMeter, Wrk, say, wrk, wrk_binary, wrk_script  # noqa: E402
from bench.results import write_section  # noqa: E402
from services.runtime import bus  # noqa: E402
from services.runtime.embedded import NatsServer, free_port  # noqa: E402
from services.runtime.local import EmbeddedStack, ServiceProcess, wait_http, wait_worker  # noqa: E402

ADMIN_KEY = "ib-bench-admin-" + secrets.token_hex(16)
MODEL = "bench-floor"  # benchmark engine, defaults: 16 tokens come out of the engine at once -> one Delta
STREAM_MODEL = "bench-floor-stream"  # benchmark engine yielding to the loop after every token -> 32 Deltas
STREAM_OPTIONS = {"tokens_per_s": 1e12}  # a rate it never waits for: `await asyncio.sleep(0)` per token
MAX_TOKENS = 16
STREAM_PIECES = 32
LIMITS = {"rpm": 100_000_000, "tpm": 100_000_000_000}
RESULTS_PATH = ROOT / "bench" / "RESULTS.md"
SYSTEMS = ("floor", "inferbus", "limits")
LABELS = {"floor": "floor", "inferbus": "InferBus (admin key)", "limits": "InferBus (limits key)"}
CONCURRENCY = (1, 16, 64)
MODES = ("json", "stream")
MODE_LABELS = {"json": f"non-streaming (max_tokens {MAX_TOKENS})", "stream": f"streaming ({STREAM_PIECES} chunks)"}

# Issue 16's targets, as ratios to the floor in the same run.
TARGET_C1_P50 = 2.0  # InferBus c=1 p50 <= 2x the floor's
TARGET_C64_RPS = 0.45  # InferBus c=64 req/s >= 0.45x the floor's
TARGET_LIMITS_ADDED_MS = 0.1  # a key with limits adds <= 0.1 ms p50 at c=1
TARGET_CPU_MS = 0.2  # CPU per request, whole platform, c=64
# "Today" for the streams/s target: the first measurement, on the committed code before the work on issue 16
# (commit db14ce6, section `floor-today` of RESULTS.md). The target is 2x this.
TODAY_STREAMS_C16: float | None = 1203.0
TODAY_REF = "db14ce6"
# The same measurement as a ratio to the floor in its run (1,203 vs 2,992 streams/s): a host that runs
# everything slower or faster moves both, so 2x this ratio is the target's form that travels between hosts.
TODAY_STREAMS_C16_RATIO: float | None = 1203.0 / 2992.0

# Windows per system: `rounds` x `seconds` at c=16 and 64; `c1_rounds` x `c1_seconds` at c=1, where the limits
# key's added p50 (target 0.1 ms) is the median of per-round differences.
FULL = {"seconds": 4, "rounds": 3, "c1_seconds": 3, "c1_rounds": 5, "warmup": 2}
QUICK = {"seconds": 2, "rounds": 1, "c1_seconds": 2, "c1_rounds": 2, "warmup": 1}

# ---- the request --------------------------------------------------------------------------------


def body(model: str, stream: bool) -> bytes:
    """The request every system gets: what an OpenAI client sends."""
    req: dict[str, Any] = {"model": model, "max_tokens": STREAM_PIECES if stream else MAX_TOKENS,
                           "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        req["stream"] = True
        req["stream_options"] = {"include_usage": True}
    return msgspec.json.encode(req)


# ---- the systems under test --------------------------------------------------------------------------


class Target(NamedTuple):
    url: str
    scripts: dict[str, Path]  # mode -> wrk script
    pids: Mapping[str, int | Sequence[int]]  # process tree roots whose CPU is the platform's, by name or group
    threads: int = 1  # wrk threads (a script may send each to a server of its own)


class Platform(NamedTuple):
    base: str
    gateway: ServiceProcess
    worker: ServiceProcess
    stream_worker: ServiceProcess
    pids: dict[str, int]


def script(root: Path, name: str, model: str, stream: bool, key: str) -> Path:
    return wrk_script(root / f"wrk-{name}.lua", body(model, stream), key)


async def start_inferbus(infra: EmbeddedStack, procs: list[ServiceProcess]) -> Platform:
    """The gateway (admin key, defaults) and the two benchmark workers on the stack's secure bus, ready."""
    say("starting the gateway and two benchmark-engine workers (secure bus, defaults)")
    gateway, base = fleet.start_gateway(infra, "gateway", procs, ADMIN_KEY,
                                        models=[{"name": MODEL, "version": "v1"},
                                                {"name": STREAM_MODEL, "version": "v1"}])
    worker = fleet.start_worker(infra, "llm-bench", MODEL, "v1", procs)
    stream_worker = fleet.start_worker(infra, "llm-bench-stream", STREAM_MODEL, "v1", procs,
                                       engine_options=STREAM_OPTIONS)
    nc = await bus.connect(infra.nats_url, "bench", identity=infra.identity())
    try:
        await wait_http(base, gateway)
        await wait_worker(nc, MODEL, worker)
        await wait_worker(nc, STREAM_MODEL, stream_worker)
    finally:
        await nc.close()
    assert infra.redis.proc is not None and infra.postgres.proc is not None
    pids = {"gateway": gateway.pid, "worker": worker.pid, "stream worker": stream_worker.pid,
            "nats": infra.nats_pid, "redis": infra.redis.proc.pid, "postgres": infra.postgres.proc.pid}
    say(f"gateway {base}; pids " + ", ".join(f"{k} {v}" for k, v in pids.items()))
    return Platform(base, gateway, worker, stream_worker, pids)


async def create_limits_key(http: aiohttp.ClientSession, base: str) -> tuple[str, str]:
    async with http.post(
        base + "/v1/admin/keys",
        json={"name": "bench-floor-limits", "scopes": ["inference"], "limits": LIMITS},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    ) as resp:
        text = await resp.text()
        if resp.status != 201:
            raise RuntimeError(f"creating the limits key: HTTP {resp.status}: {text[:300]}")
        data = msgspec.json.decode(text)
    return data["key"], data["info"]["id"]


async def start_floor(root: Path, procs: list[ServiceProcess]) -> tuple[NatsServer, str, dict[str, int]]:
    """The floor's own plain nats-server, responder and handler; (server, base URL, pids)."""
    server = NatsServer(root / "floor-bus", secure=False)
    url = server.start()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERBUS_")}
    env.update(FLOOR_NATS_URL=url, FLOOR_PORT=str(port), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")])))
    responder = ServiceProcess("floor-responder", "bench.floor_server", {**env, "FLOOR_ROLE": "responder"}, root)
    procs.append(responder)
    handler = ServiceProcess("floor-handler", "bench.floor_server", {**env, "FLOOR_ROLE": "handler"}, root)
    procs.append(handler)
    base = f"http://127.0.0.1:{port}"
    await wait_http(base, handler)
    assert server.proc is not None
    pids = {"handler": handler.pid, "responder": responder.pid, "nats": server.proc.pid}
    return server, base, pids


async def check(http: aiohttp.ClientSession, url: str, key: str, model: str, stream: bool, limit_s: float = 30
                ) -> dict[str, Any]:
    """One request as wrk will send it, until it answers 200: response size, content chunks and tokens."""
    deadline = time.monotonic() + limit_s
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    while True:
        async with http.post(url, data=body(model, stream), headers=headers) as resp:
            raw = await resp.read()
        if resp.status == 200:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} ({model}) answers HTTP {resp.status}: {raw[:300]!r}")
        await asyncio.sleep(0.2)
    if not stream:
        data = msgspec.json.decode(raw)
        return {"bytes": len(raw), "chunks": 1, "tokens": data["usage"]["completion_tokens"]}
    chunks, done, text = 0, False, ""
    for line in raw.split(b"\n"):
        if not line.startswith(b"data: "):
            continue
        if line[6:].strip() == b"[DONE]":
            done = True
            continue
        for choice in msgspec.json.decode(line[6:]).get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if content:
                chunks += 1
                text += content
    if not done:
        raise RuntimeError(f"{url} ({model}): the stream did not end with [DONE]")
    return {"bytes": len(raw), "chunks": chunks, "tokens": text.count("tok")}


def copy_logs(procs: list[ServiceProcess], to: Path) -> None:
    to.mkdir(parents=True, exist_ok=True)
    for p in procs:
        with contextlib.suppress(OSError):
            shutil.copy(p.log_path, to / p.log_path.name)


def loop_of(pid: int) -> str:
    """uvloop when the process has uvloop's extension mapped, else asyncio."""
    with contextlib.suppress(OSError):
        if "uvloop" in Path(f"/proc/{pid}/maps").read_text():
            return "uvloop"
    return "asyncio"


def fingerprint(tree: Path | None = None) -> str:
    """Which code ran: the git commit of `tree` (default: the tree the services import from) and a hash of its
    Python sources."""
    tree = tree or Path(sys.modules["services"].__path__[0]).parent
    h = hashlib.sha256()
    for p in sorted([*(tree / "services").rglob("*.py"), *(tree / "contracts").rglob("*.py")]):
        h.update(p.read_bytes())
    commit = "(not a git checkout)"
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                                check=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--", "services", "contracts"],
                               capture_output=True, check=True, text=True).stdout.strip()
        if dirty:
            commit += " + uncommitted changes"
    return f"{tree}: commit {commit}, services/ + contracts/ sha256 {h.hexdigest()[:12]}"


# ---- the measurement ----------------------------------------------------------------------------------


class Window(NamedTuple):
    run: Wrk
    cpu: dict[str, float]  # CPU seconds by process tree
    other: float  # cores used outside the bench


async def window(target: Target, mode: str, concurrency: int, seconds: int) -> Window:
    meter = TreeMeter(target.pids)
    meter.start()
    run = await wrk(target.url, target.scripts[mode], concurrency, seconds, target.threads)
    meter.stop(run.cpu)
    return Window(run, meter.used, meter.other)


class Cell(NamedTuple):
    """One system at one mode and concurrency, over its rounds."""

    p50: float  # median of the rounds' p50
    p99: float  # median of the rounds' p99
    rps: float  # requests / seconds over all rounds
    cpu_ms: float  # platform CPU ms per request
    per_process: dict[str, float]  # CPU ms per request by process tree
    client_cores: float  # wrk
    other: float  # mean cores outside the bench
    errors: int
    requests: int
    p50s: list[float]


def cell(windows: list[Window]) -> Cell:
    requests = sum(w.run.requests for w in windows)
    seconds = sum(w.run.seconds for w in windows)
    names = list(windows[0].cpu)
    per = {n: 1000 * sum(w.cpu[n] for w in windows) / max(requests, 1) for n in names}
    return Cell(
        p50=statistics.median(w.run.p50 for w in windows),
        p99=statistics.median(w.run.p99 for w in windows),
        rps=requests / seconds if seconds else 0.0,
        cpu_ms=sum(per.values()),
        per_process=per,
        client_cores=sum(w.run.cpu for w in windows) / seconds if seconds else 0.0,
        other=statistics.mean(w.other for w in windows),
        errors=sum(w.run.errors for w in windows),
        requests=requests,
        p50s=[w.run.p50 for w in windows],
    )


def ms(s: float, digits: int = 2) -> str:
    return f"{s * 1000:.{digits}f} ms"


def x(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


TITLES = {
    "main": "Floor vs InferBus, side by side (each cell: p50 / p99 / req/s)",
    "targets": "Against issue 16's targets (ratios to the floor in this run)",
    "cpu": "CPU per request by process (ms; whole platform = the sum)",
}


async def measure(cfg: dict[str, Any], targets: dict[str, Target], rep: Report) -> dict[tuple[str, str, int], Cell]:
    for mode in MODES:
        say(f"warm-up, {MODE_LABELS[mode]}: {cfg['warmup']} s at c=16 on each system")
        for name in SYSTEMS:
            await wrk(targets[name].url, targets[name].scripts[mode], 16, cfg["warmup"])
    rep.table("main", ["Mode", "c", *[LABELS[s] for s in SYSTEMS], "InferBus / floor: p50, req/s",
                       "limits / floor: p50, req/s", "CPU ms/request: floor / InferBus / limits"])
    names = {s: list(targets[s].pids) for s in SYSTEMS}
    rep.table("cpu", ["Mode", "c", "System", "Per process (ms/request)", "Whole platform", "wrk (cores)",
                      "other load (cores)"])
    cells: dict[tuple[str, str, int], Cell] = {}
    for mode in MODES:
        for conc in CONCURRENCY:
            rounds, seconds = (cfg["c1_rounds"], cfg["c1_seconds"]) if conc == 1 else (cfg["rounds"], cfg["seconds"])
            say(f"{MODE_LABELS[mode]}, c={conc}: {rounds} round(s) of {seconds} s per system, order rotating")
            got: dict[str, list[Window]] = {s: [] for s in SYSTEMS}
            for r in range(rounds):
                order = SYSTEMS[r % 3:] + SYSTEMS[:r % 3]  # rotated, and reversed every other round:
                order = order[::-1] if r % 2 else order  # each system goes first, and before each other, in turn
                for name in order:
                    w = await window(targets[name], mode, conc, seconds)
                    got[name].append(w)
                    say(f"    round {r + 1} {name:8s} p50 {ms(w.run.p50)}  p99 {ms(w.run.p99)}  "
                        f"{w.run.rps:,.0f}/s  CPU {1000 * sum(w.cpu.values()) / max(w.run.requests, 1):.3f} "
                        f"ms/req  errors {w.run.errors}  other {w.other:.2f} cores")
            for name in SYSTEMS:
                cells[(name, mode, conc)] = cell(got[name])
            f, i, lim = (cells[(s, mode, conc)] for s in SYSTEMS)
            rep.row("main", MODE_LABELS[mode], str(conc),
                    *[f"{ms(c.p50)} / {ms(c.p99)} / {c.rps:,.0f}" + (f" ({c.errors} errors)" if c.errors else "")
                      for c in (f, i, lim)],
                    f"{x(i.p50, f.p50)}, {x(i.rps, f.rps)}", f"{x(lim.p50, f.p50)}, {x(lim.rps, f.rps)}",
                    f"{f.cpu_ms:.3f} / {i.cpu_ms:.3f} / {lim.cpu_ms:.3f}")
            for name in SYSTEMS:
                c = cells[(name, mode, conc)]
                rep.row("cpu", MODE_LABELS[mode], str(conc), LABELS[name],
                        ", ".join(f"{n} {c.per_process[n]:.3f}" for n in names[name]), f"{c.cpu_ms:.3f}",
                        f"{c.client_cores:.2f}", f"{c.other:.2f}")
    return cells


def verdicts(cells: dict[tuple[str, str, int], Cell], rep: Report) -> None:
    rep.table("targets", ["Target", "This run", "Target", "Met?", "Issue 16's \"today\""])

    def row(what: str, value: str, target: str, met: bool | None, today: str) -> None:
        rep.row("targets", what, value, target, "—" if met is None else ("yes" if met else "**no**"), today)

    f1, i1 = cells[("floor", "json", 1)], cells[("inferbus", "json", 1)]
    row("c=1 p50, non-streaming: InferBus / floor", f"{x(i1.p50, f1.p50)} ({ms(i1.p50)} vs {ms(f1.p50)})",
        f"<= {TARGET_C1_P50:g}x", i1.p50 <= TARGET_C1_P50 * f1.p50, "~3.8x (1.02 ms vs 0.27 ms)")
    fs1, is1 = cells[("floor", "stream", 1)], cells[("inferbus", "stream", 1)]
    row("c=1 p50, streaming: InferBus / floor (reference)", f"{x(is1.p50, fs1.p50)} ({ms(is1.p50)} vs "
        f"{ms(fs1.p50)})", "—", None, "—")
    f64, i64, l64 = (cells[(s, "json", 64)] for s in SYSTEMS)
    row("c=64 req/s, non-streaming: InferBus / floor", f"{x(i64.rps, f64.rps)} ({i64.rps:,.0f} vs {f64.rps:,.0f})",
        f">= {TARGET_C64_RPS:g}x", i64.rps >= TARGET_C64_RPS * f64.rps, "~0.18x (3,124-3,542 vs 18,000-21,000)")
    fs64, is64 = cells[("floor", "stream", 64)], cells[("inferbus", "stream", 64)]
    row("c=64 streams/s: InferBus / floor (reference)", f"{x(is64.rps, fs64.rps)} ({is64.rps:,.0f} vs "
        f"{fs64.rps:,.0f})", "—", None, "—")
    s16, fs16 = cells[("inferbus", "stream", 16)], cells[("floor", "stream", 16)]
    if TODAY_STREAMS_C16:
        row("streams/s at c=16 (InferBus, admin key)", f"{s16.rps:,.0f} ({x(s16.rps, TODAY_STREAMS_C16)} of today; "
            f"floor {fs16.rps:,.0f})", f">= {2 * TODAY_STREAMS_C16:,.0f} (2x today)", s16.rps >= 2 * TODAY_STREAMS_C16,
            f"{TODAY_STREAMS_C16:,.0f} (commit {TODAY_REF})")
    else:
        row("streams/s at c=16 (InferBus, admin key)", f"{s16.rps:,.0f} (floor {fs16.rps:,.0f})",
            "2x today's", None, "this run is the first measurement")
    if TODAY_STREAMS_C16_RATIO:
        ratio = s16.rps / fs16.rps if fs16.rps else 0.0
        row("streams/s at c=16, as a ratio to the floor in this run (InferBus / floor)",
            f"{ratio:.2f}x ({s16.rps:,.0f} vs {fs16.rps:,.0f}; {ratio / TODAY_STREAMS_C16_RATIO:.2f}x today's ratio)",
            f">= {2 * TODAY_STREAMS_C16_RATIO:.2f}x (2x today's ratio)", ratio >= 2 * TODAY_STREAMS_C16_RATIO,
            f"{TODAY_STREAMS_C16_RATIO:.2f}x (1,203 vs 2,992, commit {TODAY_REF})")
    for mode in MODES:
        i, lim = cells[("inferbus", mode, 1)], cells[("limits", mode, 1)]
        paired = [b - a for a, b in zip(i.p50s, lim.p50s, strict=True)]
        added = statistics.median(paired)
        row(f"c=1 p50 added by the limits key, {MODE_LABELS[mode]}",
            f"{added * 1000:+.3f} ms (rounds: {', '.join(f'{d * 1000:+.3f}' for d in paired)})",
            f"<= {TARGET_LIMITS_ADDED_MS:g} ms" if mode == "json" else "—",
            added <= TARGET_LIMITS_ADDED_MS / 1000 if mode == "json" else None, "—")
    row("CPU per request, whole platform, c=64, non-streaming (admin key)",
        f"{i64.cpu_ms:.3f} ms (floor {f64.cpu_ms:.3f} ms)", f"<= {TARGET_CPU_MS:g} ms", i64.cpu_ms <= TARGET_CPU_MS,
        "~0.46 ms")
    row("CPU per request, whole platform, c=64, non-streaming (limits key)", f"{l64.cpu_ms:.3f} ms",
        f"<= {TARGET_CPU_MS:g} ms", l64.cpu_ms <= TARGET_CPU_MS, "—")
    row("CPU per stream, whole platform, c=64, streaming (admin key, reference)",
        f"{is64.cpu_ms:.3f} ms (floor {fs64.cpu_ms:.3f} ms)", "—", None, "—")


async def bench(cfg: dict[str, Any], infra: EmbeddedStack, procs: list[ServiceProcess], rep: Report,
                about: list[str], keep_logs: str = "") -> None:
    if not infra.nats.secure:
        raise RuntimeError("the harness's stack must be the secure one (EmbeddedStack(secure=True))")
    wrk_binary()
    code = fingerprint()
    say(f"code under test: {code}")
    floor_server: NatsServer | None = None
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8))
    try:
        platform = await start_inferbus(infra, procs)
        say("starting the floor: its own plain nats-server, the responder and the handler")
        floor_server, floor_base, floor_pids = await start_floor(infra.root, procs)
        key, key_id = await create_limits_key(session, platform.base)
        say(f"created the limits key {key_id} (limits {LIMITS})")
        url = "/v1/chat/completions"
        r = infra.root
        targets = {
            "floor": Target(floor_base + url, {"json": script(r, "floor-json", MODEL, False, "none"),
                                               "stream": script(r, "floor-stream", STREAM_MODEL, True, "none")},
                            floor_pids),
            "inferbus": Target(platform.base + url,
                               {"json": script(r, "admin-json", MODEL, False, ADMIN_KEY),
                                "stream": script(r, "admin-stream", STREAM_MODEL, True, ADMIN_KEY)}, platform.pids),
            "limits": Target(platform.base + url, {"json": script(r, "limits-json", MODEL, False, key),
                                                   "stream": script(r, "limits-stream", STREAM_MODEL, True, key)},
                             platform.pids),
        }
        keys = {"floor": "none", "inferbus": ADMIN_KEY, "limits": key}
        shapes = []
        for name in SYSTEMS:
            for mode, model in (("json", MODEL), ("stream", STREAM_MODEL)):
                got = await check(session, targets[name].url, keys[name], model, mode == "stream")
                want = STREAM_PIECES if mode == "stream" else MAX_TOKENS
                if got["tokens"] != want or (mode == "stream" and got["chunks"] != STREAM_PIECES):
                    raise RuntimeError(f"{name} {mode}: {got['chunks']} content chunks, {got['tokens']} tokens; "
                                       f"expected {STREAM_PIECES if mode == 'stream' else 1} and {want}")
                shapes.append(f"{LABELS[name]} {mode} {got['bytes']} B ({got['chunks']} content chunks)")
        say("responses checked: " + "; ".join(shapes))
        loops = {n: loop_of(p) for n, p in {"floor handler": floor_pids["handler"],
                                             "floor responder": floor_pids["responder"],
                                             "gateway": platform.gateway.pid, "worker": platform.worker.pid}.items()}
        say("event loops: " + ", ".join(f"{k} {v}" for k, v in loops.items()))
        cells = await measure(cfg, targets, rep)
        verdicts(cells, rep)
        for name in SYSTEMS:
            for mode in MODES:
                bad = sum(cells[(name, mode, c)].errors for c in CONCURRENCY)
                if bad:
                    rep.note(f"{LABELS[name]}, {mode}: {bad} wrk errors (non-2xx, timeouts or socket errors)")
        gone = sum(1 for line in platform.gateway.log().splitlines()
                   if '"unhandled_error"' in line and "closing transport" in line)
        if gone:
            rep.note(f"{gone} of the gateway's `unhandled_error` events are writes to a client that had already "
                     "closed its connection (`ClientConnectionResetError: Cannot write to closing transport`, mid-"
                     "stream): wrk closes its connections, requests in flight, at the end of every window. The "
                     "floor handler ignores the same case.")
        rep.note("The limits key's added p50 at c=1 is the median of the per-round differences (limits - admin, "
                 "the two windows of a round back to back), so slow drift of the machine's other load cancels.")
        rep.note("CPU per request counts every process of the system under test, idle ones included (the "
                 "streaming worker during non-streaming windows and the other way round; heartbeats, metrics). "
                 "The floor's nats-server is a plain one (no accounts, no JetStream use); InferBus's is the "
                 "platform's secure one.")
        uv = "installed" if loops["floor handler"] == "uvloop" else "**not installed** in this environment"
        about += [
            f"Code under test: {code}.",
            f"Event loops: {', '.join(f'{k} {v}' for k, v in loops.items())} (uvloop {uv}; the floor uses it "
            "whenever it is importable).",
            "Response sizes (one request each, checked before the load): " + "; ".join(shapes) + ".",
        ]
    finally:
        await session.close()
        if keep_logs:
            copy_logs(procs, Path(keep_logs))
        if floor_server is not None:
            for p in procs:  # the floor's processes first, then its server
                if p.name.startswith("floor-"):
                    p.stop()
            floor_server.stop()


def write_results(rep: Report, cfg: dict[str, Any], quick: bool, outcome: harness.Outcome, note: str,
                  about: list[str], section: str) -> str:
    head = [
        "Systems: **floor** = bench/floor_server.py, a bare aiohttp handler making one nats-py request/reply "
        "(streaming: 32 messages to a reply subject, written as SSE) to a nats-py responder, on a plain "
        "nats-server of its own; **InferBus** = gateway + benchmark-engine worker on the platform's secure bus "
        "(`EmbeddedStack`), admin key, every setting default (the streaming model's worker has "
        f"`engine_options={STREAM_OPTIONS}` so that the engine yields to the loop after each token and the "
        f"worker sends {STREAM_PIECES} Deltas); **limits key** = the same stack with a key that has "
        f"`limits={LIMITS}`.",
        f"Load: wrk, one thread, keep-alive; per system, concurrency and mode {cfg['rounds']} round(s) of "
        f"{cfg['seconds']} s ({cfg['c1_rounds']} of {cfg['c1_seconds']} s at c=1), the order of the systems "
        "rotated and reversed between rounds. p50/p99: wrk's (full response, "
        "streams included), the median over rounds; req/s: requests over all rounds / their seconds. CPU per "
        "request: user+system CPU of every process of the system under test (process trees: PostgreSQL's "
        "backends count) during its windows / the requests they completed. wrk runs **on the same 2 cores**; "
        "its own CPU is in the CPU table.",
        *about,
        *harness.noise(TreeMeter.others, outcome, note),
        f"References: \"today\" for the streams/s target is section `floor-today` (commit {TODAY_REF}, the code "
        "before the work on issue 16); the profiles (py-spy under the same load) are sections `floor-profile-*`, "
        "made by `python bench/profile_hot_path.py --label NAME`.",
    ]
    tables = "\n".join([rep.section("targets"), rep.section("main"), rep.section("cpu")])
    title = "InferBus hot path vs its floor (issue 16)" + ("" if section == "floor" else f" [{section}]")
    text = harness.markdown(title, "bench_floor.py", quick, outcome, head, tables, rep.notes)
    if section != "floor":
        text = text.replace("`python bench/bench_floor.py", f"`python bench/bench_floor.py --section {section}", 1)
    write_section(RESULTS_PATH, section, text)
    return text


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round per window (~80 s)")
    parser.add_argument("--note", default="", help="free text for the section's header (e.g. what else ran)")
    parser.add_argument("--section", default="floor", help="RESULTS.md section to write (default: floor)")
    parser.add_argument("--keep-logs", default="", metavar="DIR", help="copy the services' logs to DIR at the end")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print(f"[bench] wrk is not installed; this benchmark drives the HTTP load with it. Install it with: "
              f"{WRK_INSTALL}", file=sys.stderr)
        return 2
    cfg = QUICK if args.quick else FULL
    rep = Report(TITLES)
    about: list[str] = []
    outcome = harness.run("floor", lambda infra, procs: bench(cfg, infra, procs, rep, about, args.keep_logs),
                          quick=args.quick, machine=machine())
    if outcome is None:
        return 1
    write_results(rep, cfg, args.quick, outcome, args.note, about, args.section)
    harness.report(args.section, rep.titled(), outcome, RESULTS_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
