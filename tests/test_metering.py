"""The usage ledger end to end: real workers publish usage to JetStream, the metering process writes PostgreSQL.

Each metering process here has a PostgreSQL of its own (so stopping it disturbs nothing else) and a
durable consumer of its own on the shared USAGE stream, so it ingests every event the session's
workers publish; assertions look only at this module's tenants and request ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import random
import secrets
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any, TypeVar
from urllib.parse import urlparse

import asyncpg
import msgspec
import pytest

from contracts import headers as h
from contracts import subjects, usage
from contracts.control import Reply
from contracts.errors import InferBusError
from contracts.llm import Accepted, Delta, Final, GenerateRequest
from contracts.usage import UsageEvent, event_encoder
from services.metering.query import plan
from services.runtime import bus
from services.runtime.embedded import PostgresServer
from services.runtime.local import EmbeddedStack, ServiceProcess, settings_env, wait_worker
from services.runtime.streaming import StreamClient
from tests.conftest import BENCH_MODEL, SLOW_MODEL, SlowWorker, Workers, start_worker

T = TypeVar("T")
ONCE_MODEL = "meter-once"


class AdminFailed(Exception):
    def __init__(self, code: str, message: str, param: str | None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.param = code, param


async def admin_raw(nc: bus.Connection, subject: str, payload: bytes) -> Any:
    msg = await nc.request(subject, payload, timeout=10)
    reply = msgspec.json.decode(msg.data, type=Reply)
    if reply.error is not None:
        raise AdminFailed(reply.error.code, reply.error.message, reply.error.param)
    return reply.result


async def admin(nc: bus.Connection, subject: str, **body: Any) -> Any:
    return await admin_raw(nc, subject, msgspec.json.encode(body))


async def until(probe: Callable[[], Awaitable[T | None]], what: str, limit_s: float = 30) -> T:
    """Poll `probe` until it returns something truthy; fail after `limit_s`."""
    deadline = time.monotonic() + limit_s
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {limit_s}s waiting for {what}")
        await asyncio.sleep(0.05)


def start_metering(infra: EmbeddedStack, database_url: str, durable: str, **settings: Any) -> ServiceProcess:
    env = infra.env(**settings_env(database_url=database_url, durable=durable, **settings))
    return ServiceProcess(f"metering-{durable}", "services.metering", env, infra.root)


async def metering_stats(nc: bus.Connection, proc: ServiceProcess) -> dict[str, Any] | None:
    for data in await bus.service_stats(nc, "inferbus-metering", wait=0.2):
        if data.get("pid") == proc.pid:
            return data
    return None


async def wait_metering(nc: bus.Connection, proc: ServiceProcess, limit_s: float = 60) -> dict[str, Any]:
    async def ready() -> dict[str, Any] | None:
        proc.check_alive()
        return await metering_stats(nc, proc)

    return await until(ready, f"{proc.name} to answer STATS", limit_s)


async def own_postgres(infra: EmbeddedStack, name: str) -> tuple[PostgresServer, str]:
    pg = PostgresServer(infra.root / name)
    url = await asyncio.to_thread(pg.start)
    return pg, url


@contextlib.asynccontextmanager
async def own_ledger(
    infra: EmbeddedStack, nc: bus.Connection, name: str
) -> AsyncIterator[tuple[ServiceProcess, str, asyncpg.Pool, str]]:
    """A metering process with a PostgreSQL and a durable consumer of its own (both named `name`-<tag>), ready:
    (process, database URL, a pool on that database, durable). All of it goes at the end, the consumer too."""
    tag = secrets.token_hex(4)
    pg, url = await own_postgres(infra, f"pg-{name}-{tag}")
    durable = f"{name}-{tag}"
    proc = start_metering(infra, url, durable)
    try:
        await wait_metering(nc, proc)
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        assert pool is not None
        try:
            yield proc, url, pool, durable
        finally:
            await pool.close()
    finally:
        proc.stop()
        await asyncio.to_thread(pg.stop)
        try:
            await nc.jetstream().delete_consumer(usage.STREAM, durable)
        except Exception as exc:  # the consumer's cleanup is best effort; the stream outlives the session
            print(f"could not delete consumer {durable}: {exc!r}")


async def fetch(url: str, sql: str, *args: Any) -> list[asyncpg.Record] | None:
    """Rows from a fresh connection; None while PostgreSQL is unreachable."""
    try:
        conn = await asyncpg.connect(url, timeout=2)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        return None
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def paced(fn: Callable[[int], Awaitable[None]], n: int, per_s: float, concurrency: int = 64) -> None:
    """Start fn(0..n-1) at `per_s` a second (at most `concurrency` at once) and wait for all."""
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(concurrency)
    start = loop.time()
    tasks = []
    for i in range(n):
        ahead = start + i / per_s - loop.time()
        if ahead > 0:
            await asyncio.sleep(ahead)  # the load's shape, not a wait for anything
        await slots.acquire()
        task = asyncio.create_task(fn(i))
        task.add_done_callback(lambda _: slots.release())
        tasks.append(task)
    await asyncio.gather(*tasks)


def event(request_id: str, tenant: str, model: str, **fields: Any) -> UsageEvent:
    now = time.time()
    base: dict[str, Any] = {
        "kind": "llm",
        "version": "v1",
        "worker_id": "test-worker",
        "outcome": "ok",
        "started_at": now - 0.5,
        "finished_at": now,
        "key_id": "key-a",
        "prompt_tokens": 3,
        "completion_tokens": 5,
    }
    return UsageEvent(request_id=request_id, tenant_id=tenant, model=model, **{**base, **fields})


async def publish(nc: bus.Connection, ev: UsageEvent, msg_id: str | None = None) -> Any:
    return await nc.jetstream().publish(
        usage.subject(ev.kind, ev.model), event_encoder.encode(ev), headers={"Nats-Msg-Id": msg_id or ev.request_id}
    )


# ---- exactly once, across a metering SIGKILL and a PostgreSQL outage ---------------------------


async def test_exactly_once_across_metering_kill_and_postgres_outage(
    infra: EmbeddedStack, nc: bus.Connection, workers: Workers
) -> None:
    tag = secrets.token_hex(4)
    pg, url = await own_postgres(infra, f"pg-once-{tag}")
    port = urlparse(url).port
    durable = f"once-{tag}"
    settings = {"ack_wait_s": 2, "max_backoff_s": 1}
    tenants = [f"once-{tag}-{i}" for i in range(3)]
    metering: list[ServiceProcess] = []
    try:
        for i in range(2):
            workers[f"once-{i}"] = start_worker(infra, ONCE_MODEL)
        for proc in list(workers.values()):
            await wait_worker(nc, ONCE_MODEL, proc)
        metering.append(start_metering(infra, url, durable, **settings))
        await wait_metering(nc, metering[0])

        client = StreamClient(nc, first_chunk_timeout=10, idle_timeout=10)
        await client.start()
        subject = subjects.infer("llm", ONCE_MODEL, "v1")
        accepted: set[str] = set()
        finals: dict[str, tuple[int, int]] = {}
        failures: Counter[str] = Counter()

        async def one(i: int) -> None:
            rid = f"once-{tag}-{i:05d}"
            words = " ".join(["w"] * (1 + i % 9))
            request = GenerateRequest(request_id=rid, model=ONCE_MODEL, max_tokens=1 + i % 17, prompt=words)
            hdrs = {h.KEY_ID: f"key-{i % 5}", h.TENANT: tenants[i % 3]}
            try:
                async for chunk in client.stream(subject, request, deadline=time.time() + 60, extra_headers=hdrs):
                    if isinstance(chunk, Accepted):
                        accepted.add(rid)
                    elif isinstance(chunk, Final):
                        finals[rid] = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
            except InferBusError as exc:
                failures[exc.code] += 1

        async def ledger_count() -> int:
            rows = await fetch(url, "SELECT count(*) FROM usage_events WHERE tenant_id = ANY($1)", tenants)
            return int(rows[0][0]) if rows else 0

        n = 4000
        load = asyncio.create_task(paced(one, n, per_s=250))

        # SIGKILL the first metering process with a batch in hand (fetched, not acked), start another.
        await until(lambda: _at_least(ledger_count, 300), "the first metering process to write 300 events")
        js = nc.jetstream()

        async def batch_in_hand() -> bool:
            return (await js.consumer_info(usage.STREAM, durable)).num_ack_pending > 0

        await until(batch_in_hand, "the first metering process to hold unacked events")
        metering[0].kill()
        assert not load.done()
        metering.append(start_metering(infra, url, durable, **settings))
        await wait_metering(nc, metering[1])
        written = await ledger_count()
        await until(lambda: _at_least(ledger_count, written + 100), "the second metering process to write")

        # PostgreSQL down for ~10 s under load: the consumer must not ack, and must carry on afterwards.
        assert not load.done()
        await asyncio.to_thread(pg.stop)
        down_at = time.monotonic()

        async def failing() -> dict[str, Any] | None:
            stats = await metering_stats(nc, metering[1])
            return stats if stats and stats["pg_errors"] >= 2 else None

        await until(failing, "the metering process to see PostgreSQL fail")
        outage_left = 10 - (time.monotonic() - down_at)
        if outage_left > 0:
            await asyncio.sleep(outage_left)  # the outage's length, not a wait for anything
        await asyncio.to_thread(pg.start, port)
        await load
        assert not failures, failures
        assert len(accepted) == n and len(finals) == n

        # Converged: every accepted request has its row, and the consumer has nothing left to ack.

        async def drained() -> bool:
            info = await js.consumer_info(usage.STREAM, durable)
            return await ledger_count() >= len(accepted) and info.num_pending == 0 and info.num_ack_pending == 0

        await until(drained, "the ledger to hold every accepted request", limit_s=120)
        metering[1].check_alive()
        rows = await fetch(
            url,
            "SELECT request_id, prompt_tokens, completion_tokens, outcome, shadow FROM usage_events"
            " WHERE tenant_id = ANY($1)",
            tenants,
        )
        assert rows is not None
        ledger = {r["request_id"]: (r["prompt_tokens"], r["completion_tokens"]) for r in rows}
        assert len(ledger) == len(rows) == len(accepted)
        assert set(ledger) == accepted
        assert all(ledger[rid] == tokens for rid, tokens in finals.items())
        prompt, completion = sum(p for p, _ in finals.values()), sum(c for _, c in finals.values())
        assert sum(p for p, _ in ledger.values()) == prompt
        assert sum(c for _, c in ledger.values()) == completion
        assert {r["outcome"] for r in rows} == {"ok"} and not any(r["shadow"] for r in rows)
        for granularity in ("minute", "hour", "day"):
            sums = await fetch(
                url,
                "SELECT sum(requests), sum(prompt_tokens), sum(completion_tokens) FROM usage_rollups"
                " WHERE granularity = $1 AND tenant_id = ANY($2)",
                granularity,
                tenants,
            )
            assert sums is not None
            assert tuple(sums[0]) == (len(accepted), prompt, completion), granularity
        stats = await metering_stats(nc, metering[1])
        assert stats is not None and stats["pg_errors"] >= 2
    finally:
        for proc in metering:
            proc.stop()
        await asyncio.to_thread(pg.stop)
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_consumer(usage.STREAM, durable)


async def _at_least(probe: Callable[[], Awaitable[int]], n: int) -> bool:
    return await probe() >= n


# ---- one metering process and its PostgreSQL for the rest of the module ------------------------


class Meter:
    def __init__(self, proc: ServiceProcess, url: str, pool: asyncpg.Pool, durable: str) -> None:
        self.proc, self.url, self.pool, self.durable = proc, url, pool, durable

    async def rows(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return list(await self.pool.fetch(sql, *args))

    async def events(self, request_ids: list[str]) -> dict[str, asyncpg.Record]:
        rows = await self.rows("SELECT * FROM usage_events WHERE request_id = ANY($1)", request_ids)
        return {r["request_id"]: r for r in rows}

    async def wait_events(self, request_ids: list[str], limit_s: float = 30) -> dict[str, asyncpg.Record]:
        async def present() -> dict[str, asyncpg.Record] | None:
            found = await self.events(request_ids)
            return found if len(found) == len(set(request_ids)) else None

        return await until(present, f"{len(request_ids)} events in the ledger", limit_s)


@pytest.fixture(scope="module")
async def meter(infra: EmbeddedStack, nc: bus.Connection) -> AsyncIterator[Meter]:
    async with own_ledger(infra, nc, "meter") as (proc, url, pool, durable):
        yield Meter(proc, url, pool, durable)


def tenant() -> str:
    return "t-" + secrets.token_hex(6)


async def test_client_disconnect_is_metered_as_cancelled(
    meter: Meter, nc: bus.Connection, slow_worker: SlowWorker
) -> None:
    client = StreamClient(nc)
    await client.start()
    rid = "gone-" + secrets.token_hex(6)
    request = GenerateRequest(request_id=rid, model=SLOW_MODEL, max_tokens=400, prompt="tell me a story")
    seen = 0
    stream = client.stream(
        subjects.infer("llm", SLOW_MODEL, "v1"), request, extra_headers={h.TENANT: tenant(), h.KEY_ID: "key-gone"}
    )
    deltas = 0
    async for chunk in stream:
        if isinstance(chunk, Delta):
            deltas += 1
            seen += chunk.tokens
            if deltas == 3:
                break
    await stream.aclose()  # the client leaves: StreamClient publishes the cancel
    row = (await meter.wait_events([rid]))[rid]
    assert row["outcome"] == "cancelled"
    assert seen <= row["completion_tokens"] < 400
    assert row["prompt_tokens"] == 4
    assert row["key_id"] == "key-gone" and row["cost_usd"] == 0


async def test_shadow_usage_is_recorded_never_billed_nor_rolled_up(
    meter: Meter, nc: bus.Connection, bench_worker: dict[str, Any]
) -> None:
    await admin(nc, usage.PRICES_SET, model=BENCH_MODEL, version="*", input_per_1m=2.0, output_per_1m=10.0)
    who = tenant()
    client = StreamClient(nc)
    await client.start()
    finals: dict[str, tuple[bool, int, int]] = {}
    for i in range(9):
        shadow = i % 2 == 1
        rid = f"shadow-{who}-{i}"
        req = GenerateRequest(
            request_id=rid, model=BENCH_MODEL, max_tokens=3 + i, prompt="one two three", shadow=shadow
        )
        async for chunk in client.stream(
            subjects.infer("llm", BENCH_MODEL, "v1"), req, extra_headers={h.TENANT: who, h.KEY_ID: "key-s"}
        ):
            if isinstance(chunk, Final):
                finals[rid] = (shadow, chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
    rows = await meter.wait_events(list(finals))
    billed = {rid: f for rid, f in finals.items() if not f[0]}
    shadows = {rid: f for rid, f in finals.items() if f[0]}
    assert len(billed) == 5 and len(shadows) == 4
    for rid, (shadow, prompt, completion) in finals.items():
        assert rows[rid]["shadow"] is shadow
        expected = Decimal(0) if shadow else (Decimal(prompt) * 2 + Decimal(completion) * 10) / 1_000_000
        assert rows[rid]["cost_usd"] == expected and (shadow or expected > 0)
    prompt = sum(f[1] for f in billed.values())
    completion = sum(f[2] for f in billed.values())
    cost = sum((f[1] * 2 + f[2] * 10) / 1e6 for f in billed.values())
    for granularity in ("minute", "hour", "day"):
        sums = await meter.rows(
            "SELECT sum(requests), sum(prompt_tokens), sum(completion_tokens) FROM usage_rollups"
            " WHERE granularity = $1 AND tenant_id = $2",
            granularity,
            who,
        )
        assert tuple(sums[0]) == (5, prompt, completion)

    report = await admin(nc, usage.USAGE_QUERY, tenant_id=who, since=time.time() - 3600, group_by=["model"])
    assert [r["model"] for r in report["rows"]] == [BENCH_MODEL]
    assert not any(r["shadow"] for r in report["rows"])
    totals = report["totals"]
    assert (totals["requests"], totals["prompt_tokens"], totals["completion_tokens"]) == (5, prompt, completion)
    assert totals["cost_usd"] == pytest.approx(cost, rel=1e-9)

    report = await admin(
        nc, usage.USAGE_QUERY, tenant_id=who, since=time.time() - 3600, group_by=["model"], include_shadow=True
    )
    shadow_rows = [r for r in report["rows"] if r["shadow"]]
    assert len(shadow_rows) == 1 and len(report["rows"]) == 2
    assert shadow_rows[0]["requests"] == 4 and shadow_rows[0]["cost_usd"] == 0
    assert shadow_rows[0]["completion_tokens"] == sum(f[2] for f in shadows.values())
    assert report["totals"]["requests"] == 5 and report["totals"]["cost_usd"] == pytest.approx(cost, rel=1e-9)


async def test_duplicate_publishes_make_one_row(meter: Meter, nc: bus.Connection) -> None:
    who = tenant()
    ev = event("dup-" + secrets.token_hex(6), who, "meter-dup", prompt_tokens=7, completion_tokens=11)
    before = await wait_metering(nc, meter.proc)
    first = await publish(nc, ev)
    again = await publish(nc, ev)
    assert again.duplicate and again.seq == first.seq  # JetStream's own dedup window
    bypass = await publish(nc, ev, msg_id=ev.request_id + "-republished")
    assert not bypass.duplicate and bypass.seq > first.seq  # stored twice: the ledger must skip it
    js = nc.jetstream()

    async def acked() -> bool:
        info = await js.consumer_info(usage.STREAM, meter.durable)
        return info.ack_floor.stream_seq >= bypass.seq

    await until(acked, "the metering consumer to ack the re-published event")
    rows = await meter.rows("SELECT prompt_tokens, completion_tokens FROM usage_events WHERE tenant_id = $1", who)
    assert [tuple(r) for r in rows] == [(7, 11)]
    for granularity in ("minute", "hour", "day"):
        sums = await meter.rows(
            "SELECT sum(requests), sum(prompt_tokens), sum(completion_tokens) FROM usage_rollups"
            " WHERE granularity = $1 AND tenant_id = $2",
            granularity,
            who,
        )
        assert tuple(sums[0]) == (1, 7, 11)
    after = await wait_metering(nc, meter.proc)
    assert after["duplicates_skipped"] >= before["duplicates_skipped"] + 1


async def test_prices_apply_at_ingest(meter: Meter, nc: bus.Connection) -> None:
    model, free = "priced-" + secrets.token_hex(4), "free-" + secrets.token_hex(4)
    any_version = await admin(nc, usage.PRICES_SET, model=model, version="*", input_per_1m=1.0, output_per_1m=2.0)
    assert (any_version["input_per_1m"], any_version["output_per_1m"], any_version["currency"]) == (1.0, 2.0, "USD")
    await admin(
        nc,
        usage.PRICES_SET,
        model=model,
        version="v2",
        input_per_1m=10.0,
        output_per_1m=20.0,
        per_audio_second=0.5,
        per_image=0.25,
    )
    who = tenant()
    events = {
        "a": event(f"{who}-a", who, model, prompt_tokens=1000, completion_tokens=500),
        "b": event(
            f"{who}-b", who, model, version="v2", prompt_tokens=100, completion_tokens=100, images=2, audio_seconds_in=3
        ),
        "c": event(f"{who}-c", who, model, outcome="engine_error", prompt_tokens=50, completion_tokens=5),
        "d": event(f"{who}-d", who, model, outcome="cancelled", prompt_tokens=10, completion_tokens=10),
        "e": event(f"{who}-e", who, free, prompt_tokens=10, completion_tokens=10),
    }
    for ev in events.values():
        await publish(nc, ev)
    rows = await meter.wait_events([ev.request_id for ev in events.values()])
    cost = {k: rows[ev.request_id]["cost_usd"] for k, ev in events.items()}
    assert cost == {
        "a": Decimal("0.002"),
        "b": Decimal("2.003"),
        "c": Decimal(0),  # our failure: not billed
        "d": Decimal("0.00003"),  # the client's cancel: billed
        "e": Decimal(0),  # no price
    }

    # A new price applies to new events only: what was ingested keeps its cost.
    await admin(nc, usage.PRICES_SET, model=model, version="*", input_per_1m=100.0, output_per_1m=200.0)
    later = event(f"{who}-f", who, model, prompt_tokens=1000, completion_tokens=0)
    await publish(nc, later)
    assert (await meter.wait_events([later.request_id]))[later.request_id]["cost_usd"] == Decimal("0.1")
    assert (await meter.events([events["a"].request_id]))[events["a"].request_id]["cost_usd"] == Decimal("0.002")

    report = await admin(nc, usage.USAGE_QUERY, tenant_id=who, since=time.time() - 600, group_by=["model"])
    by_model = {r["model"]: r for r in report["rows"]}
    assert set(by_model) == {model, free}
    assert by_model[model]["requests"] == 5 and by_model[model]["failed"] == 1 and by_model[model]["cancelled"] == 1
    assert by_model[model]["images"] == 2 and by_model[model]["audio_seconds_in"] == 3.0
    assert by_model[model]["cost_usd"] == pytest.approx(2.10503, rel=1e-12)
    assert by_model[free]["cost_usd"] == 0 and report["totals"]["requests"] == 6

    listed = await admin(nc, usage.PRICES_LIST, model=model)
    assert [(p["version"], p["input_per_1m"], p["per_image"]) for p in listed] == [
        ("v2", 10.0, 0.25),
        ("*", 100.0, 0.0),
    ]


async def test_batch_lines_carry_their_batch_and_its_discount(meter: Meter, nc: bus.Connection) -> None:
    model, who = "batchy-" + secrets.token_hex(4), tenant()
    price = await admin(
        nc, usage.PRICES_SET, model=model, version="*", input_per_1m=2.0, output_per_1m=10.0, batch_discount=0.25
    )
    assert price["batch_discount"] == 0.25
    await admin(nc, usage.PRICES_SET, model=model, version="v2", input_per_1m=4.0, output_per_1m=20.0)
    lines = [
        event(f"{who}-line-{i}", who, model, batch_id="batch_abc", prompt_tokens=1000, completion_tokens=100)
        for i in range(3)
    ]
    interactive = event(f"{who}-chat", who, model, prompt_tokens=1000, completion_tokens=100)
    own_price = event(
        f"{who}-v2", who, model, version="v2", batch_id="batch_abc", prompt_tokens=1000, completion_tokens=0
    )
    for ev in [*lines, interactive, own_price]:
        await publish(nc, ev)
    # A line's event published again past JetStream's duplicate window: still one row, one cost.
    again = await publish(nc, lines[0], msg_id=lines[0].request_id + "-republished")
    js = nc.jetstream()

    async def acked() -> bool:
        info = await js.consumer_info(usage.STREAM, meter.durable)
        return bool(info.ack_floor.stream_seq >= again.seq)

    await until(acked, "the metering consumer to ack the re-published line")
    rows = await meter.rows("SELECT request_id, batch_id, cost_usd FROM usage_events WHERE tenant_id = $1", who)
    by_id = {r["request_id"]: r for r in rows}
    assert len(rows) == len(by_id) == 5
    full = Decimal("0.003")  # 1000 x $2/1M + 100 x $10/1M
    for ev in lines:
        assert by_id[ev.request_id]["batch_id"] == "batch_abc"
        assert by_id[ev.request_id]["cost_usd"] == full * Decimal("0.75")
    assert by_id[interactive.request_id]["batch_id"] is None and by_id[interactive.request_id]["cost_usd"] == full
    # A version with a price of its own takes that price's discount (none), not the model-wide one.
    assert by_id[own_price.request_id]["cost_usd"] == Decimal("0.004")

    report = await admin(nc, usage.USAGE_QUERY, tenant_id=who, since=time.time() - 600, group_by=["batch"])
    split = {r["batch"]: (r["requests"], r["cost_usd"]) for r in report["rows"]}
    assert split == {False: (1, pytest.approx(0.003)), True: (4, pytest.approx(3 * 0.00225 + 0.004))}
    assert report["totals"]["requests"] == 5
    assert report["totals"]["cost_usd"] == pytest.approx(0.003 + 3 * 0.00225 + 0.004)
    plain = await admin(nc, usage.USAGE_QUERY, tenant_id=who, since=time.time() - 600, group_by=["model"])
    assert [(r["model"], r["batch"], r["requests"]) for r in plain["rows"]] == [(model, None, 5)]


async def test_usage_query_windows_and_groups(meter: Meter, nc: bus.Connection) -> None:
    who, model = tenant(), "windows"
    day = dt.datetime(2021, 3, 4, tzinfo=dt.UTC).timestamp()
    at = {
        1: day + 10 * 3600 + 5 * 60 + 30,  # 10:05:30
        2: day + 10 * 3600 + 59 * 60 + 59,  # 10:59:59
        4: day + 11 * 3600 + 30 * 60,  # 11:30
        8: day + 23 * 3600 + 59 * 60,  # 23:59
        16: day + 86400 + 10 * 60,  # next day 00:10
        32: day + 3 * 86400 + 12 * 3600,  # three days later, noon
    }
    events = [
        event(f"{who}-{p}", who, model, prompt_tokens=p, completion_tokens=0, key_id="k1" if p in (1, 4, 16) else "k2",
              started_at=t - 1, finished_at=t)
        for p, t in at.items()
    ]
    for ev in events:
        await publish(nc, ev)
    await meter.wait_events([ev.request_id for ev in events])

    async def report(**q: Any) -> dict[str, Any]:
        result: dict[str, Any] = await admin(nc, usage.USAGE_QUERY, tenant_id=who, **q)
        return result

    everything = await report(since=day, until=day + 4 * 86400)
    assert len(everything["rows"]) == 1 and everything["totals"]["prompt_tokens"] == 63
    assert everything["rows"][0]["requests"] == 6
    # Ragged edges: 10:30:10 rounds down to 10:30; the minute starting at `until` (00:10) is out.
    edges = await report(since=day + 10 * 3600 + 30 * 60 + 10, until=day + 86400 + 10 * 60)
    assert edges["totals"]["prompt_tokens"] == 2 + 4 + 8
    assert edges["since"] == day + 10 * 3600 + 30 * 60
    by_day = await report(since=day, until=day + 4 * 86400, group_by=["day"])
    assert [(r["day"], r["prompt_tokens"]) for r in by_day["rows"]] == [
        ("2021-03-04", 15),
        ("2021-03-05", 16),
        ("2021-03-07", 32),
    ]
    by_hour = await report(since=day + 10 * 3600 + 6 * 60, until=day + 12 * 3600, group_by=["hour", "key"])
    assert [(r["hour"], r["key_id"], r["prompt_tokens"]) for r in by_hour["rows"]] == [
        ("2021-03-04T10:00:00Z", "k2", 2),
        ("2021-03-04T11:00:00Z", "k1", 4),
    ]
    assert all(r["tenant_id"] is None and r["day"] is None for r in by_hour["rows"])
    one_key = await report(since=day, until=day + 4 * 86400, key_id="k1", group_by=["key", "tenant"])
    assert [(r["key_id"], r["tenant_id"], r["prompt_tokens"]) for r in one_key["rows"]] == [("k1", who, 21)]
    nothing = await report(since=day - 86400, until=day)
    assert nothing["rows"] == [] and nothing["totals"]["requests"] == 0


def test_plan_covers_the_window_exactly_with_aligned_buckets() -> None:
    rng = random.Random(4)
    spans = {"minute": 60, "hour": 3600, "day": 86400}
    for _ in range(2000):
        start = rng.randrange(0, 40 * 86400) // 60 * 60
        end = start + rng.randrange(0, rng.choice([120, 7200, 10 * 86400])) // 60 * 60
        pieces = plan(start, end)
        at = start
        for granularity, lo, hi in pieces:
            assert lo == at and lo < hi
            assert lo % spans[granularity] == 0 and hi % spans[granularity] == 0
            at = hi
        assert at == end or (start == end and not pieces)
        assert len(pieces) <= 5


async def test_bad_input_is_a_typed_error_and_writes_nothing(meter: Meter, nc: bus.Connection) -> None:
    model = "strict-" + secrets.token_hex(4)
    await admin(nc, usage.PRICES_SET, model=model, version="v1", input_per_1m=1.0, output_per_1m=1.0)
    before = await admin(nc, usage.PRICES_LIST)
    count = (await meter.rows("SELECT count(*) FROM prices"))[0][0]
    bad_prices: list[tuple[dict[str, Any], str | None]] = [
        ({"model": model, "version": "v1", "input_per_1m": -1.0}, "input_per_1m"),
        ({"model": model, "version": "v1", "per_image": 1e12}, "per_image"),
        ({"model": "a.b", "version": "v1"}, "model"),
        ({"model": model, "version": "v 1"}, "version"),
        ({"model": model, "version": "v1", "currency": "EUR"}, "currency"),
        ({"model": model, "version": "v1", "discount": 0.5}, None),
        ({"model": model, "version": "v1", "batch_discount": 1.5}, "batch_discount"),
        ({"model": model, "version": "v1", "input_per_1m": "cheap"}, None),
    ]
    for body, param in bad_prices:
        with pytest.raises(AdminFailed) as failure:
            await admin(nc, usage.PRICES_SET, **body)
        assert failure.value.code == "invalid_request" and failure.value.param == param, body
    now = time.time()
    bad_queries: list[tuple[dict[str, Any], str | None]] = [
        ({"since": now - 60, "group_by": ["tenant", "colour"]}, "group_by"),
        ({"since": now - 60, "group_by": ["day", "day"]}, "group_by"),
        ({"since": now, "until": now - 60}, "since"),
        ({"since": -5.0}, "since"),
        ({"group_by": ["day"]}, None),
        ({"since": now - 60, "limit": 3}, None),
    ]
    for body, param in bad_queries:
        with pytest.raises(AdminFailed) as failure:
            await admin(nc, usage.USAGE_QUERY, **body)
        assert failure.value.code == "invalid_request" and failure.value.param == param, body
    for subject in (usage.PRICES_SET, usage.USAGE_QUERY):
        with pytest.raises(AdminFailed) as failure:
            await admin_raw(nc, subject, b"{not json")
        assert failure.value.code == "invalid_request"
    assert await admin(nc, usage.PRICES_LIST) == before
    assert (await meter.rows("SELECT count(*) FROM prices"))[0][0] == count
    meter.proc.check_alive()


CLI = (
    "import argparse, sys\n"
    "from services.cli import usage\n"
    "parser = argparse.ArgumentParser(prog='inferbus')\n"
    "usage.add_parser(parser.add_subparsers(dest='command', required=True))\n"
    "args = parser.parse_args(sys.argv[1:])\n"
    "sys.exit(usage.run(args, parser))\n"
)


async def run_cli(env: dict[str, str], *argv: str) -> tuple[int, str, str]:
    """`inferbus usage ...` (CLI) in a process of its own with `env`: (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLI, *argv, env=env, cwd=os.getcwd(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def cli(infra: EmbeddedStack, *argv: str) -> tuple[int, str, str]:
    return await run_cli({**infra.env(), "INFERBUS_NATS_URL": infra.nats_url}, *argv)


async def test_cli_usage_and_prices(meter: Meter, nc: bus.Connection, infra: EmbeddedStack) -> None:
    who, model = tenant(), "cli-" + secrets.token_hex(4)
    rc, out, err = await cli(
        infra, "prices", "set", model, "*", "--input", "0.5", "--output", "1.5", "--batch-discount", "0.4"
    )
    assert rc == 0, err
    assert model in out and "0.5" in out and "1.5" in out and "40%" in out
    rc, out, err = await cli(infra, "prices", "--json", "list", "--model", model)
    listed = [(p["version"], p["output_per_1m"], p["batch_discount"]) for p in msgspec.json.decode(out)]
    assert rc == 0 and listed == [("*", 1.5, 0.4)]
    rc, out, err = await cli(infra, "prices", "set", model, "*", "--input", "-2")
    assert rc == 1 and "invalid_request" in err and "input_per_1m" in err

    events = [
        event(f"{who}-{i}", who, model, key_id=f"key-{i % 2}", prompt_tokens=1000 * (i + 1), completion_tokens=10)
        for i in range(3)
    ]
    for ev in events:
        await publish(nc, ev)
    await meter.wait_events([ev.request_id for ev in events])
    rc, out, err = await cli(infra, "usage", "--by", "key,model", "--since", "1h", "--tenant", who)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[1].split()[:4] == ["KEY", "MODEL", "REQUESTS", "CANCELLED"]
    assert lines[2].split()[:3] == ["key-0", model, "2"] and "4,000" in lines[2]
    assert lines[3].split()[:3] == ["key-1", model, "1"] and "2,000" in lines[3]
    assert lines[4].split()[:2] == ["TOTAL", "3"] and "6,000" in lines[4]
    rc, out, err = await cli(infra, "usage", "--by", "key", "--since", "1h", "--tenant", who, "--csv")
    assert rc == 0, err
    header, *rows = out.splitlines()
    assert header.startswith("key_id,shadow,requests,cancelled,failed,prompt_tokens,completion_tokens")
    assert [r.split(",")[:6] for r in rows] == [
        ["key-0", "false", "2", "0", "0", "4000"],
        ["key-1", "false", "1", "0", "0", "2000"],
    ]
    rc, out, err = await cli(infra, "usage", "--by", "batch", "--since", "1h", "--tenant", who, "--csv")
    assert rc == 0, err
    header, *rows = out.splitlines()
    assert header.startswith("batch,shadow,requests") and [r.split(",")[:3] for r in rows] == [["false", "false", "3"]]
    rc, out, err = await cli(infra, "usage", "--by", "batch", "--since", "1h", "--tenant", who)
    assert rc == 0 and out.splitlines()[2].split()[:2] == ["interactive", "3"], out
    rc, out, err = await cli(infra, "usage", "--by", "colour", "--since", "1h")
    assert rc == 1 and "group_by" in err
