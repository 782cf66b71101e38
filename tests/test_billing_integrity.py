"""Billing integrity: retries are attempts of their own, odd ids cancel, poison goes aside, usage survives restarts.

The ledger here is a metering process with a PostgreSQL and a durable consumer of its own on the
session's USAGE stream (it ingests every event the session's workers publish; assertions look only at
this module's request ids). The spool test takes JetStream away, so it runs on a platform of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp
import asyncpg
import msgspec
import pytest

from contracts import subjects, usage
from contracts.errors import InferBusError
from contracts.llm import Delta, ErrorChunk, Final, GenerateRequest, chunk_decoder, request_encoder
from contracts.usage import UsageEvent, event_encoder
from services.runtime import bus
from services.runtime.local import SECRETS_ENV, EmbeddedStack, ServiceProcess, settings_env, wait_worker
from services.runtime.streaming import StreamClient
from services.runtime.usage import (
    Spool,
    UsagePublisher,
    UsageSettings,
    ensure_stream,
    pack,
    read_spool,
)
from tests.conftest import SLOW_MODEL, Gateway, SlowWorker, Workers, stack_in_tempdir, start_worker, worker_stats
from tests.test_metering import admin, own_ledger, own_postgres, run_cli, start_metering, until, wait_metering


class Ledger:
    def __init__(self, proc: ServiceProcess, pool: asyncpg.Pool, durable: str) -> None:
        self.proc, self.pool, self.durable = proc, pool, durable

    async def attempts(self, request_id: str, n: int, limit_s: float = 30) -> list[asyncpg.Record]:
        """The request's rows, by attempt, once there are `n` of them."""

        async def present() -> list[asyncpg.Record] | None:
            sql = "SELECT * FROM usage_events WHERE request_id = $1 ORDER BY attempt"
            rows = await self.pool.fetch(sql, request_id)
            return list(rows) if len(rows) >= n else None

        return await until(present, f"{n} attempts of {request_id} in the ledger", limit_s)


@pytest.fixture(scope="module")
async def ledger(infra: EmbeddedStack, nc: bus.Connection) -> AsyncIterator[Ledger]:
    async with own_ledger(infra, nc, "billing") as (proc, _, pool, durable):
        yield Ledger(proc, pool, durable)


# ---- a retry before the first token is an attempt of its own -----------------------------------


async def gateway_sees(gateway: Gateway, model: str, worker_id: str, limit_s: float = 15) -> None:
    async def healthy() -> bool:
        async with aiohttp.ClientSession(headers=gateway.headers) as http:
            async with http.get(f"{gateway.url}/v1/models/{model}") as resp:
                if resp.status != 200:
                    return False
                live = (await resp.json())["inferbus"]["live_workers"]
        return any(w["worker_id"] == worker_id and w["healthy"] for w in live)

    await until(healthy, f"the gateway to route to {worker_id}", limit_s)


async def test_retry_before_first_token_bills_each_attempt(
    gateway: Gateway, nc: bus.Connection, infra: EmbeddedStack, ledger: Ledger, workers: Workers
) -> None:
    await admin(nc, usage.PRICES_SET, model=SLOW_MODEL, version="*", input_per_1m=1.0, output_per_1m=2.0)
    # A is stuck in a long prefill: it sends heartbeats, never a token.
    workers["a"] = start_worker(infra, SLOW_MODEL, engine_options={"tokens_per_s": 20, "prefill_s": 120})
    a = (await wait_worker(nc, SLOW_MODEL, workers["a"]))["worker_id"]
    await gateway_sees(gateway, SLOW_MODEL, a)
    body = {"model": SLOW_MODEL, "max_tokens": 20, "stream": True,
            "messages": [{"role": "user", "content": "count to twenty"}]}
    async with aiohttp.ClientSession(headers=gateway.headers) as http:
        resp = await http.post(gateway.url + "/v1/chat/completions", json=body)  # headers come with A's Accepted
        assert resp.status == 200
        rid = resp.headers["x-request-id"]
        assert (await worker_stats(nc, a))["in_flight"] == 1
        workers["b"] = start_worker(infra, SLOW_MODEL, engine_options={"tokens_per_s": 5})  # 20 tokens: 4 s
        b = (await wait_worker(nc, SLOW_MODEL, workers["b"]))["worker_id"]
        await gateway_sees(gateway, SLOW_MODEL, b)

        # A's host hangs mid-prefill: the gateway's idle timeout fires and it retries on B (no token was sent).
        os.kill(workers["a"].pid, signal.SIGSTOP)
        try:
            await until(lambda: _busy(nc, b), "the gateway to retry on B", limit_s=15)
        finally:
            os.kill(workers["a"].pid, signal.SIGCONT)
        # A comes back, hears the cancel the gateway sent for its attempt and publishes that attempt's
        # usage while B is still generating: the failed attempt's event reaches the ledger first.
        first = (await ledger.attempts(rid, 1))[0]
        assert (first["attempt"], first["worker_id"], first["outcome"]) == (0, a, "cancelled")
        assert (await worker_stats(nc, b))["in_flight"] == 1

        text = ""
        async for line in resp.content:
            if line.startswith(b"data: {"):
                chunk = msgspec.json.decode(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    text += chunk["choices"][0]["delta"]["content"]
        assert text == " tok" * 20

    zero, one = await ledger.attempts(rid, 2)
    assert (zero["prompt_tokens"], zero["completion_tokens"], zero["cost_usd"]) == (3, 0, Decimal(3) / 1_000_000)
    assert (one["attempt"], one["worker_id"], one["outcome"]) == (1, b, "ok")
    assert (one["prompt_tokens"], one["completion_tokens"]) == (3, 20)
    assert one["cost_usd"] == (Decimal(3) + Decimal(40)) / 1_000_000
    # By request: the final outcome, every attempt's tokens and cost.
    request = await ledger.pool.fetchrow("SELECT * FROM usage_requests WHERE request_id = $1", rid)
    assert request is not None
    assert (request["final_attempt"], request["attempts"], request["outcome"], request["worker_id"]) == (1, 2, "ok", b)
    assert (request["prompt_tokens"], request["completion_tokens"]) == (6, 20)
    assert request["cost_usd"] == zero["cost_usd"] + one["cost_usd"]
    # The rollups count every billed attempt: they equal the events of this key and model, minute by minute.
    sums = await ledger.pool.fetch(
        "SELECT (SELECT array_agg(ARRAY[extract(epoch FROM bucket), requests, cancelled, prompt_tokens,"
        "          completion_tokens, cost_usd]::numeric[] ORDER BY bucket)"
        "        FROM usage_rollups WHERE granularity = 'minute' AND key_id = coalesce($1, '') AND model = $2),"
        "       (SELECT array_agg(ARRAY[extract(epoch FROM bucket), n, c, p, q, s]::numeric[] ORDER BY bucket) FROM ("
        "         SELECT date_bin('1 minute', finished_at, TIMESTAMPTZ 'epoch') AS bucket, count(*) AS n,"
        "           count(*) FILTER (WHERE outcome = 'cancelled') AS c, sum(prompt_tokens) AS p,"
        "           sum(completion_tokens) AS q, sum(cost_usd) AS s FROM usage_events"
        "         WHERE coalesce(key_id, '') = coalesce($1, '') AND model = $2 AND NOT shadow GROUP BY 1) AS e)",
        one["key_id"], SLOW_MODEL,
    )
    rolled, events = sums[0][0], sums[0][1]
    assert rolled == events and len(rolled) >= 1


async def _busy(nc: bus.Connection, worker_id: str) -> bool:
    return bool((await worker_stats(nc, worker_id))["in_flight"])


# ---- cancel with ids that are not subject tokens -----------------------------------------------


async def test_cancel_reaches_requests_with_odd_ids(nc: bus.Connection, slow_worker: SlowWorker) -> None:
    _, stats = slow_worker
    worker = stats["worker_id"]
    subject = subjects.infer("llm", SLOW_MODEL, "v1", worker)
    tag = secrets.token_hex(3)
    odd = [f"a.{tag}", f"b*{tag}", f"c>{tag}", f"d {tag} x", f" e.*> {tag}.x "]
    twin = f"odd-{tag}"  # a plain id that must not be cancelled with them
    inboxes: dict[str, Any] = {}
    for rid in [*odd, twin]:
        inboxes[rid] = await nc.subscribe(nc.new_inbox())
        tokens = 400 if rid in odd else 30
        request = GenerateRequest(request_id=rid, model=SLOW_MODEL, max_tokens=tokens, prompt="go")
        await nc.publish(subject, request_encoder.encode(request), reply=inboxes[rid].subject)
    for rid in odd:
        await _until_chunk(inboxes[rid], Delta)
    busy = await worker_stats(nc, worker)
    assert busy["in_flight"] == len(odd) + 1
    for rid in odd:
        await nc.publish(subjects.cancel(rid), b"")
    for rid in odd:
        end = await _until_chunk(inboxes[rid], ErrorChunk, Final)
        assert isinstance(end, ErrorChunk) and end.code == "cancelled", (rid, end)
    final = await _until_chunk(inboxes[twin], ErrorChunk, Final, limit_s=10)
    assert isinstance(final, Final) and final.usage.completion_tokens == 30

    async def idle() -> dict[str, Any] | None:
        now = await worker_stats(nc, worker)
        return now if now["in_flight"] == 0 else None

    freed = await until(idle, "the worker's slots to be free")
    assert freed["cancelled"] == busy["cancelled"] + len(odd)
    for sub in inboxes.values():
        await sub.unsubscribe()


async def _until_chunk(sub: Any, *kinds: type, limit_s: float = 5) -> Any:
    deadline = time.monotonic() + limit_s
    while True:
        msg = await sub.next_msg(timeout=max(deadline - time.monotonic(), 0.01))
        chunk = chunk_decoder.decode(msg.data)
        if isinstance(chunk, kinds):
            return chunk


# ---- poison events go to the dead letters, never holding up the good ones ----------------------


async def cli(infra: EmbeddedStack, *argv: str) -> tuple[int, str, str]:
    """The usage CLI as the operator runs it: its own process, the admin role's NATS identity."""
    env = {k: v for k, v in infra.env().items() if k != SECRETS_ENV}
    credentials = infra.identity("admin").credentials
    if credentials:
        env["INFERBUS_NATS_CREDENTIALS"] = credentials
    return await run_cli(env, *argv)


def good_event(rid: str, model: str, i: int) -> UsageEvent:
    now = time.time()
    return UsageEvent(
        request_id=rid, kind="llm", model=model, version="v1", worker_id="w-poison", outcome="ok",
        started_at=now - 1, finished_at=now, tenant_id="t-poison", key_id="k-poison",
        prompt_tokens=10 + i, completion_tokens=i,
    )


async def test_poison_events_are_dead_lettered_and_good_ones_land_once(
    ledger: Ledger, nc: bus.Connection, infra: EmbeddedStack
) -> None:
    model = "poison-" + secrets.token_hex(4)
    js = nc.jetstream()
    subject = usage.subject("llm", model)
    good = [good_event(f"{model}-good-{i}", model, i) for i in range(40)]
    poison: dict[str, bytes] = {  # request id (what a dead letter is known by) -> the message
        f"{model}-nan": event_encoder.encode(msgspec.structs.replace(good[0], request_id=f"{model}-nan",
                                                                     finished_at=math.nan)),
        f"{model}-inf-audio": event_encoder.encode(msgspec.structs.replace(good[0], request_id=f"{model}-inf-audio",
                                                                           audio_seconds_in=math.inf)),
        f"{model}-negative": event_encoder.encode(msgspec.structs.replace(good[0], request_id=f"{model}-negative",
                                                                          completion_tokens=-5)),
        f"{model}-huge": event_encoder.encode(msgspec.structs.replace(good[0], request_id=f"{model}-huge",
                                                                      prompt_tokens=2**62)),
        f"{model}-nul\x00": event_encoder.encode(msgspec.structs.replace(good[0], request_id=f"{model}-nul\x00")),
        "": b"\xc1 not msgpack at all",
    }
    reasons = {f"{model}-nan": "invalid", f"{model}-inf-audio": "invalid", f"{model}-negative": "invalid",
               f"{model}-huge": "invalid", f"{model}-nul\x00": "refused", "": "undecodable"}
    shown = {rid.replace("\x00", "?"): rid for rid in poison}  # as a dead letter's header shows it
    before = await wait_metering(nc, ledger.proc)
    bad = iter(poison.items())
    for i, ev in enumerate(good):  # one burst: good and poison messages share the consumer's batches
        await js.publish(subject, event_encoder.encode(ev), headers={"Nats-Msg-Id": usage.msg_id(ev)})
        if i % 7 == 3 and (item := next(bad, None)) is not None:
            await js.publish(subject, item[1], headers={"Nats-Msg-Id": f"poison-{model}-{i}"})
    assert next(bad, None) is None

    async def all_good() -> list[asyncpg.Record] | None:
        rows = await ledger.pool.fetch("SELECT request_id, prompt_tokens FROM usage_events WHERE model = $1", model)
        return list(rows) if len(rows) >= len(good) else None

    rows = await until(all_good, "every good event in the ledger")
    assert sorted((r["request_id"], r["prompt_tokens"]) for r in rows) == sorted(
        (e.request_id, e.prompt_tokens) for e in good
    )
    rollup = await ledger.pool.fetchrow(
        "SELECT sum(requests) AS n, sum(prompt_tokens) AS p FROM usage_rollups"
        " WHERE granularity = 'day' AND model = $1",
        model,
    )
    assert rollup is not None and (rollup["n"], rollup["p"]) == (len(good), sum(e.prompt_tokens for e in good))

    async def dead_lettered() -> list[dict[str, Any]] | None:
        rc, out, err = await cli(infra, "usage", "dead-letters", "--json", "--limit", "1000")
        assert rc == 0, err
        mine = [d for d in msgspec.json.decode(out)["letters"]
                if d["consumer"] == ledger.durable and d["subject"] == subject]
        return mine if len(mine) >= len(poison) else None

    letters = await until(dead_lettered, "the poison messages in the dead-letter stream")
    assert len(letters) == len(poison)
    assert sorted((d.get("request_id") or "", d["reason"]) for d in letters) == sorted(
        (rid, reasons[shown[rid]]) for rid in shown
    )
    for d in letters:
        assert d["time"] and d["stream_seq"] > 0 and d["detail"]
    nan = next(d for d in letters if d.get("request_id") == f"{model}-nan")
    assert "finished_at" in nan["detail"]
    for d in letters:  # each one kept as it was, under usage_dlq
        kept = await js.get_msg(usage.DLQ_STREAM, d["seq"])
        assert kept.subject == usage.dlq_subject(subject)
        assert kept.data == poison[shown[d.get("request_id") or ""]]
    rc, out, err = await cli(infra, "usage", "dead-letters", "--limit", "1000")
    assert rc == 0, err
    assert "REASON" in out.splitlines()[1] and f"{model}-negative" in out and "undecodable" in out
    after = await wait_metering(nc, ledger.proc)
    assert after["dead_lettered"] >= before["dead_lettered"] + len(poison)
    assert (await js.consumer_info(usage.STREAM, ledger.durable)).config.max_deliver == 20

    async def settled() -> bool:  # nothing held back: every message was acked or terminated
        return (await js.consumer_info(usage.STREAM, ledger.durable)).num_ack_pending == 0

    await until(settled, "the consumer to have nothing unacknowledged")


async def test_a_bad_event_in_a_workers_batch_goes_aside_alone(
    ledger: Ledger, nc: bus.Connection, infra: EmbeddedStack
) -> None:
    """A message of several events (what a worker sends under load) with events the ledger cannot take: those
    events alone go to the dead letters, each as a message of its own; the rest are written, exactly once even
    when the whole message arrives a second time under another id."""
    model = "batchpoison-" + secrets.token_hex(4)
    js = nc.jetstream()
    subject = usage.subject("llm", model)
    good = [good_event(f"{model}-good-{i}", model, i) for i in range(20)]
    bad = {
        3: (event_encoder.encode(msgspec.structs.replace(good[0], request_id=f"{model}-nan", finished_at=math.nan)),
            "invalid", f"{model}-nan"),
        9: (event_encoder.encode(msgspec.structs.replace(good[0], request_id=f"{model}-nul\x00")), "refused",
            f"{model}-nul?"),
        15: (msgspec.msgpack.encode(5), "invalid", None),  # valid msgpack, not an event
    }
    parts = [event_encoder.encode(e) for e in good]
    for index, (data, _, _) in sorted(bad.items()):
        parts.insert(index, data)
    payload = usage.msgpack_array(parts)
    assert usage.parts(payload) == parts
    first = await js.publish(subject, payload, headers={"Nats-Msg-Id": usage.batch_msg_id(good)})
    again = await js.publish(subject, payload, headers={"Nats-Msg-Id": usage.batch_msg_id(good) + "-again"})
    nested, empty = b"\x91" * 5000 + b"\x00", usage.msgpack_array([])  # no events at all: moved whole
    for data in (nested, empty):
        with pytest.raises(msgspec.DecodeError):
            usage.parts(data)
        await js.publish(subject, data, headers={"Nats-Msg-Id": f"{model}-{len(data)}"})

    async def all_good() -> list[asyncpg.Record] | None:
        rows = await ledger.pool.fetch("SELECT request_id, prompt_tokens FROM usage_events WHERE model = $1", model)
        return list(rows) if len(rows) >= len(good) else None

    async def dead_lettered() -> list[dict[str, Any]] | None:
        rc, out, err = await cli(infra, "usage", "dead-letters", "--json", "--limit", "1000")
        assert rc == 0, err
        mine = [d for d in msgspec.json.decode(out)["letters"]
                if d["consumer"] == ledger.durable and d["subject"] == subject]
        return mine if len(mine) >= 2 * len(bad) + 2 else None

    letters = await until(dead_lettered, "the bad events of both messages in the dead-letter stream")
    rows = await until(all_good, "every good event in the ledger")
    assert sorted((r["request_id"], r["prompt_tokens"]) for r in rows) == sorted(
        (e.request_id, e.prompt_tokens) for e in good
    )
    rollup = await ledger.pool.fetchrow(  # the second copy of the message counted nothing twice
        "SELECT sum(requests) AS n, sum(prompt_tokens) AS p FROM usage_rollups"
        " WHERE granularity = 'day' AND model = $1",
        model,
    )
    assert rollup is not None and (rollup["n"], rollup["p"]) == (len(good), sum(e.prompt_tokens for e in good))
    assert len(letters) == 2 * len(bad) + 2
    whole = [d for d in letters if d.get("part") is None]
    assert sorted((d["reason"], d["size"]) for d in whole) == [("undecodable", len(empty)),
                                                                 ("undecodable", len(nested))]
    letters = [d for d in letters if d.get("part") is not None]
    assert {d["stream_seq"] for d in letters} == {first.seq, again.seq}
    for d in letters:
        data, reason, rid = bad[d["part"]]
        assert (d["reason"], d.get("request_id")) == (reason, rid), d
        assert d["detail"].startswith(f"event {d['part'] + 1} of {len(parts)} in the message")
        kept = await js.get_msg(usage.DLQ_STREAM, d["seq"])
        assert kept.data == data and kept.subject == usage.dlq_subject(subject)

    async def settled() -> bool:  # both messages acked once their events were written or moved
        return (await js.consumer_info(usage.STREAM, ledger.durable)).num_ack_pending == 0

    await until(settled, "the consumer to have nothing unacknowledged")


async def test_a_batch_whose_bad_event_cannot_be_moved_still_writes_its_good_ones(
    ledger: Ledger, nc: bus.Connection
) -> None:
    """The dead-letter stream takes no writes (its subjects moved away for a while): a worker's message with one bad
    event has its good events written at once and comes back unacked until the bad one can be moved; then it is
    acked, and the redeliveries counted nothing twice."""
    model = "dlqdown-" + secrets.token_hex(4)
    js = nc.jetstream()
    subject = usage.subject("llm", model)
    good = [good_event(f"{model}-good-{i}", model, i) for i in range(10)]
    bad = event_encoder.encode(msgspec.structs.replace(good[0], request_id=f"{model}-nan", finished_at=math.nan))
    config = (await js.stream_info(usage.DLQ_STREAM)).config
    await js.update_stream(dataclasses.replace(config, subjects=[f"usage_dlq_paused_{model}.>"]))
    try:
        with pytest.raises(bus.js_errors.NoStreamResponseError):  # no stream takes a dead letter: a move fails
            await js.publish(usage.dlq_subject(subject), b"refused")
        held = (await js.stream_info(usage.DLQ_STREAM)).state.messages
        before = (await js.consumer_info(usage.STREAM, ledger.durable)).num_redelivered
        await js.publish(subject, usage.msgpack_array([*map(event_encoder.encode, good), bad]),
                         headers={"Nats-Msg-Id": usage.batch_msg_id(good)})

        async def all_good() -> list[asyncpg.Record] | None:
            rows = await ledger.pool.fetch("SELECT request_id FROM usage_events WHERE model = $1", model)
            return list(rows) if len(rows) >= len(good) else None

        await until(all_good, "the good events in the ledger while the dead letters refuse writes")

        async def came_back() -> bool:  # not acked: JetStream delivers it again
            return (await js.consumer_info(usage.STREAM, ledger.durable)).num_redelivered > before

        await until(came_back, "the message delivered again")
        assert (await js.stream_info(usage.DLQ_STREAM)).state.messages == held  # nothing moved meanwhile
    finally:
        await js.update_stream(config)

    async def moved() -> bool:
        info = await js.consumer_info(usage.STREAM, ledger.durable)
        return info.num_ack_pending == 0 and (await js.stream_info(usage.DLQ_STREAM)).state.messages > held

    await until(moved, "the bad event moved and the message acked", 60)
    last = await js.get_last_msg(usage.DLQ_STREAM, usage.dlq_subject(subject))
    assert last.data == bad and (last.headers or {}).get("Inferbus-Dlq-Part") == str(len(good))
    rollup = await ledger.pool.fetchrow(
        "SELECT sum(requests) AS n, sum(prompt_tokens) AS p FROM usage_rollups"
        " WHERE granularity = 'day' AND model = $1",
        model,
    )
    assert rollup is not None and (rollup["n"], rollup["p"]) == (len(good), sum(e.prompt_tokens for e in good))


# ---- usage events survive a JetStream outage and a worker crash --------------------------------


SPOOL_MODEL = "spool-bench"


@pytest.fixture(scope="module")
def platform() -> Iterator[EmbeddedStack]:
    """A platform of its own: this module takes its JetStream away."""
    with stack_in_tempdir("inferbus-billing-") as stack:
        yield stack


def spool_worker(stack: EmbeddedStack, spool: Path, **settings: Any) -> ServiceProcess:
    env = stack.env(**settings_env(
        model=SPOOL_MODEL, version="v1", engine="benchmark", usage_spool_dir=str(spool), **settings,
    ))
    return ServiceProcess(f"llm-{SPOOL_MODEL}", "services.llm", env, stack.root)


async def test_usage_survives_jetstream_outage_and_worker_kill(platform: EmbeddedStack, workers: Workers) -> None:
    spool = platform.root / f"spool-{secrets.token_hex(3)}"
    conn = await bus.connect(platform.nats_url, "tests", identity=platform.identity())
    try:
        js = conn.jetstream()
        workers["w1"] = spool_worker(platform, spool, usage_max_pending=5)
        w1 = (await wait_worker(conn, SPOOL_MODEL, workers["w1"]))["worker_id"]
        await js.delete_stream(usage.STREAM)  # JetStream can no longer take usage events
        client = StreamClient(conn)
        await client.start()
        subject = subjects.infer("llm", SPOOL_MODEL, "v1", w1)
        served: dict[str, int] = {}
        tag = secrets.token_hex(4)
        for i in range(5):
            rid = f"spool-{tag}-{i}"
            request = GenerateRequest(request_id=rid, model=SPOOL_MODEL, max_tokens=3 + i, prompt="a b c d")
            async for chunk in client.stream(subject, request):
                if isinstance(chunk, Final):
                    served[rid] = chunk.usage.completion_tokens
        assert len(served) == 5

        async def backlog() -> bool:
            return (await worker_stats(conn, w1))["usage_unacked"] == 5

        await until(backlog, "five usage events waiting for JetStream")
        # Full: the worker admits nothing more, with an error that says why (and retries elsewhere).
        refused = GenerateRequest(request_id=f"spool-{tag}-refused", model=SPOOL_MODEL, max_tokens=3, prompt="x")
        with pytest.raises(InferBusError) as failure:
            async for _ in client.stream(subject, refused):
                pass
        assert failure.value.code == "overloaded" and "usage ledger" in failure.value.message
        # Its event (no tokens) is kept too: nothing is dropped, the bound only stops admission.
        expected = {**{rid: ("ok", tokens) for rid, tokens in served.items()}, refused.request_id: ("overloaded", 0)}

        async def spooled() -> bool:
            return sorted(e.request_id for f in spool.glob("*.spool") for e in read_spool(f)[0]) == sorted(expected)

        await until(spooled, "every event in the spool file")

        workers["w1"].kill()  # SIGKILL with the events unpublished
        w1_files = {f.name for f in spool.glob("*.spool")}
        workers["w2"] = spool_worker(platform, spool)  # recreates USAGE, adopts w1's spool
        w2 = (await wait_worker(conn, SPOOL_MODEL, workers["w2"]))["worker_id"]
        database = platform.database_url
        meter = start_metering(platform, database, f"spool-{tag}")
        workers["meter"] = meter
        await wait_metering(conn, meter)

        async def landed() -> list[asyncpg.Record] | None:
            db = await asyncpg.connect(database)
            try:
                rows = await db.fetch(
                    "SELECT request_id, outcome, completion_tokens FROM usage_events WHERE request_id = ANY($1)",
                    list(expected),
                )
                day = await db.fetchval(
                    "SELECT sum(requests) FROM usage_rollups WHERE granularity = 'day' AND model = $1", SPOOL_MODEL
                )
            finally:
                await db.close()
            return list(rows) if len(rows) >= len(expected) and day == len(expected) else None

        rows = await until(landed, "every spooled event in the ledger, once")
        assert {r["request_id"]: (r["outcome"], r["completion_tokens"]) for r in rows} == expected
        assert len(rows) == len(expected)

        async def settled() -> bool:
            files = {f.name for f in spool.glob("*.spool")}
            return len(files) == 1 and not files & w1_files and (await worker_stats(conn, w2))["usage_unacked"] == 0

        # w2's own file holds the adopted events until it grows to truncate_bytes (a replay is deduplicated).
        await until(settled, "the spool to hold only w2's file, every event in it acknowledged")
    finally:
        await conn.close()


async def test_a_message_past_max_deliver_is_dead_lettered(platform: EmbeddedStack, workers: Workers) -> None:
    """A consumer that dies with a batch in hand on its last delivery: the message goes to the dead letters."""
    pg, url = await own_postgres(platform, f"pg-maxdeliver-{secrets.token_hex(3)}")
    port = urlparse(url).port
    conn = await bus.connect(platform.nats_url, "tests", identity=platform.identity())
    durable = f"maxdeliver-{secrets.token_hex(4)}"
    settings = {"max_deliver": 1, "ack_wait_s": 1, "max_backoff_s": 0.3}
    try:
        js = conn.jetstream()
        workers["m1"] = start_metering(platform, url, durable, **settings)
        await wait_metering(conn, workers["m1"])
        await asyncio.to_thread(pg.stop)  # m1 holds what it fetches, waiting for its database
        model = "maxdeliver-" + secrets.token_hex(4)
        events = [good_event(f"{model}-{i}", model, i) for i in range(3)]
        for ev in events:
            await js.publish(usage.subject("llm", model), event_encoder.encode(ev))

        async def held() -> bool:
            info = await js.consumer_info(usage.STREAM, durable)
            return info.num_ack_pending > 0 and info.num_pending == 0

        await until(held, "the first metering process to hold every message")
        workers["m1"].kill()  # that was each message's one delivery
        await asyncio.to_thread(pg.start, port)
        workers["m2"] = start_metering(platform, url, durable, **settings)
        await wait_metering(conn, workers["m2"])

        async def dead() -> list[dict[str, Any]] | None:
            rc, out, err = await cli(platform, "usage", "dead-letters", "--json", "--limit", "1000")
            assert rc == 0, err
            mine = [d for d in msgspec.json.decode(out)["letters"]
                    if d["consumer"] == durable and d["subject"] == usage.subject("llm", model)]
            return mine if len(mine) >= len(events) else None

        letters = await until(dead, "the messages JetStream stopped delivering in the dead-letter stream")
        assert sorted((d["request_id"], d["reason"]) for d in letters) == sorted(
            (ev.request_id, "max_deliver") for ev in events
        )
        assert all(d["deliveries"] >= 1 for d in letters)
        db = await asyncpg.connect(url)
        try:
            assert await db.fetchval("SELECT count(*) FROM usage_events WHERE model = $1", model) == 0
        finally:
            await db.close()
    finally:
        await conn.close()
        for name in ("m1", "m2"):
            if name in workers:
                workers.pop(name).stop()
        await asyncio.to_thread(pg.stop)


def test_spool_adopts_only_files_of_publishers_that_are_gone(tmp_path: Path) -> None:
    now = time.time()
    events = [
        UsageEvent(request_id=f"r{i}", kind="llm", model="m", version="v", worker_id="w", outcome="ok",
                   started_at=now, finished_at=now, completion_tokens=i)
        for i in range(3)
    ]
    live = Spool(tmp_path)
    assert live.open() == []
    live.append_all(events)
    other = Spool(tmp_path)
    assert other.open() == []  # held by a live publisher: left alone
    other.close(keep=False)
    live.close(keep=True)  # it stops with its events unpublished (a kill -9 is the end-to-end test's)
    with live.path.open("ab") as f:
        f.write(b"\x10\x00\x00\x00torn")  # and its last write was torn
    heir = Spool(tmp_path)
    assert heir.open() == events
    assert sorted(p.name for p in tmp_path.glob("*.spool")) == [heir.path.name]
    assert read_spool(heir.path) == (events, 0)
    heir.settle(events[2:])
    assert read_spool(heir.path)[0] == events  # kept until it grows: a replay is deduplicated
    heir.compact_bytes = 0
    heir.settle(events[2:])
    assert read_spool(heir.path)[0] == events[2:]
    heir.settle([])
    assert read_spool(heir.path)[0] == events[2:]  # all acknowledged, but under truncate_bytes: no ftruncate yet
    heir.truncate_bytes, heir.compact_bytes = heir.size, 8 << 20
    heir.settle(events[2:])
    assert read_spool(heir.path)[0] == events[2:]  # big enough, but an event is still unacknowledged
    heir.settle([])
    assert heir.path.stat().st_size == 0
    heir.close(keep=False)
    assert not list(tmp_path.glob("*.spool"))


async def test_a_burst_of_usage_events_travels_in_few_messages(nc: bus.Connection, tmp_path: Path) -> None:
    """What a worker's publisher sends: a burst as one message per subject of at most `max_events` events (its id
    derived from theirs), a lone event as itself; every event once, in order, each acknowledged."""
    js = nc.jetstream()
    await ensure_stream(js)
    tag = secrets.token_hex(4)
    models = [f"burst-a-{tag}", f"burst-b-{tag}"]
    publisher = UsagePublisher(js, UsageSettings(usage_spool_dir=str(tmp_path)), max_events=16)
    publisher.start()
    burst = [good_event(f"{models[i % 2]}-{i}", models[i % 2], i) for i in range(50)]
    for event in burst:  # one loop turn: one burst
        publisher.publish(event)
    await publisher.drain(10)
    assert (publisher.published, publisher.unacked) == (50, 0)
    publisher = UsagePublisher(js, UsageSettings(usage_spool_dir=str(tmp_path)), max_events=16)
    publisher.start()
    lone = good_event(f"{models[0]}-lone", models[0], 99)
    publisher.publish(lone)
    await publisher.drain(10)

    async def messages(model: str, count: int) -> list[tuple[list[UsageEvent], str]]:
        sub = await js.subscribe(usage.subject("llm", model), ordered_consumer=True)
        try:
            out: list[tuple[list[UsageEvent], str]] = []
            while sum(len(events) for events, _ in out) < count:
                msg = await sub.next_msg(timeout=10)
                out.append((usage.events_of(msg.data), (msg.headers or {}).get("Nats-Msg-Id", "")))
            assert msg.metadata.num_pending == 0  # and no other message stored there (a copy, say)
            return out
        finally:
            await sub.unsubscribe()

    a = await messages(models[0], 26)
    assert [len(events) for events, _ in a] == [16, 9, 1]
    assert [e for events, _ in a for e in events] == [*burst[0::2], lone]
    assert [msg_id for _, msg_id in a] == [usage.batch_msg_id(a[0][0]), usage.batch_msg_id(a[1][0]),
                                           usage.msg_id(lone)]
    b = await messages(models[1], 25)
    assert [len(events) for events, _ in b] == [16, 9]
    assert [e for events, _ in b for e in events] == burst[1::2]
    assert not await asyncio.to_thread(lambda: list(tmp_path.glob("*.spool")))  # all acknowledged: no spool file left


def test_pack_splits_by_subject_count_and_payload() -> None:
    """A worker's messages: per subject in the order the subjects first come, at most `max_events` events and
    under the max payload each, a lone event as itself; `parts` gives back exactly the events packed."""
    events = [good_event(f"pack-{i}", "pack-a" if i % 3 else "pack-b", i) for i in range(40)]
    envelopes = pack(events, 1 << 20, max_events=8)
    assert [(e.subject, len(e.events)) for e in envelopes] == [
        (usage.subject("llm", "pack-b"), 8), (usage.subject("llm", "pack-b"), 6),
        (usage.subject("llm", "pack-a"), 8), (usage.subject("llm", "pack-a"), 8), (usage.subject("llm", "pack-a"), 8),
        (usage.subject("llm", "pack-a"), 2),
    ]
    for envelope in envelopes:
        assert usage.events_of(envelope.payload) == envelope.events
        assert envelope.msg_id == usage.batch_msg_id(envelope.events)
    assert sorted(e.request_id for env in envelopes for e in env.events) == sorted(e.request_id for e in events)
    size = len(event_encoder.encode(events[1]))
    small = pack([e for e in events if e.model == "pack-a"], bus.HEADROOM + 3 * size + 5, max_events=128)
    assert [len(e.events) for e in small][:2] == [3, 3] and all(len(e.payload) <= 3 * size + 5 for e in small)
    (alone,) = pack(events[:1], 1 << 20)
    assert alone.payload == event_encoder.encode(events[0]) and alone.msg_id == usage.msg_id(events[0])
    assert usage.parts(alone.payload) == [alone.payload]
