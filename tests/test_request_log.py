"""The request log end to end: RequestLogPublisher -> JetStream REQUESTS -> metering -> PostgreSQL, and back out
through `metering.admin.requests.query`, `inferbus requests` and `GET /v1/admin/requests`.

One metering process serves the module (on the session's PostgreSQL); every test writes under tenants of
its own and looks only at those. The edge does not emit records in these tests: they publish them with
the edge's own publisher, so what is asserted is exactly what the edge's records will go through.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest

from contracts import subjects
from contracts.control import Reply
from contracts.requestlog import (
    MAX_BODY_CHARS,
    REQUESTS_QUERY,
    REQUESTS_RETENTION,
    Fallback,
    RequestRecord,
    records_encoder,
)
from contracts.tenancy import body_logging
from services.runtime import bus
from services.runtime.local import EmbeddedStack, ServiceProcess, settings_env
from services.runtime.requestlog import RequestLogPublisher, ensure_stream
from tests.conftest import BENCH_MODEL, Gateway
from tests.test_metering import until

DURABLE = "requestlog"
DAY = 86_400.0


class Failed(Exception):
    def __init__(self, code: str, message: str, param: str | None) -> None:
        super().__init__(f"{code}: {message} [{param}]")
        self.code, self.param = code, param


async def ask(nc: bus.Connection, subject: str, **body: Any) -> Any:
    msg = await nc.request(subject, msgspec.json.encode(body), timeout=10)
    reply = msgspec.json.decode(msg.data, type=Reply)
    if reply.error is not None:
        raise Failed(reply.error.code, reply.error.message, reply.error.param)
    return reply.result


def tenant() -> str:
    return "rl-" + secrets.token_hex(5)


def record(who: str, i: int, ts: float, **fields: Any) -> RequestRecord:
    base: dict[str, Any] = {
        "request_id": f"{who}-{i}", "ts": ts, "kind": "llm", "model": "bench-fast", "version": "v1",
        "provider": "benchmark", "worker_id": "w-1", "key_id": f"{who}-key", "tenant_id": who, "status": "ok",
        "latency_ms": 12.5, "prompt_tokens": 3, "completion_tokens": 5,
    }
    return RequestRecord(**{**base, **fields})


class Platform:
    """The module's metering process (restartable) beside a pool on its database and an edge publisher."""

    def __init__(self, infra: EmbeddedStack, nc: bus.Connection, pool: asyncpg.Pool) -> None:
        self.infra, self.nc, self.pool = infra, nc, pool
        self.proc: ServiceProcess | None = None
        self.publisher = RequestLogPublisher(nc, interval_s=0.02)

    async def start_metering(self) -> None:
        env = self.infra.env(**settings_env(
            requestlog_durable=DURABLE, requestlog_ack_wait_s=2.0, requestlog_fetch_wait_s=0.1,
        ))
        self.proc = ServiceProcess("metering-requestlog", "services.metering", env, self.infra.root)
        await until(self.stats, "metering to answer STATS", 60)

    async def stats(self) -> dict[str, Any] | None:
        assert self.proc is not None
        self.proc.check_alive()
        for data in await bus.service_stats(self.nc, "inferbus-metering", wait=0.2):
            if data.get("pid") == self.proc.pid:
                return data
        return None

    async def rows(self, who: str) -> list[asyncpg.Record]:
        return list(await self.pool.fetch("SELECT * FROM request_log WHERE tenant_id = $1 ORDER BY request_id", who))

    async def wait_rows(self, who: str, n: int, limit_s: float = 20) -> list[asyncpg.Record]:
        async def enough() -> list[asyncpg.Record] | None:
            rows = await self.rows(who)
            assert len(rows) <= n, f"{len(rows)} rows for {who}, expected {n}"
            return rows if len(rows) == n else None

        return await until(enough, f"{n} request log rows for {who}", limit_s)

    async def flushed(self) -> None:
        async def empty() -> bool:
            return self.publisher.pending == 0

        await until(empty, "the publisher to have JetStream acknowledge everything")

    async def publish(self, records: list[RequestRecord]) -> list[asyncpg.Record]:
        for r in records:
            self.publisher.add(r)
        tenants = {r.tenant_id for r in records}
        assert len(tenants) == 1
        who = tenants.pop()
        assert who is not None
        return await self.wait_rows(who, len({(r.request_id, r.seq) for r in records}))


@pytest.fixture(scope="module")
async def platform(infra: EmbeddedStack, nc: bus.Connection) -> AsyncIterator[Platform]:
    await ensure_stream(nc.jetstream())  # the edge's side, as a gateway would at start
    pool = await asyncpg.create_pool(infra.database_url, min_size=1, max_size=2)
    assert pool is not None
    p = Platform(infra, nc, pool)
    p.publisher.start()
    await p.start_metering()
    try:
        yield p
    finally:
        await p.publisher.drain(5)
        if p.proc is not None:
            p.proc.stop()
        await pool.close()


async def query(nc: bus.Connection, **body: Any) -> dict[str, Any]:
    result: dict[str, Any] = await ask(nc, REQUESTS_QUERY, **body)
    return result


async def everything(nc: bus.Connection, limit: int, **filters: Any) -> tuple[list[dict[str, Any]], list[int]]:
    """Every page of a query: (the rows, in order; each page's size)."""
    rows: list[dict[str, Any]] = []
    sizes: list[int] = []
    cursor = None
    while True:
        page = await query(nc, limit=limit, cursor=cursor, **filters)
        rows += page["data"]
        sizes.append(len(page["data"]))
        cursor = page["next_cursor"]
        if cursor is None:
            return rows, sizes
        assert len(sizes) < 100, "pagination does not end"


# ---- publisher -> JetStream -> metering -> PostgreSQL ---------------------------------------------------


async def test_records_reach_postgres_and_the_query_as_published(platform: Platform, nc: bus.Connection) -> None:
    info = await nc.jetstream().stream_info(subjects.REQUEST_LOG_STREAM)
    assert info.config.subjects == [subjects.REQUEST_LOG_ALL]
    assert info.config.duplicate_window == 120 and info.config.max_age == 7 * DAY
    who, now = tenant(), time.time()
    served = record(
        who, 0, now - 2, model="chat", version="v2", provider="openai", worker_id="w-9", attempts=3,
        fallbacks=[Fallback(target="chat:v1", code="overloaded"), Fallback(target="other:v3", code="upstream_timeout")],
        latency_ms=250.5, ttft_ms=40.25, prompt_tokens=11, completion_tokens=22, streamed=True,
    )
    failed = record(
        who, 1, now - 1, version="", provider=None, worker_id=None, attempts=0, status="error",
        error_code="no_worker", http_status=503, latency_ms=1.5, prompt_tokens=0, completion_tokens=0,
    )
    embedded = record(who, 2, now, kind="embed", model="minilm", http_status=0)
    before = platform.publisher.published
    rows = await platform.publish([served, failed, embedded])
    await platform.flushed()
    assert platform.publisher.published >= before + 3
    by_id = {r["request_id"]: r for r in rows}
    assert by_id[served.request_id]["ts"].timestamp() == pytest.approx(served.ts, abs=1e-5)
    assert json.loads(by_id[served.request_id]["fallbacks"]) == [
        {"target": "chat:v1", "code": "overloaded"}, {"target": "other:v3", "code": "upstream_timeout"}
    ]
    assert by_id[embedded.request_id]["kind"] == "embed"

    page = await query(nc, tenant_id=who)
    assert [v["request_id"] for v in page["data"]] == [embedded.request_id, failed.request_id, served.request_id]
    assert page["next_cursor"] is None
    views = {v["request_id"]: v for v in page["data"]}
    view = views[served.request_id]
    for field in ("kind", "model", "version", "provider", "worker_id", "key_id", "tenant_id", "attempts",
                  "status", "latency_ms", "ttft_ms", "prompt_tokens", "completion_tokens", "streamed"):
        assert view[field] == getattr(served, field), field
    assert view["fallbacks"] == msgspec.to_builtins(served.fallbacks)
    assert view["http_status"] == 200 and view["error_code"] is None and not view["has_bodies"]
    assert view["time"].endswith("Z") and view["ts"] == pytest.approx(served.ts, abs=1e-5)
    gone = views[failed.request_id]
    assert (gone["status"], gone["error_code"], gone["http_status"], gone["attempts"]) == ("error", "no_worker", 503, 0)
    assert (gone["provider"], gone["worker_id"], gone["version"], gone["ttft_ms"]) == (None, None, "", None)
    assert views[embedded.request_id]["http_status"] == 0


async def test_full_buffer_drops_the_oldest_and_counts_them(platform: Platform, nc: bus.Connection) -> None:
    who, now = tenant(), time.time()
    publisher = RequestLogPublisher(nc, max_buffer=5)  # not started: nothing leaves until it is
    for i in range(8):
        publisher.add(record(who, i, now + i))
    publisher.add(record(who, 99, now, kind="telepathy"))
    assert (publisher.dropped, publisher.pending) == (4, 5)
    publisher.start()
    await publisher.drain(5)
    assert publisher.pending == 0 and publisher.published == 5
    rows = await platform.wait_rows(who, 5)
    assert sorted(r["request_id"] for r in rows) == [f"{who}-{i}" for i in range(3, 8)]


async def test_duplicates_are_stored_once_and_bad_records_alone_are_dropped(
    platform: Platform, nc: bus.Connection
) -> None:
    who, now = tenant(), time.time()
    batch = [record(who, i, now) for i in range(2)]
    js = nc.jetstream()
    msg_id = "dup-" + secrets.token_hex(6)
    before = await platform.stats()
    assert before is not None
    llm, payload = subjects.request_log("llm"), records_encoder.encode(batch)
    first = await js.publish(llm, payload, headers={"Nats-Msg-Id": msg_id})
    again = await js.publish(llm, payload, headers={"Nats-Msg-Id": msg_id})
    assert again.duplicate and again.seq == first.seq  # JetStream's duplicate window
    # Past the window (or from another edge): stored twice, the table's key must hold.
    bypass = await js.publish(llm, payload, headers={"Nats-Msg-Id": msg_id + "-again"})
    assert not bypass.duplicate
    platform.publisher.add(batch[0])  # and once more through the publisher
    platform.publisher.add(record(who, 2, now))
    # One message with a record outside the contract (its neighbour must still land), and one that is noise.
    good = msgspec.to_builtins(record(who, 3, now))
    mixed = await js.publish(llm, msgspec.msgpack.encode([good, {**good, "status": "maybe", "request_id": f"{who}-x"}]))
    noise = await js.publish(llm, b"\xc1 not msgpack")

    async def settled() -> bool:
        info = await js.consumer_info(subjects.REQUEST_LOG_STREAM, DURABLE)
        floor: int = info.ack_floor.stream_seq if info.ack_floor is not None else 0
        return floor >= max(bypass.seq, mixed.seq, noise.seq)

    await until(settled, "the request log consumer to ack every message")
    rows = await platform.wait_rows(who, 4)
    assert sorted(r["request_id"] for r in rows) == [f"{who}-{i}" for i in range(4)]
    after = await platform.stats()
    assert after is not None
    assert after["requestlog_duplicates"] >= before["requestlog_duplicates"] + 2
    assert after["requestlog_invalid"] >= before["requestlog_invalid"] + 2


# ---- queries --------------------------------------------------------------------------------------------


async def test_filters_and_keyset_pagination(platform: Platform, nc: bus.Connection) -> None:
    who = tenant()
    base = float(int(time.time())) - 200
    records = [
        record(
            who, i, base - i // 4,  # four records per second: ties broken by the row id
            key_id=f"{who}-key-{'ab'[i % 2]}", model=f"m{i % 3}",
            status="error" if i % 5 == 0 else "ok",
            error_code=("rate_limited" if i % 10 == 0 else "no_worker") if i % 5 == 0 else None,
        )
        for i in range(120)
    ]
    await platform.publish(records)

    rows, sizes = await everything(nc, 50, tenant_id=who)
    assert sizes == [50, 50, 20]
    assert sorted(r["request_id"] for r in rows) == sorted(r.request_id for r in records)
    stamps = [r["ts"] for r in rows]
    assert stamps == sorted(stamps, reverse=True)
    rows3, sizes3 = await everything(nc, 3, tenant_id=who)  # pages that cut through every group of ties
    assert [r["request_id"] for r in rows3] == [r["request_id"] for r in rows] and set(sizes3) == {3}

    def expect(keep: Callable[[RequestRecord], bool]) -> list[str]:
        return sorted(r.request_id for r in records if keep(r))

    cases: list[tuple[dict[str, Any], Callable[[RequestRecord], bool]]] = [
        ({"key_id": f"{who}-key-a"}, lambda r: r.key_id == f"{who}-key-a"),
        ({"model": "m2"}, lambda r: r.model == "m2"),
        ({"status": "error"}, lambda r: r.status == "error"),
        ({"error_code": "rate_limited"}, lambda r: r.error_code == "rate_limited"),
        ({"status": "ok", "model": "m1", "key_id": f"{who}-key-b"},
         lambda r: r.status == "ok" and r.model == "m1" and r.key_id == f"{who}-key-b"),
        ({"since": base - 10, "until": dt.datetime.fromtimestamp(base - 5, dt.UTC).isoformat()},
         lambda r: base - 10 <= r.ts < base - 5),
        ({"since": dt.datetime.fromtimestamp(base - 3, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")},
         lambda r: r.ts >= base - 3),
    ]
    for filters, keep in cases:
        found, _ = await everything(nc, 25, tenant_id=who, **filters)
        wanted = expect(keep)
        assert wanted and sorted(r["request_id"] for r in found) == wanted, filters

    for bad, param in (({"cursor": "yesterday"}, "cursor"), ({"since": "the dawn of time"}, "since"),
                       ({"since": base, "until": base - 60}, "since"), ({"until": -5}, "until")):
        with pytest.raises(Failed) as failure:
            await query(nc, tenant_id=who, **bad)
        assert failure.value.code == "invalid_request" and failure.value.param == param, bad
    for bad in ({"limit": 0}, {"limit": 1001}, {"status": "maybe"}, {"colour": "red"}):
        with pytest.raises(Failed) as failure:
            await query(nc, tenant_id=who, **bad)
        assert failure.value.code == "invalid_request", bad


async def test_bodies_only_when_flagged_and_cleared_by_retention(platform: Platform, nc: bus.Connection) -> None:
    who, now = tenant(), time.time()
    fresh = record(who, 0, now, request_body='{"prompt": "hi"}', response_body='{"text": "hello"}')
    expiring = record(who, 1, now - 8 * DAY, request_body='{"prompt": "old"}', response_body="old",
                      body_retention_days=7)
    kept_longer = record(who, 2, now - 8 * DAY, request_body='{"prompt": "kept"}', body_retention_days=30)
    plain = record(who, 3, now)
    ancient = record(who, 4, now - 31 * DAY, request_body="ancient")
    huge = record(who, 5, now, request_body="x" * (MAX_BODY_CHARS + 100), response_body="nul\x00inside")
    rows = {r["request_id"]: r for r in await platform.publish([fresh, expiring, kept_longer, plain, ancient, huge])}
    assert rows[plain.request_id]["request_body"] is None and rows[plain.request_id]["expires_at"] is None
    assert rows[expiring.request_id]["response_body"] == "old"  # there until the retention job runs
    assert rows[expiring.request_id]["expires_at"].timestamp() == pytest.approx(expiring.ts + 7 * DAY, abs=1e-3)
    big = rows[huge.request_id]
    assert len(big["request_body"]) == MAX_BODY_CHARS and big["bodies_truncated"]
    assert big["response_body"] == "nul\ufffdinside"

    page = await query(nc, tenant_id=who)
    assert all(v["request_body"] is None and v["response_body"] is None for v in page["data"])
    assert {v["request_id"] for v in page["data"] if v["has_bodies"]} == {
        r.request_id for r in (fresh, expiring, kept_longer, ancient, huge)
    }
    page = await query(nc, tenant_id=who, include_bodies=True)
    shown = {v["request_id"]: v for v in page["data"]}
    assert shown[fresh.request_id]["request_body"] == fresh.request_body
    assert shown[fresh.request_id]["response_body"] == fresh.response_body
    assert shown[plain.request_id]["request_body"] is None

    report = await ask(nc, REQUESTS_RETENTION)
    assert report["bodies_cleared"] >= 1 and report["rows_deleted"] >= 1
    after = {r["request_id"]: r for r in await platform.rows(who)}
    assert ancient.request_id not in after and len(after) == 5
    gone = after[expiring.request_id]
    assert (gone["request_body"], gone["response_body"], gone["expires_at"]) == (None, None, None)
    assert gone["status"] == "ok" and gone["latency_ms"] == expiring.latency_ms  # the row itself stays
    assert after[kept_longer.request_id]["request_body"] == kept_longer.request_body
    assert after[fresh.request_id]["response_body"] == fresh.response_body
    again = await ask(nc, REQUESTS_RETENTION)
    assert after == {r["request_id"]: r for r in await platform.rows(who)} and again["rows_deleted"] >= 0


# ---- the CLI and the HTTP API ---------------------------------------------------------------------------


async def cli(infra: EmbeddedStack, *argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", *argv, env={**infra.env(), "INFERBUS_DATA_DIR": str(infra.root)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_requests(platform: Platform, infra: EmbeddedStack) -> None:
    who, now = tenant(), time.time()
    records = [record(who, i, now - 60 + i, status="error" if i == 4 else "ok", error_code="overloaded" if i == 4
                      else None, fallbacks=[Fallback(target="bench-fast:v0", code="overloaded")] if i == 3 else [])
               for i in range(5)]
    await platform.publish(records)
    rc, out, err = await cli(infra, "requests", "--tenant", who, "--since", "1h", "--limit", "2", "--json")
    assert rc == 0, err
    first = json.loads(out)
    assert [v["request_id"] for v in first["data"]] == [f"{who}-4", f"{who}-3"] and first["next_cursor"]
    rc, out, err = await cli(infra, "requests", "--tenant", who, "--limit", "2", "--json", "--cursor",
                             first["next_cursor"])
    assert rc == 0 and [v["request_id"] for v in json.loads(out)["data"]] == [f"{who}-2", f"{who}-1"], err

    rc, out, err = await cli(infra, "requests", "--tenant", who, "--limit", "3")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["TIME", "REQUEST", "KEY"]
    assert f"{who}-4" in lines[1] and "overloaded" in lines[1]
    assert "bench-fast:v1 <- bench-fast:v0(overloaded)" in lines[2]
    assert lines[-1].startswith("next page: --cursor ")
    rc, out, err = await cli(infra, "requests", "--tenant", who, "--code", "overloaded", "--json")
    assert rc == 0 and [v["request_id"] for v in json.loads(out)["data"]] == [f"{who}-4"], err
    rc, out, err = await cli(infra, "requests", "--since", "last tuesday")
    assert rc == 2 and "not a time" in err


async def test_http_admin_requests(platform: Platform, gateway: Gateway, nc: bus.Connection) -> None:
    who, now = tenant(), time.time()
    await platform.publish([record(who, i, now - 10 + i) for i in range(3)])
    key = await ask(nc, subjects.admin("keys.create"), name="rl-reader")
    url = f"{gateway.url}/v1/admin/requests"
    async with aiohttp.ClientSession() as http:
        params = {"tenant_id": who, "limit": "2", "since": "1h"}
        async with http.get(url, headers=gateway.headers, params=params) as r:
            assert r.status == 200, await r.text()
            page = await r.json()
        assert page["object"] == "list" and [v["request_id"] for v in page["data"]] == [f"{who}-2", f"{who}-1"]
        async with http.get(url, headers=gateway.headers, params={**params, "cursor": page["next_cursor"]}) as r:
            rest = await r.json()
        assert [v["request_id"] for v in rest["data"]] == [f"{who}-0"] and rest["next_cursor"] is None
        async with http.get(url, headers={"Authorization": f"Bearer {key['key']}"}, params=params) as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == "permission_denied"
        async with http.get(url, params=params) as r:
            assert r.status == 401
        for bad, param in (({"limit": "many"}, "limit"), ({"colour": "red"}, "colour"), ({"cursor": "x"}, "cursor"),
                           ({"since": "then"}, "since")):
            async with http.get(url, headers=gateway.headers, params=bad) as r:
                body = await r.json()
                assert r.status == 400 and body["error"]["param"] == param, (bad, body)


async def test_a_websocket_request_is_logged_as_an_http_one_is(
    platform: Platform, gateway: Gateway, bench_worker: dict[str, Any], nc: bus.Connection
) -> None:
    """/v1/ws requests reach the request log from the edge: one record each, its outcome and tokens; a refused
    one (an unknown model) with its error code."""
    key = await ask(nc, subjects.admin("keys.create"), name="rl-ws")
    good = {"model": BENCH_MODEL, "messages": [{"role": "user", "content": "log me"}], "max_tokens": 3}
    ends: dict[str, dict[str, Any]] = {}
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{gateway.url.replace('http', 'ws', 1)}/v1/ws",
                                   headers={"Authorization": f"Bearer {key['key']}"}) as ws:
            await ws.send_json({"type": "request", "id": "ok", "body": good})
            await ws.send_json({"type": "request", "id": "bad", "body": {**good, "model": "no-such-model"}})
            while len(ends) < 2:
                event = await ws.receive_json(timeout=30)
                if event["type"] in ("done", "error"):
                    ends[event["id"]] = event

        async def logged() -> list[dict[str, Any]] | None:
            async with http.get(f"{gateway.url}/v1/admin/requests", headers=gateway.headers,
                                params={"key_id": key["info"]["id"], "since": "1h"}) as r:
                assert r.status == 200, await r.text()
                rows = (await r.json())["data"]
                return rows if len(rows) >= 2 else None

        rows = {r["model"]: r for r in await until(logged, "two request-log records of the socket")}
    assert ends["ok"]["type"] == "done" and ends["bad"]["type"] == "error", ends
    ok, bad = rows[BENCH_MODEL], rows["no-such-model"]
    assert (ok["status"], ok["streamed"], ok["http_status"]) == ("ok", True, 200)
    assert ok["completion_tokens"] == ends["ok"]["usage"]["completion_tokens"] == 3
    assert (bad["status"], bad["error_code"]) == ("error", ends["bad"]["error"]["code"])


async def test_logging_settings_on_tenants_and_keys(gateway: Gateway, nc: bus.Connection,
                                                    infra: EmbeddedStack) -> None:
    made = await ask(nc, subjects.admin("tenants.create"), name="rl-" + secrets.token_hex(4), log_bodies=True,
                     log_retention_days=3)
    assert (made["log_bodies"], made["log_retention_days"]) == (True, 3)
    new = await ask(nc, subjects.admin("keys.create"), name="rl-quiet", tenant=made["id"], log_bodies=False)
    info = new["info"]
    assert (info["log_bodies"], info["log_retention_days"]) == (False, None)
    assert body_logging(info["log_bodies"], info["log_retention_days"], made["log_bodies"], 3) == (False, 3)
    changed = await ask(nc, subjects.admin("keys.update"), key_id=info["id"], log_retention_days=30)
    assert (changed["log_bodies"], changed["log_retention_days"]) == (False, 30)
    inherit = await ask(nc, subjects.admin("keys.update"), key_id=info["id"], log_inherit=True)
    assert (inherit["log_bodies"], inherit["log_retention_days"]) == (None, None)
    assert body_logging(None, None, True, 3) == (True, 3)
    tenant_now = await ask(nc, subjects.admin("tenants.update"), tenant=made["id"], log_bodies=False)
    assert (tenant_now["log_bodies"], tenant_now["log_retention_days"]) == (False, 3)
    for op, body in (("keys.update", {"key_id": info["id"], "log_retention_days": 0}),
                     ("tenants.create", {"name": "rl-" + secrets.token_hex(4), "log_retention_days": 99999})):
        with pytest.raises(Failed) as failure:
            await ask(nc, subjects.admin(op), **body)
        assert failure.value.code == "invalid_request" and failure.value.param == "log_retention_days"

    rc, out, err = await cli(infra, "tenants", "create", "rl-" + secrets.token_hex(4), "--log-bodies",
                             "--log-retention-days", "14")
    assert rc == 0 and "log_bodies=on log_retention=14d" in out, err
    rc, out, err = await cli(infra, "keys", "update", info["id"], "--no-log-bodies")
    assert rc == 0 and "log_bodies=off" in out, err


# ---- restarts -------------------------------------------------------------------------------------------


async def test_metering_restart_loses_and_doubles_nothing(platform: Platform) -> None:
    who, now = tenant(), time.time()
    first = [record(who, i, now) for i in range(300)]
    for r in first:
        platform.publisher.add(r)

    async def some_written() -> bool:
        return bool(await platform.rows(who))

    await until(some_written, "the first records to be written")
    assert platform.proc is not None
    platform.proc.kill()  # mid-stream: batches fetched, not acked, come back after ack_wait
    second = [record(who, i, now) for i in range(300, 500)]
    for r in second:
        platform.publisher.add(r)
    await platform.flushed()  # all of it in JetStream while no metering runs
    await platform.start_metering()
    rows = await platform.wait_rows(who, 500, limit_s=30)
    assert len({r["request_id"] for r in rows}) == 500
    platform.proc.stop()  # and a clean stop: what it fetched is committed and acked, nothing more arrives
    late = [record(who, i, now) for i in range(500, 520)]
    for r in late:
        platform.publisher.add(r)
    await platform.flushed()
    assert len(await platform.rows(who)) == 520 - len(late)
    await platform.start_metering()
    rows = await platform.wait_rows(who, 520, limit_s=30)
    assert len({r["request_id"] for r in rows}) == 520
