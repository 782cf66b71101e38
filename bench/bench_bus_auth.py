#!/usr/bin/env python
"""Benchmark trust on the bus: what NATS authentication and permissions cost, and event-loop lag under shadow load.

    python bench/bench_bus_auth.py [--quick]

Starts its own embedded PostgreSQL and Redis and TWO nats-servers on free loopback ports: the platform's
secure one (accounts, one user per service role, auth callout for API keys) and an open one (no auth, the
old default) that shares the same PostgreSQL and Redis. Each bus gets a gateway and a benchmark-engine LLM
worker; the registry and the alias router join the secure bus for part 3. Then, in one run:

  1. the per-request overhead of auth + permissions: the same HTTP load (POST /v1/chat/completions,
     max_tokens 16, non-streaming, admin key) through the open and the secure stack, in alternating rounds,
     at concurrency 1 and 64: p50, p99 and req/s of every round, and the secure/open ratios;
  2. connect cost: time to an authenticated connection (p50 of interleaved connects) with no auth (open
     server, reference), as a service role (user/password) and with an API key (auth callout answered by
     the gateway); then the NATS-client request path (API key -> CLIENTS account -> gateway edge -> worker)
     against the HTTP path on the same secure stack, at concurrency 1 and 16;
  3. event-loop lag (`inferbus_event_loop_lag_seconds`, sampled every 100 ms in each service) in the gateway
     and the router while ~4,000-character generations flow through both (HTTP to the gateway, plain NATS
     publishers to the router on `infer.llm.<model>`) with a shadow copy of 10 % of them to a second
     version: histogram deltas over each load window only, p99 against a 5 ms target. Windows: idle
     (what the machine alone does to the sampler), paced load without shadow (control), the same with
     shadow 10 %, and a closed loop (as fast as the stack answers) with shadow 10 %.

Prints "[bench] ..." progress lines and tables, and writes section `bus-auth` of bench/RESULTS.md (see
bench/results.py). Every process it starts is stopped at the end, on error too. The load generator shares
the machine's cores with the system under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import re
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import msgspec  # noqa: E402
import nats  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench import fleet, harness  # noqa: E402
from bench.bench_spine import CpuMeter, Http, machine, ms, pct, run_load, side_by_side  # noqa: E402
from bench.fleet import admin, start_worker  # noqa: E402
from bench.harness import Report, say  # noqa: E402
from bench.results import write_section  # noqa: E402
from contracts import subjects  # noqa: E402
from contracts.llm import (  # noqa: E402
    Delta,
    ErrorChunk,
    Final,
    GenerateRequest,
    Message,
    chunk_decoder,
    request_encoder,
)
from services.runtime import bus, metrics, natsauth  # noqa: E402
from services.runtime.local import EmbeddedStack, ServiceProcess, wait_http, wait_service, wait_worker  # noqa: E402
from services.runtime.streaming import StreamClient  # noqa: E402

ADMIN_KEY = "ib-bench-admin-" + secrets.token_hex(16)
FAST_MODEL = "bench-fast"  # benchmark engine, unlimited rate: what differs is the path, not the model
SHADOW_MODEL = "bench-shadow"  # v1 served, v2 its shadow (10 %)
SHADOW_RATE = 10.0  # percent
LONG_TOKENS = 1000  # the benchmark engine emits " tok" (4 characters) per token: 4,000 characters
SHADOW_TOKEN_TEXT = " toc"  # v2's token: same length, different text, so the similarity is a real one
LAG_TARGET_S = 0.005
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30)  # a stuck service fails requests instead of hanging the run
SCRAPE_TIMEOUT = aiohttp.ClientTimeout(total=60)  # /metrics runs on the service's own event loop
# The code part 3 measures; others edit it concurrently, so the report says which version ran.
WATCHED_SOURCES = ("services/runtime/shadow.py", "services/gateway/dispatch.py", "services/router/main.py")
RESULTS_PATH = ROOT / "bench" / "RESULTS.md"

FULL = {
    "c1": 200,  # requests per stack per round
    "c64": 1280,
    "rounds": 10,  # rounds per stack, alternating which stack goes first
    "connects": 50,  # per kind
    "path_c1": 400,  # per way, over path_rounds
    "path_c16": 1600,
    "path_rounds": 2,
    "shadow_s": 40.0,  # load window of each phase of part 3
    "idle_s": 15.0,  # the idle reference window before them
    "http_rps": 12.0,  # paced arrivals, part 3
    "nats_rps": 12.0,
    "closed": 4,  # lanes each way in part 3's closed-loop phase
}
QUICK = {
    "c1": 150,
    "c64": 960,
    "rounds": 2,
    "connects": 20,
    "path_c1": 150,
    "path_c16": 480,
    "path_rounds": 2,
    "shadow_s": 10.0,
    "idle_s": 4.0,
    "http_rps": 12.0,
    "nats_rps": 12.0,
    "closed": 4,
}


# ---- processes ------------------------------------------------------------------------------------


def start_gateway(stack: EmbeddedStack, name: str, procs: list[ServiceProcess]) -> tuple[ServiceProcess, str]:
    return fleet.start_gateway(stack, name, procs, ADMIN_KEY, models=[{"name": FAST_MODEL, "version": "v1"}])


def open_stack(infra: EmbeddedStack) -> EmbeddedStack:
    """A second, open nats-server (no accounts, no auth) sharing the secure stack's PostgreSQL and Redis."""
    stack = EmbeddedStack(infra.root / "open-bus", secure=False)
    stack.nats_url = stack.nats.start()
    stack.database_url, stack.redis_url = infra.database_url, infra.redis_url
    return stack


async def create_key(http: aiohttp.ClientSession, base: str) -> tuple[str, str]:
    async with http.post(
        base + "/v1/admin/keys",
        json={"name": "bench-nats-client", "scopes": ["inference"]},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    ) as resp:
        body = await resp.text()
        if resp.status != 201:
            raise RuntimeError(f"creating a key: HTTP {resp.status}: {body[:300]}")
        data = msgspec.json.decode(body)
    return data["key"], data["info"]["id"]


def non_json(proc: ServiceProcess) -> tuple[int, list[tuple[str, int]]] | None:
    """(count, the 3 most frequent) of a service's output lines that are not JSON log events."""
    counts: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in proc.log().splitlines():
            if not line.strip():
                continue
            try:
                msgspec.json.decode(line)
            except msgspec.DecodeError:
                counts[line.strip()] = counts.get(line.strip(), 0) + 1
    if not counts:
        return None
    # Exception lines ("KeyError: ...") say more than the frames around them: list them first.
    errors = [kv for kv in counts.items() if re.match(r"^[\w.]*(Error|Exception)\b", kv[0])]
    rest = [kv for kv in counts.items() if kv not in errors]
    ranked = sorted(errors, key=lambda kv: -kv[1]) + sorted(rest, key=lambda kv: -kv[1])
    return sum(counts.values()), ranked[:4]


def fingerprint() -> dict[str, str]:
    """Per watched source file: a short hash of its content, and whether it differs from git HEAD."""
    out = {}
    for rel in WATCHED_SOURCES:
        data = (ROOT / rel).read_bytes()
        head = ""
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            head = subprocess.run(["git", "rev-parse", f"HEAD:{rel}"], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's object id of the content
        out[rel] = hashlib.sha256(data).hexdigest()[:10] + (" (as HEAD)" if blob == head else " (edited, not HEAD)")
    return out


# ---- an API-key NATS client, as the README shows it (plain nats-py) -----------------------------------


class KeyClient:
    """Plain nats-py with an API key: one wildcard subscription under the key's inbox prefix serves every stream."""

    def __init__(self, nc: Any, key: str) -> None:
        self.nc = nc
        self.prefix = f"{natsauth.inbox_prefix(key)}.{secrets.token_hex(4)}"
        self.queues: dict[str, asyncio.Queue[Any]] = {}

    @classmethod
    async def connect(cls, url: str, key: str) -> KeyClient:
        nc = await nats.connect(url, token=key, inbox_prefix=natsauth.inbox_prefix(key), name="bench-key-client")
        client = cls(nc, key)
        await nc.subscribe(client.prefix + ".*", cb=client._route)
        await nc.flush()
        return client

    async def _route(self, msg: Any) -> None:
        queue = self.queues.get(msg.subject[len(self.prefix) + 1 :])
        if queue is not None:
            queue.put_nowait(msg)

    async def generate(self, model: str, max_tokens: int) -> tuple[float, int]:
        """One generation on `infer.llm.<model>`: (seconds to the Final chunk, characters of output)."""
        rid = secrets.token_hex(8)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self.queues[rid] = queue
        payload = request_encoder.encode(
            GenerateRequest(request_id=rid, model=model, max_tokens=max_tokens, messages=[Message("user", "hi")])
        )
        t0 = time.perf_counter()
        chars = 0
        try:
            await self.nc.publish(f"infer.llm.{model}", payload, reply=f"{self.prefix}.{rid}")
            while True:
                msg = await asyncio.wait_for(queue.get(), 10)
                chunk = chunk_decoder.decode(msg.data)
                if isinstance(chunk, Delta):
                    chars += len(chunk.text)
                elif isinstance(chunk, Final):
                    return time.perf_counter() - t0, chars
                elif isinstance(chunk, ErrorChunk):
                    raise RuntimeError(f"error chunk: {chunk.code}: {chunk.message}")
        finally:
            del self.queues[rid]

    async def once(self, model: str, max_tokens: int) -> float:
        return (await self.generate(model, max_tokens))[0]


# ---- event-loop lag from a service's /metrics -----------------------------------------------------------


LAG = "inferbus_event_loop_lag_seconds"


async def metrics_urls(
    nc: bus.Connection, service: str, match: Callable[[dict[str, Any]], bool] = lambda _: True, limit_s: float = 10
) -> list[str]:
    """/metrics URLs of the instances of `service` that `match`, asking again until one answers INFO."""
    deadline = time.monotonic() + limit_s
    while True:
        urls = [u for i in await bus.discover(nc, "INFO", service, wait=0.5) if match(i) and (u := metrics.url(i))]
        if urls:
            return urls
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {service} instance with a metrics port answered INFO in {limit_s:.0f} s")


SKIPPED = "inferbus_shadow_similarity_skipped"


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """The lag histogram (cumulative bucket counts le -> count, sum, count) and the skipped-comparisons counter."""
    async with http.get(url, timeout=SCRAPE_TIMEOUT) as resp:
        text = await resp.text()
    out: dict[str, Any] = {"buckets": {}, "sum": 0.0, "count": 0.0, "skipped": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name == SKIPPED:
            out["skipped"] = sum(x.value for x in family.samples if x.name == SKIPPED + "_total")
        if family.name != LAG:
            continue
        for sample in family.samples:
            if sample.name == LAG + "_bucket":
                out["buckets"][float(sample.labels["le"])] = sample.value
            elif sample.name == LAG + "_sum":
                out["sum"] = sample.value
            elif sample.name == LAG + "_count":
                out["count"] = sample.value
    if not out["buckets"]:
        raise RuntimeError(f"{url} has no {LAG} histogram")
    return out


def lag_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What the histogram gained between two scrapes, with p99 estimates and the share above the target."""
    buckets = sorted((le, after["buckets"][le] - before["buckets"].get(le, 0.0)) for le in after["buckets"])
    n = after["count"] - before["count"]
    total = after["sum"] - before["sum"]
    out: dict[str, Any] = {"n": int(n), "mean": total / n if n else float("nan"), "buckets": buckets}
    if not n:
        out.update(p99_bound=float("nan"), p99_lower=float("nan"), p99=float("nan"), over=0,
                   max_bound=float("nan"), max_above=float("nan"))
        return out
    rank = 0.99 * n
    lower, prev = 0.0, 0.0
    for le, cum in buckets:
        if cum >= rank:
            out["p99_bound"] = le  # the bucket holding the 99th percentile: p99 <= this
            out["p99_lower"] = lower
            if math.isinf(le):
                out["p99"] = lower  # Prometheus' histogram_quantile answers the last finite bound here
            else:  # linear inside the bucket, as Prometheus' histogram_quantile does
                out["p99"] = lower + (le - lower) * ((rank - prev) / (cum - prev) if cum > prev else 1.0)
            break
        lower, prev = le, cum
    at_target = dict(buckets).get(LAG_TARGET_S, 0.0)
    out["over"] = int(n - at_target)  # samples later than the 5 ms target
    highest = [le for le, cum in buckets if cum < n]  # the largest sample lies above the last bound not yet full
    out["max_bound"] = next((le for le, cum in buckets if cum >= n), float("inf"))
    out["max_above"] = highest[-1] if highest else 0.0
    return out


# ---- paced load --------------------------------------------------------------------------------------


class Tally:
    """What one load produced: latencies, characters of output, errors (the first three printed)."""

    def __init__(self) -> None:
        self.lat: list[float] = []
        self.chars: list[int] = []
        self.errors: list[str] = []

    async def call(self, fn: Callable[[], Awaitable[tuple[float, int]]]) -> bool:
        """One request; whether it succeeded."""
        try:
            d, c = await fn()
        except Exception as exc:
            self.errors.append(repr(exc))
            if len(self.errors) <= 3:
                say(f"  request failed: {exc!r}")
            return False
        self.lat.append(d)
        self.chars.append(c)
        return True

    def result(self, wall: float, **extra: Any) -> dict[str, Any]:
        return {"lat": self.lat, "chars": self.chars, "errors": self.errors, **extra, "wall": wall}


async def paced(
    fn: Callable[[], Awaitable[tuple[float, int]]], rate: float, seconds: float, cap: int = 64
) -> dict[str, Any]:
    """Start fn `rate` times a second for `seconds` (open loop; at most `cap` in flight) and wait for all."""
    loop = asyncio.get_running_loop()
    tally = Tally()
    skipped = 0
    in_flight: set[asyncio.Task[bool]] = set()
    start = loop.time()
    n = 0
    while (due := start + n / rate) < start + seconds:
        await asyncio.sleep(max(0.0, due - loop.time()))
        n += 1
        if len(in_flight) >= cap:
            skipped += 1
            continue
        task = asyncio.create_task(tally.call(fn))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    await asyncio.gather(*in_flight)
    return tally.result(loop.time() - start, skipped=skipped)


async def idle(seconds: float) -> dict[str, Any]:
    await asyncio.sleep(seconds)
    return Tally().result(seconds)


async def closed(fn: Callable[[], Awaitable[tuple[float, int]]], concurrency: int, seconds: float) -> dict[str, Any]:
    """`concurrency` lanes calling fn back to back for `seconds` (closed loop: as fast as the stack answers)."""
    loop = asyncio.get_running_loop()
    tally = Tally()
    start = loop.time()
    end = start + seconds

    async def lane() -> None:
        while loop.time() < end:
            if not await tally.call(fn):
                await asyncio.sleep(0.05)  # no tight loop of failures

    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return tally.result(loop.time() - start)


# ---- results -------------------------------------------------------------------------------------------


TITLES = {
    "1": "1. Per-request overhead of NATS auth + permissions: open vs secure stack (HTTP, max_tokens=16)",
    "1s": "1. Summary: secure / open",
    "2a": "2a. Connect cost (time until the server accepted the connection)",
    "2b": "2b. NATS-client path (API key -> gateway edge -> worker) vs HTTP, secure stack, max_tokens=16",
    "3": f"3. Event-loop lag with {SHADOW_RATE:.0f} % shadow traffic on ~4,000-character outputs",
}


def sign_test(k: int, n: int) -> float:
    """Two-sided p-value of k successes in n fair coin flips."""
    tail = sum(math.comb(n, i) for i in range(0, min(k, n - k) + 1)) / float(1 << n)
    return min(1.0, 2 * tail)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "—"


def lat_cells(r: dict[str, Any]) -> str:
    return f"{ms(r['p50'])} / {ms(r['p99'])} / {r['rps']:,.0f}"


# ---- 1. open vs secure ---------------------------------------------------------------------------------


async def overhead(
    cfg: dict[str, Any], https: dict[str, Http], pids: dict[str, dict[str, int]], rep: Report
) -> None:
    def way(h: Http) -> Callable[[], Awaitable[float]]:
        body = h.body(FAST_MODEL, 16)
        return lambda: h.once(body)

    ways = {name: way(h) for name, h in https.items()}
    say("1. warm-up, both stacks")
    await side_by_side(ways, 600, 16, 2)
    key, summary = "1", "1s"
    rep.table(key, ["Concurrency", "Round", "open p50 / p99 / req/s", "secure p50 / p99 / req/s",
                    "secure/open p50", "secure/open p99", "secure/open req/s", "other load (cores)"])
    rep.table(summary, ["Concurrency", "secure/open p50: pooled, median of rounds (range)",
                        "secure/open req/s: pooled, median of rounds (range)",
                        "rounds where secure had the higher p50", "Target", "Met?"])
    rounds = cfg["rounds"]
    for conc, n in ((1, cfg["c1"]), (64, cfg["c64"])):
        say(f"1. concurrency {conc}: {n} requests per stack per round, {rounds} rounds, alternating first stack")
        pooled: dict[str, dict[str, Any]] = {name: {"lat": [], "wall": 0.0, "errors": 0} for name in ways}
        ratios: dict[str, list[float]] = {"p50": [], "rps": []}
        for r in range(rounds):
            order = ["open", "secure"] if r % 2 == 0 else ["secure", "open"]
            got: dict[str, dict[str, Any]] = {}
            for name in order:
                meter = CpuMeter(pids[name])
                with meter:
                    lat, wall, errors = await run_load(ways[name], n, conc)
                got[name] = {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "rps": len(lat) / wall, "errors": errors,
                             "other": meter.other / meter.wall if meter.wall else 0.0}
                p = pooled[name]
                p["lat"] += lat
                p["wall"] += wall
                p["errors"] += errors
            o, s = got["open"], got["secure"]
            ratios["p50"].append(s["p50"] / o["p50"])
            ratios["rps"].append(s["rps"] / o["rps"])
            rep.row(key, str(conc), f"{r + 1} ({order[0]} first)", lat_cells(o), lat_cells(s),
                    ratio(s["p50"], o["p50"]), ratio(s["p99"], o["p99"]), ratio(s["rps"], o["rps"]),
                    f"{o['other']:.2f} / {s['other']:.2f}")
        for p in pooled.values():
            p["p50"], p["p99"] = pct(p["lat"], 0.5), pct(p["lat"], 0.99)
            p["rps"] = len(p["lat"]) / p["wall"] if p["wall"] else 0.0
        o, s = pooled["open"], pooled["secure"]
        rep.row(key, f"**{conc}**", "**all rounds pooled**", lat_cells(o), lat_cells(s),
                f"**{ratio(s['p50'], o['p50'])}**", f"**{ratio(s['p99'], o['p99'])}**",
                f"**{ratio(s['rps'], o['rps'])}**", "")
        # Paired by round (the two blocks of a round run back to back, so they share the machine's other load):
        # a difference is measurable when the rounds agree on its sign (two-sided sign test, p < 0.05) and it is
        # more than 5 % -- below that a Python client on a shared 2-core machine cannot tell two servers apart.
        slower = sum(1 for x in ratios["p50"] if x > 1)
        p_value = sign_test(slower, rounds)
        med = statistics.median(ratios["p50"])
        measurable = p_value < 0.05 and abs(med - 1) > 0.05
        rep.row(
            summary, str(conc),
            f"{ratio(s['p50'], o['p50'])}, {med:.2f}x ({min(ratios['p50']):.2f}-{max(ratios['p50']):.2f}x)",
            f"{ratio(s['rps'], o['rps'])}, {statistics.median(ratios['rps']):.2f}x "
            f"({min(ratios['rps']):.2f}-{max(ratios['rps']):.2f}x)",
            f"{slower} of {rounds} (sign test p = {p_value:.2f})",
            "no measurable difference", "yes" if not measurable else "**no**",
        )
        rep.note(
            f"part 1, c={conc}: {len(o['lat'])} + {len(s['lat'])} requests (open + secure), "
            f"{o['errors'] + s['errors']} errors"
        )


# ---- 2. connect cost, NATS-client path -----------------------------------------------------------------


async def connect_cost(
    cfg: dict[str, Any], infra: EmbeddedStack, opened: EmbeddedStack, key: str, rep: Report
) -> None:
    user, password = natsauth.read_credentials(infra.nats.secrets.credentials("worker"))
    kinds: dict[str, tuple[str, dict[str, Any]]] = {
        "no auth (open server, reference)": (opened.nats_url, {}),
        "service role, user/password (`worker`)": (infra.nats_url, {"user": user, "password": password}),
        "API key, auth callout (gateway answers)": (
            infra.nats_url, {"token": key, "inbox_prefix": natsauth.inbox_prefix(key)}
        ),
    }
    n = cfg["connects"]
    say(f"2a. connect cost: {n} connects per kind, interleaved")
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(n + 3):  # the first 3 of each are warm-up
        for label, (url, kw) in kinds.items():
            t0 = time.perf_counter()
            nc = await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5,
                                    name="bench-connect", **kw)
            took = time.perf_counter() - t0
            await nc.close()
            if i >= 3:
                times[label].append(took)
    key2 = "2a"
    rep.table(key2, ["Connection", "p50", "p90", "max", "connects"])
    for label, vals in times.items():
        rep.row(key2, label, ms(pct(vals, 0.5)), ms(pct(vals, 0.9)), ms(max(vals)), str(len(vals)))
    base = pct(times["no auth (open server, reference)"], 0.5)
    role = pct(times["service role, user/password (`worker`)"], 0.5)
    callout = pct(times["API key, auth callout (gateway answers)"], 0.5)
    rep.note(
        f"connect p50 added over no auth: user/password {ms(role - base)}, API key through auth callout "
        f"{ms(callout - base)} (the server asks the gateway, which looks the key up and signs a user JWT)"
    )


async def nats_path(cfg: dict[str, Any], client: KeyClient, http: Http, pids: dict[str, int], rep: Report) -> None:
    body = http.body(FAST_MODEL, 16)
    ways: dict[str, Callable[[], Awaitable[float]]] = {
        "nats": lambda: client.once(FAST_MODEL, 16),
        "http": lambda: http.once(body),
    }
    say("2b. warm-up")
    await side_by_side(ways, 300, 16, 2)
    key = "2b"
    rep.table(key, ["Path", "Concurrency", "p50", "p99", "req/s"])
    for conc, n in ((1, cfg["path_c1"]), (16, cfg["path_c16"])):
        say(f"2b. concurrency {conc}: {n} requests each way, {cfg['path_rounds']} interleaved rounds")
        meter = CpuMeter(pids)
        with meter:
            r = await side_by_side(ways, n, conc, cfg["path_rounds"])
        nt, ht = r["nats"], r["http"]
        rep.row(key, "NATS client, API key (`infer.llm.<model>` -> gateway edge)", str(conc),
                ms(nt["p50"]), ms(nt["p99"]), f"{nt['rps']:,.0f}")
        rep.row(key, "HTTP, admin key (`/v1/chat/completions`)", str(conc),
                ms(ht["p50"]), ms(ht["p99"]), f"{ht['rps']:,.0f}")
        rep.row(key, "**NATS client / HTTP**", str(conc), ratio(nt["p50"], ht["p50"]), ratio(nt["p99"], ht["p99"]),
                ratio(nt["rps"], ht["rps"]))
        rep.note(f"part 2b, c={conc}: {len(nt['lat'])} + {len(ht['lat'])} requests, "
                 f"{nt['errors'] + ht['errors']} errors; {meter.summary()}")


# ---- 3. event-loop lag with shadow traffic -------------------------------------------------------------


async def until_gateway(session: aiohttp.ClientSession, base: str, revision: int) -> None:
    """Wait until the gateway routes the shadow model from `revision` (or later) and sees both workers."""
    await fleet.until_gateway(session, base, ADMIN_KEY, SHADOW_MODEL, revision, workers=2, limit_s=20)


async def set_shadow(nc: bus.Connection, session: aiohttp.ClientSession, base: str, on: bool) -> None:
    """Shadow v2 at SHADOW_RATE, or no shadow; returns once the gateway routes by the new policy."""
    view = await admin(nc, "shadow", model=SHADOW_MODEL, version="v2" if on else None, rate=SHADOW_RATE if on else 0)
    await until_gateway(session, base, int(view["revision"]))
    await asyncio.sleep(0.5)  # the router's KV watch gets the same push; no view of it to poll


async def shadow_lag(
    cfg: dict[str, Any],
    infra: EmbeddedStack,
    nc: bus.Connection,
    procs: list[ServiceProcess],
    gateway: ServiceProcess,
    base: str,
    session: aiohttp.ClientSession,
    rep: Report,
) -> None:
    say("3. starting the registry")
    registry = await fleet.start_registry(infra, nc, procs)
    await fleet.register(nc, SHADOW_MODEL, ("v1", "v2"))
    view = await admin(nc, "shadow", model=SHADOW_MODEL, version="v2", rate=SHADOW_RATE)
    revision = int(view["revision"])
    shadow_policy = {k: v for k, v in view["policy"].items() if "shadow" in k}
    say(f"3. {SHADOW_MODEL}: v1 stable, v2 shadow at {SHADOW_RATE:.0f} % (revision {revision}, {shadow_policy})")
    say("3. starting the router and the v1 and v2 workers")
    router = fleet.start_router(infra, procs)
    v1 = start_worker(infra, "llm-shadow-v1", SHADOW_MODEL, "v1", procs)
    v2 = start_worker(infra, "llm-shadow-v2", SHADOW_MODEL, "v2", procs,
                      engine_options={"token_text": SHADOW_TOKEN_TEXT})
    await wait_service(nc, "inferbus-router", router)
    ids = {"v1": (await wait_worker(nc, SHADOW_MODEL, v1))["worker_id"],
           "v2": (await wait_worker(nc, SHADOW_MODEL, v2))["worker_id"]}
    await until_gateway(session, base, revision)

    http = Http(session, base, ADMIN_KEY)
    body = http.body(SHADOW_MODEL, LONG_TOKENS)

    async def via_gateway() -> tuple[float, int]:
        t0 = time.perf_counter()
        async with http.session.post(http.url, data=body, headers=http.headers, timeout=REQUEST_TIMEOUT) as resp:
            data = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
        took = time.perf_counter() - t0
        return took, len(msgspec.json.decode(data)["choices"][0]["message"]["content"])

    client = StreamClient(nc)
    await client.start()
    alias = subjects.infer("llm", SHADOW_MODEL)

    async def via_router() -> tuple[float, int]:
        t0 = time.perf_counter()
        chars = 0
        final = None
        request = GenerateRequest(request_id="bench-" + secrets.token_hex(8), model=SHADOW_MODEL,
                                  max_tokens=LONG_TOKENS, messages=[Message("user", "hi")])
        async for chunk in client.stream(alias, request, deadline=time.time() + 60):
            if isinstance(chunk, Delta):
                chars += len(chunk.text)
            elif isinstance(chunk, Final):
                final = chunk
        if final is None:
            raise RuntimeError("no Final chunk")
        return time.perf_counter() - t0, chars

    await fleet.until_router_serves(via_router, SHADOW_MODEL)
    say("3. warm-up (2 s, paced)")
    await asyncio.gather(paced(via_gateway, cfg["http_rps"], 2.0), paced(via_router, cfg["nats_rps"], 2.0))
    await asyncio.sleep(1.0)  # the warm-up's comparisons land

    (gw_url,) = await metrics_urls(nc, "inferbus-gateway", lambda i: (i.get("metadata") or {}).get("http") == base)
    router_urls = await metrics_urls(nc, "inferbus-router")
    if len(router_urls) != 1:
        raise RuntimeError(f"expected one router, got {router_urls}")
    urls = {"gateway": gw_url, "router": router_urls[0]}
    pids = {"gateway": gateway.pid, "router": router.pid, "worker-v1": v1.pid, "worker-v2": v2.pid,
            "registry": registry.pid, "nats": infra.nats_pid, "bench": os.getpid()}
    secs = cfg["shadow_s"]
    key = "3"
    rep.table(key, ["Load (HTTP + NATS)", "Service", "its cores", "lag samples", "p99 (histogram bucket)",
                    "p99 (interpolated)", "mean", "samples > 5 ms", "Target", "Met?"])
    Load = Callable[[], Awaitable[dict[str, Any]]]
    idle_s = cfg["idle_s"]
    paced_label = f"paced {cfg['http_rps']:.0f} + {cfg['nats_rps']:.0f} req/s"
    phases: list[tuple[str, bool, Load, Load]] = [
        ("idle (reference)", True, lambda: idle(idle_s), lambda: idle(idle_s)),
        (f"{paced_label}, **no shadow** (control)", False,
         lambda: paced(via_gateway, cfg["http_rps"], secs), lambda: paced(via_router, cfg["nats_rps"], secs)),
        (f"{paced_label}, shadow {SHADOW_RATE:.0f} %", True,
         lambda: paced(via_gateway, cfg["http_rps"], secs), lambda: paced(via_router, cfg["nats_rps"], secs)),
        (f"closed loop {cfg['closed']} + {cfg['closed']} in flight, shadow {SHADOW_RATE:.0f} %", True,
         lambda: closed(via_gateway, cfg["closed"], secs), lambda: closed(via_router, cfg["closed"], secs)),
    ]
    shadow_on = True
    for label, shadowed, http_load, nats_load in phases:
        reference = label.startswith("idle")
        if shadowed != shadow_on:
            say(f"3. shadow {'on' if shadowed else 'off'}")
            await set_shadow(nc, session, base, shadowed)
            shadow_on = shadowed
        before_cmp = (await admin(nc, "comparisons", model=SHADOW_MODEL, limit=1))["count"]
        if reference:
            say(f"3. {label}: {idle_s:.0f} s without requests")
        else:
            say(f"3. {label}: {secs:.0f} s of HTTP to the gateway and NATS to the router (`{alias}`), "
                f"max_tokens={LONG_TOKENS}")
        scrape0 = {name: await scrape(session, url) for name, url in urls.items()}
        meter = CpuMeter(pids)
        with meter:
            h, r = await asyncio.gather(http_load(), nats_load())
        scrape1 = {name: await scrape(session, url) for name, url in urls.items()}
        # What the shadow copies did: the registry's comparison records (comparisons finish after the stream).
        done = len(h["lat"]) + len(r["lat"])
        deadline = time.monotonic() + 10
        last = -1
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            count = (await admin(nc, "comparisons", model=SHADOW_MODEL, limit=1))["count"]
            if count == last:
                break
            last = count
        report = await admin(nc, "comparisons", model=SHADOW_MODEL, limit=1000)
        compared = report["count"] - before_cmp
        records = report["records"][:compared]
        for name in urls:
            d = lag_delta(scrape0[name], scrape1[name])
            met = d["n"] > 0 and d["p99_bound"] <= LAG_TARGET_S
            bucket = f"{d['p99_lower'] * 1000:g}-{d['p99_bound'] * 1000:g} ms"
            over = f"{d['over']} ({d['over'] / d['n']:.1%})" if d["n"] else "—"
            verdict = ("—", "—") if reference or not shadowed else ("p99 <= 5 ms", "yes" if met else "**no**")
            rep.row(key, label, name, f"{meter.cores(name):.2f}", str(d["n"]), bucket, ms(d["p99"]), ms(d["mean"]),
                    over, *verdict)
            nonzero = ", ".join(f"<= {le * 1000:g} ms: {int(c)}" for le, c in d["buckets"] if c and not math.isinf(le))
            skipped = scrape1[name]["skipped"] - scrape0[name]["skipped"]
            rep.note(
                f"{label}, {name}: lag histogram over the window (cumulative) {nonzero}; largest sample in "
                f"({d['max_above'] * 1000:g} ms, {d['max_bound'] * 1000:g} ms]; comparisons published without "
                f"similarity (too many pending): {skipped:.0f}"
            )
        if reference:
            continue
        parts = []
        for way, res in (("HTTP -> gateway", h), ("NATS -> router", r)):
            chars = res["chars"]
            mean_chars = sum(chars) / len(chars) if chars else 0
            parts.append(
                f"{way} {len(res['lat'])} requests in {res['wall']:.1f} s "
                f"({len(res['lat']) / res['wall']:.1f} req/s), "
                f"{len(res['errors'])} errors" + (f", {res['skipped']} not started (64 in flight)"
                                                   if res.get("skipped") else "")
                + f", {mean_chars:,.0f} characters per output, client p50 {ms(pct(res['lat'], 0.5))} "
                f"p99 {ms(pct(res['lat'], 0.99))}"
            )
        by_router = sum(1 for x in records if str(x.get("request_id", "")).startswith("bench-"))
        sims = [x["similarity"] for x in records if x.get("similarity") is not None]
        outs = [x["output_chars"] for x in records] + [x["shadow_output_chars"] for x in records]
        shadow_errors = sum(1 for x in records if x.get("shadow_error") or x.get("error"))
        parts.append(
            f"shadow: {compared} comparisons recorded for {done} requests "
            f"(~{done * SHADOW_RATE / 100 if shadowed else 0:.0f} expected; of the {len(records)} read back, "
            f"{len(records) - by_router} by the gateway and {by_router} by the router), "
            f"{len(sims)} with a similarity" + (f" (mean {sum(sims) / len(sims):.3f})" if sims else "")
            + f", {shadow_errors} with an error, texts of {min(outs, default=0):,}-{max(outs, default=0):,} "
            "characters"
        )
        rep.note(f"{label}: " + "; ".join(parts) + f"; {meter.summary()}")
    stats = await fleet.worker_stats(nc, wait=0.3)
    rep.note(f"v2 (shadow) worker served {stats.get(ids['v2'], {}).get('shadow_served', '?')} shadow copies in "
             f"all, warm-up included; v1 served {stats.get(ids['v1'], {}).get('served', '?')} requests")


# ---- the benchmark ---------------------------------------------------------------------------------------


async def bench(cfg: dict[str, Any], infra: EmbeddedStack, procs: list[ServiceProcess], rep: Report) -> None:
    if not infra.nats.secure:
        raise RuntimeError("the harness's stack must be the secure one (EmbeddedStack(secure=True))")
    sources = fingerprint()
    say("source versions: " + ", ".join(f"{k} {v}" for k, v in sources.items()))
    say("starting an open nats-server (no auth) beside the secure one; both share PostgreSQL and Redis")
    opened = open_stack(infra)
    nc = await bus.connect(infra.nats_url, "bench", identity=infra.identity())
    onc = await bus.connect(opened.nats_url, "bench", identity=opened.identity())
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=160))
    key_client: KeyClient | None = None
    try:
        say("starting a gateway and a benchmark worker on each bus")
        gw_s, base_s = start_gateway(infra, "gateway-secure", procs)
        await wait_http(base_s, gw_s)  # one at a time: both apply the gateway migrations at start
        gw_o, base_o = start_gateway(opened, "gateway-open", procs)
        w_s = start_worker(infra, "llm-fast-secure", FAST_MODEL, "v1", procs)
        w_o = start_worker(opened, "llm-fast-open", FAST_MODEL, "v1", procs)
        await wait_http(base_o, gw_o)
        await wait_worker(nc, FAST_MODEL, w_s)
        await wait_worker(onc, FAST_MODEL, w_o)
        say(f"secure: nats {infra.nats_url} (pid {infra.nats_pid}), gateway {base_s} (pid {gw_s.pid}), "
            f"worker pid {w_s.pid}; open: nats {opened.nats_url} (pid {opened.nats_pid}), gateway {base_o} "
            f"(pid {gw_o.pid}), worker pid {w_o.pid}")
        https = {"open": Http(session, base_o, ADMIN_KEY), "secure": Http(session, base_s, ADMIN_KEY)}
        me = os.getpid()
        pids = {
            "open": {"gateway": gw_o.pid, "worker": w_o.pid, "nats": opened.nats_pid, "bench": me},
            "secure": {"gateway": gw_s.pid, "worker": w_s.pid, "nats": infra.nats_pid, "bench": me},
        }
        await overhead(cfg, https, pids, rep)

        key, key_id = await create_key(session, base_s)
        say(f"2. created API key {key_id} (scopes: inference)")
        await connect_cost(cfg, infra, opened, key, rep)
        say("stopping the open stack")
        for proc in (gw_o, w_o):
            proc.stop()
        await onc.close()
        opened.nats.stop()

        key_client = await KeyClient.connect(infra.nats_url, key)
        await nats_path(cfg, key_client, https["secure"], pids["secure"], rep)
        part3 = fingerprint()  # the router and the part-3 workers import the code as it is now
        await shadow_lag(cfg, infra, nc, procs, gw_s, base_s, session, rep)
        for proc in procs:  # what the harness counts as "(non-JSON line)": say what it is
            odd = non_json(proc)
            if odd:
                rep.note(f"{proc.name} wrote {odd[0]} lines that are not JSON log events; the most frequent: "
                         + "; ".join(f"`{line[:160]}` x{n}" for line, n in odd[1]))
        end = fingerprint()
        versions = []
        for rel in WATCHED_SOURCES:
            seen = [sources[rel], part3[rel], end[rel]]
            if len(set(seen)) == 1:
                versions.append(f"`{rel}` {seen[0]}")
            else:
                versions.append(f"`{rel}` **changed during the run** (other engineers' edits): {seen[0]} when the "
                                f"gateway started, {seen[1]} when the router started, {seen[2]} at the end")
        rep.note("code measured (sha256 prefix of the source file): " + "; ".join(versions))
    finally:
        if key_client is not None:
            await key_client.nc.close()
        await session.close()
        if not onc.is_closed:
            await onc.close()
        await nc.close()
        opened.nats.stop()


def write_results(rep: Report, quick: bool, outcome: harness.Outcome, note: str) -> str:
    about = [
        "Stacks: one embedded PostgreSQL and Redis; two nats-servers: **secure** (the platform's accounts, one "
        "user per service role with least-privilege permissions, auth callout for API keys: "
        "`EmbeddedStack(secure=True)`) and **open** (no auth, `secure=False`); each bus has its own gateway and "
        "benchmark-engine worker (unlimited rate). The registry, the alias router and two more workers join the "
        "secure bus for part 3. The load generator (Python asyncio: aiohttp keep-alive pool for HTTP, plain "
        "nats-py for the API-key client, the gateway's `StreamClient` for the router) runs **on the same 2 "
        "cores**, so every figure includes its CPU contention.",
        *harness.noise(CpuMeter.others, outcome, note),
    ]
    tables = [
        "What the numbers mean:",
        "",
        "- **1** is what authentication and subject permissions cost per request. Both stacks run the same "
        "code; only the nats-server differs. Authentication happens once per connection (at connect); "
        "permissions cost nats-server a subject match against the user's allow/deny lists on each publish "
        "(cached per subject) and on each subscribe, so the target is **no measurable difference per "
        "message**. Each round runs the same number of requests on each stack back to back, alternating which "
        "goes first, so the machine's other load (it is shared) hits both about equally; the per-round ratios "
        "show how much that noise moves the figures.",
        "- **2a** is the one-time price of a connection: nats-server checks a role's password itself, while an "
        "API key goes through auth callout (a request to the gateway, which looks the key up in PostgreSQL and "
        "signs a user JWT). It is paid at connect and reconnect, never per message.",
        "- **2b** compares the two front doors of the same secure stack: an internal client publishing with its "
        "API key on `infer.llm.<model>` (CLIENTS account -> `edge.llm.<model>` service import -> the gateway's "
        "edge -> the worker, chunks streamed back through the import) vs an OpenAI-style HTTP request.",
        f"- **3** is how late each service's event loop ran a 100 ms timer (`{LAG}`, a histogram with bounds "
        "1, 2.5, 5, 10, 25 ms ...), as deltas of the histogram over the load window only. Outputs are "
        f"{LONG_TOKENS} tokens of 4 characters; {SHADOW_RATE:.0f} % of requests are copied to v2, whose output "
        "differs, and the served and shadow texts are compared (LCS similarity) by the gateway (HTTP) or the "
        "router (plain NATS). Windows: idle (no requests: what the shared machine alone does to the sampler), "
        "the paced load with the shadow policy off (control), the same load with shadow on, and a closed loop "
        "(a fixed number of requests in flight, as fast as the stack answers) with shadow on; the target applies "
        "to the shadow windows. The p99 cell is the histogram bucket holding the 99th percentile (so the verdict "
        "against the 5 ms bound is exact); the interpolated figure is what Prometheus' `histogram_quantile` would say. "
        "The idle rows show what the sampler reads with no requests at all (the selector waits in whole "
        "milliseconds, so every sample carries up to ~1 ms of rounding).",
        "",
        f"## {TITLES['1']}",
        "",
        "Each cell: p50 / p99 / req/s. Other load: cores used by processes outside the bench during the open / "
        "secure block of that round.",
        "",
        rep.markdown("1"),
        "Summary, secure / open (the pooled ratio against how much the same stack moved between its own "
        "rounds):",
        "",
        rep.markdown("1s"),
        rep.section("2a"),
        rep.section("2b"),
        rep.section("3"),
    ]
    text = harness.markdown(
        "InferBus bus authentication benchmark", "bench_bus_auth.py", quick, outcome, about,
        "\n".join(tables), rep.notes,
    )
    write_section(RESULTS_PATH, "bus-auth", text)
    return text


def main() -> int:
    args = harness.arguments(__doc__, "smaller counts (~1.5 minutes)", note=True)
    cfg = QUICK if args.quick else FULL
    rep = Report(TITLES)
    outcome = harness.run(
        "bus-auth", lambda infra, procs: bench(cfg, infra, procs, rep), quick=args.quick, machine=machine()
    )
    if outcome is None:
        return 1
    write_results(rep, args.quick, outcome, args.note)
    harness.report("bus-auth", rep.titled(), outcome, RESULTS_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
