#!/usr/bin/env python
"""Benchmark the usage ledger: events/s from the JetStream USAGE stream into PostgreSQL.

    python bench/bench_metering.py [--quick]

Starts its own embedded nats-server, PostgreSQL and Redis on free loopback ports, then measures:

  1. backlog: N usage events (200,000; --quick 30,000) are published to USAGE first, then the metering
     service (`python -m services.metering`) is started; the time until all N rows are in PostgreSQL,
     and the commit rate (first to last batch, from the rows' ingest timestamps);
  2. live: with the service running and idle, M more events (100,000; --quick 20,000) are published
     (a) with JetStream acks by one Python publisher, as workers do: the end-to-end rate and how long
     the ledger trails the last publish; (b) as a burst without acks, faster than the service ingests:
     the commit rate while publishing goes on;
  3. correctness of both runs: one row per event, rollup sums equal to the event sums.

Events look like real traffic: 10 tenants x 5 keys, 3 models, stream order = time order (10 minutes of
traffic for the backlog, the present for the live run). Prints "[bench] ..." progress lines and a
table, and writes section `metering` of bench/RESULTS.md (see bench/results.py). Every process it
starts is stopped at the end, on error too. PostgreSQL runs with fsync on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import psutil  # noqa: E402

from bench import harness  # noqa: E402
from bench.bench_spine import CpuMeter, Results, machine, say  # noqa: E402
from bench.results import write_section  # noqa: E402
from contracts import usage  # noqa: E402
from contracts.usage import UsageEvent, event_encoder  # noqa: E402
from services.runtime import bus  # noqa: E402
from services.runtime.local import EmbeddedStack, ServiceProcess, settings_env  # noqa: E402
from services.runtime.usage import ensure_stream  # noqa: E402

RESULTS_PATH = ROOT / "bench" / "RESULTS.md"
TARGET = 20_000  # events/s into PostgreSQL
FULL = {"backlog": 200_000, "live": 100_000}
QUICK = {"backlog": 30_000, "live": 20_000}
MODELS = ("smollm2-135m-instruct", "bench-fast", "whisper-small")
TENANTS = [f"tenant-{i}" for i in range(10)]


class TreeCpuMeter(CpuMeter):
    """CpuMeter counting PostgreSQL with its children (one backend process per connection)."""

    def _ours(self) -> dict[str, float]:
        out = {}
        for name, p in self.procs.items():
            total = 0.0
            with contextlib.suppress(psutil.Error):
                for q in [p, *(p.children(recursive=True) if name == "postgres" else [])]:
                    with contextlib.suppress(psutil.Error):
                        c = q.cpu_times()
                        total += c.user + c.system
            out[name] = total
        return out


def make_events(prefix: str, n: int, start: float, span_s: float, seed: int) -> list[UsageEvent]:
    rng = random.Random(seed)
    events = []
    for i in range(n):
        finished = start + span_s * i / n
        tenant = rng.randrange(len(TENANTS))
        model = MODELS[i % len(MODELS)]
        audio = model.startswith("whisper")
        events.append(
            UsageEvent(
                request_id=f"{prefix}-{i:07d}",
                kind="asr" if audio else "llm",
                model=model,
                version="v1",
                worker_id=f"worker-{i % 4}",
                outcome="ok" if rng.random() > 0.02 else "cancelled",
                started_at=finished - rng.uniform(0.05, 3.0),
                finished_at=finished,
                key_id=f"key-{tenant}-{rng.randrange(5)}",
                tenant_id=TENANTS[tenant],
                prompt_tokens=0 if audio else rng.randrange(5, 2000),
                completion_tokens=0 if audio else rng.randrange(1, 500),
                audio_seconds_in=rng.uniform(1, 30) if audio else 0.0,
                characters_out=rng.randrange(10, 400) if audio else 0,
            )
        )
    return events


def msg_id(e: UsageEvent) -> dict[str, str]:
    return {"Nats-Msg-Id": e.request_id}


async def publish_fast(nc: bus.Connection, events: list[UsageEvent]) -> None:
    """Core-NATS publishes into the stream (no per-message ack): only to fill the backlog quickly."""
    for e in events:
        await nc.publish(usage.subject(e.kind, e.model), event_encoder.encode(e), headers=msg_id(e))
    await nc.flush()


async def publish_acked(nc: bus.Connection, events: list[UsageEvent], window: int = 256) -> None:
    """JetStream publishes, `window` awaiting their acks at once: what the workers' UsagePublisher does."""
    js = nc.jetstream()
    for i in range(0, len(events), window):
        batch = events[i : i + window]
        await asyncio.gather(
            *(js.publish(usage.subject(e.kind, e.model), event_encoder.encode(e), headers=msg_id(e)) for e in batch)
        )


async def wait_stored(nc: bus.Connection, n: int, limit_s: float = 120) -> None:
    """Poll the stream until it holds `n` messages."""
    deadline = time.perf_counter() + limit_s
    js = nc.jetstream()
    while (await js.stream_info(usage.STREAM)).state.messages < n:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"the stream never held {n} messages")
        await asyncio.sleep(0.05)


async def wait_rows(pg: asyncpg.Connection, target: int, proc: ServiceProcess, limit_s: float) -> float:
    """Poll count(*) until the ledger holds `target` rows; the perf_counter time it did."""
    deadline = time.perf_counter() + limit_s
    last = -1
    while True:
        try:
            count = int(await pg.fetchval("SELECT count(*) FROM usage_events"))
        except asyncpg.UndefinedTableError:  # the service has not migrated yet
            count = 0
        if count >= target:
            return time.perf_counter()
        proc.check_alive()
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{count} of {target} rows after {limit_s}s")
        if count // 50_000 != last // 50_000:
            say(f"  {count:,} / {target:,} rows")
        last = count
        await asyncio.sleep(0.25)  # count(*) is not free: poll gently (rates come from commit times)


async def commit_span(pg: asyncpg.Connection, prefix: str) -> tuple[float, int, int]:
    """(seconds between the first and the last commit, rows, rows in the first commit) of one run's events."""
    row = await pg.fetchrow(
        "SELECT extract(epoch FROM max(ingested_at) - min(ingested_at)) AS span, count(*) AS n,"
        " count(*) FILTER (WHERE ingested_at = (SELECT min(ingested_at) FROM usage_events"
        "   WHERE request_id LIKE $1)) AS first"
        " FROM usage_events WHERE request_id LIKE $1",
        prefix + "-%",
    )
    assert row is not None
    return float(row["span"]), int(row["n"]), int(row["first"])


async def check_ledger(pg: asyncpg.Connection, events: list[UsageEvent], prefix: str) -> str:
    """One row per event, and rollups (each granularity) equal to the events' sums."""
    n = await pg.fetchval("SELECT count(*) FROM usage_events WHERE request_id LIKE $1", prefix + "-%")
    if n != len(events):
        raise AssertionError(f"{prefix}: {n} rows for {len(events)} events")
    prompt = sum(e.prompt_tokens for e in events)
    completion = sum(e.completion_tokens for e in events)
    total = await pg.fetch(
        "SELECT granularity, sum(requests) AS requests, sum(prompt_tokens) AS prompt,"
        " sum(completion_tokens) AS completion FROM usage_rollups GROUP BY granularity"
    )
    sums = {r["granularity"]: (r["requests"], r["prompt"], r["completion"]) for r in total}
    events_sums = await pg.fetchrow(
        "SELECT count(*) AS n, sum(prompt_tokens) AS prompt, sum(completion_tokens) AS completion FROM usage_events"
    )
    assert events_sums is not None
    for granularity, got in sums.items():
        if tuple(got) != (events_sums["n"], events_sums["prompt"], events_sums["completion"]):
            raise AssertionError(f"{granularity} rollups {got} != events {tuple(events_sums)}")
    mine = await pg.fetchrow(
        "SELECT sum(prompt_tokens) AS p, sum(completion_tokens) AS c FROM usage_events WHERE request_id LIKE $1",
        prefix + "-%",
    )
    assert mine is not None
    if (mine["p"], mine["c"]) != (prompt, completion):
        raise AssertionError(f"{prefix}: token sums {tuple(mine)} != published {(prompt, completion)}")
    return f"{n:,} rows = {len(events):,} events; minute/hour/day rollups = event sums ({prompt + completion:,} tokens)"


async def metering_stats(nc: bus.Connection) -> dict[str, Any]:
    found = await bus.service_stats(nc, "inferbus-metering", wait=0.3)
    return found[0] if found else {}


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f} events/s" if seconds > 0 else "n/a"


async def bench(cfg: dict[str, int], infra: EmbeddedStack, procs: list[ServiceProcess], res: Results) -> None:
    nc = await bus.connect(infra.nats_url, "bench-metering", identity=infra.identity())
    pg = await asyncpg.connect(infra.database_url)
    try:
        js = nc.jetstream()
        await ensure_stream(js)
        n, m = cfg["backlog"], cfg["live"]

        say(f"1. publishing a backlog of {n:,} usage events (10 minutes of traffic) to {usage.STREAM}")
        backlog = make_events("backlog", n, time.time() - 900, 600, seed=1)
        t0 = time.perf_counter()
        await publish_fast(nc, backlog)
        await wait_stored(nc, n)
        say(f"  stored in {time.perf_counter() - t0:.1f} s")

        say("   starting the metering service")
        env = infra.env(**settings_env())
        started = time.perf_counter()
        proc = ServiceProcess("metering", "services.metering", env, infra.root)
        procs.append(proc)
        pids = {"metering": proc.pid, "nats": infra.nats_pid, "bench (publisher, poller)": os.getpid()}
        assert infra.postgres.proc is not None
        pids["postgres"] = infra.postgres.proc.pid
        with TreeCpuMeter(pids) as cpu:
            done = await wait_rows(pg, n, proc, limit_s=600)
        span, rows, first = await commit_span(pg, "backlog")
        ingest = (rows - first) / span if span > 0 else float("inf")
        stats = await metering_stats(nc)
        res.add("1", f"backlog: {n:,} events, service start to all in PostgreSQL", f"{done - started:.2f} s")
        res.add(
            "1",
            "backlog: ingest rate (first to last commit)",
            f"{ingest:,.0f} events/s",
            f">= {TARGET:,} events/s",
            ingest >= TARGET,
        )
        res.add("1", "backlog: end-to-end incl. service start-up", rate(n, done - started))
        batches = stats.get("batches", 0)
        res.add("1", "backlog: batches (mean size)", f"{batches:,} ({n / batches if batches else 0:,.0f} events)")
        res.note(f"backlog: {cpu.summary()}")
        res.add("3", "backlog: ledger check", await check_ledger(pg, backlog, "backlog"))

        say(f"2a. live: publishing {m:,} events with JetStream acks while the service runs")
        live = make_events("live", m, time.time(), m / TARGET, seed=2)
        with TreeCpuMeter(pids) as cpu:
            t0 = time.perf_counter()
            await publish_acked(nc, live)
            published = time.perf_counter()
            done = await wait_rows(pg, n + m, proc, limit_s=600)
        res.add("2", "live, acked: publish rate (1 Python publisher, window 256)", rate(m, published - t0))
        res.add("2", "live, acked: end-to-end rate (first publish to last row)", rate(m, done - t0))
        res.add("2", "live, acked: ledger behind the last publish by", f"{(done - published) * 1000:,.0f} ms")
        res.note(f"live, acked: {cpu.summary()}")
        res.add("3", "live, acked: ledger check", await check_ledger(pg, live, "live"))

        say(f"2b. live burst: publishing {m:,} events without acks (faster than the service) while it runs")
        burst = make_events("burst", m, time.time(), m / TARGET, seed=3)
        with TreeCpuMeter(pids) as cpu:
            t0 = time.perf_counter()
            await publish_fast(nc, burst)
            published = time.perf_counter()
            done = await wait_rows(pg, n + 2 * m, proc, limit_s=600)
        span, rows, first = await commit_span(pg, "burst")
        burst_rate = (rows - first) / span if span > 0 else float("inf")
        res.add("2", "live burst: publish rate (core NATS, no acks)", rate(m, published - t0))
        res.add(
            "2",
            "live burst: ingest rate (first to last commit)",
            f"{burst_rate:,.0f} events/s",
            f">= {TARGET:,} events/s",
            burst_rate >= TARGET,
        )
        res.add("2", "live burst: end-to-end rate (first publish to last row)", rate(m, done - t0))
        res.note(f"live burst: {cpu.summary()}")
        res.add("3", "live burst: ledger check", await check_ledger(pg, burst, "burst"))
        stats = await metering_stats(nc)
        res.note(
            "metering stats at the end: "
            + ", ".join(f"{k}={stats.get(k)}" for k in ("events_written", "duplicates_skipped", "batches", "pg_errors"))
        )
    finally:
        await pg.close()
        await nc.close()


def write_results(res: Results, quick: bool, outcome: harness.Outcome) -> str:
    others = CpuMeter.others or [0.0]
    load = outcome.load
    about = [
        "Path: JetStream USAGE stream -> metering service (FastStream durable pull consumer, batches of up to "
        "1000, one PostgreSQL statement per batch: events inserted with unnest + ON CONFLICT DO NOTHING, "
        "minute/hour/day rollups upserted from the inserted rows) -> ack after commit. PostgreSQL with fsync on.",
        "Everything (nats-server, PostgreSQL, the metering service and the bench's publisher) shares the same "
        f"cores. Processes outside the bench used {sum(others) / len(others):.2f} cores on average "
        f"(load average {load[0]} at start, {load[1]} at the end).",
    ]
    title = "InferBus metering benchmark (usage ledger ingest)"
    text = harness.markdown(title, "bench_metering.py", quick, outcome, about, res.table(), res.notes)
    write_section(RESULTS_PATH, "metering", text)
    return text


def main() -> int:
    args = harness.arguments(__doc__, "smaller counts (~30 s)")
    cfg = QUICK if args.quick else FULL
    res = Results()
    outcome = harness.run(
        "metering", lambda infra, procs: bench(cfg, infra, procs, res), quick=args.quick, machine=machine()
    )
    if outcome is None:
        return 1
    write_results(res, args.quick, outcome)
    harness.report("metering", res.table(), outcome, RESULTS_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
