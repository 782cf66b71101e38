"""The request log in PostgreSQL: the REQUESTS stream written in batches, a retention job, and the query.

A durable pull consumer fetches up to `batch_size` messages (each a list of records from one edge
flush), writes their records in one statement keyed on (request id, seq) and acks them only after
the commit: a redelivery (a crash mid-batch, an edge re-publish) inserts nothing. While PostgreSQL
is down the batch is held, marked in progress and retried after a back-off. A record the database
refuses is isolated by halving and dropped alone; a record outside the contract's bounds is dropped
at decode, never its whole message.

Retention: bodies are cleared at their `expires_at` (the request's time plus the key's or tenant's
retention days), and rows older than `row_retention_days` are deleted, in chunks, every
`interval_s` and on demand (`metering.admin.requests.retention`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import re
from typing import Any, Final

import asyncpg
import msgspec
from prometheus_client import Counter

from contracts import subjects
from contracts.errors import invalid
from contracts.requestlog import (
    Fallback,
    RequestPage,
    RequestQuery,
    RequestRecord,
    RequestView,
    RetentionReport,
    records_decoder,
)
from services.runtime import bus
from services.runtime import logging as log

ROWS = Counter("inferbus_requestlog_rows_total", "Request log records written to PostgreSQL")
DUPLICATES = Counter("inferbus_requestlog_duplicates_total", "Request log records already stored (redeliveries)")
INVALID = Counter("inferbus_requestlog_invalid_total", "Request log records or messages dropped as invalid")
PG_ERRORS = Counter("inferbus_requestlog_pg_errors_total", "Request log batches PostgreSQL failed to commit")
CLEARED = Counter("inferbus_requestlog_bodies_cleared_total", "Request log rows whose bodies expired")
DELETED = Counter("inferbus_requestlog_rows_deleted_total", "Request log rows deleted past their retention")
# The database refuses these for what is in the batch, not because it is unavailable (cf. consumer.py).
REFUSED = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, asyncpg.ProgramLimitExceededError)
_raw_list = msgspec.msgpack.Decoder(list[msgspec.Raw])
_record = msgspec.msgpack.Decoder(RequestRecord)

INSERT: Final = """
INSERT INTO request_log (request_id, seq, ts, key_id, tenant_id, kind, model, version, provider, worker_id,
    attempts, fallbacks, status, error_code, http_status, latency_ms, ttft_ms, prompt_tokens, completion_tokens,
    streamed, request_body, response_body, bodies_truncated, expires_at)
SELECT b.request_id, b.seq, to_timestamp(b.ts), b.key_id, b.tenant_id, b.kind, b.model, b.version, b.provider,
    b.worker_id, b.attempts, b.fallbacks::jsonb, b.status, b.error_code, b.http_status, b.latency_ms, b.ttft_ms,
    b.prompt_tokens, b.completion_tokens, b.streamed, b.request_body, b.response_body, b.bodies_truncated,
    CASE WHEN b.request_body IS NULL AND b.response_body IS NULL THEN NULL
         ELSE to_timestamp(b.ts) + make_interval(days => b.retention_days) END
FROM unnest(
    $1::text[], $2::int4[], $3::float8[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[],
    $10::text[], $11::int4[], $12::text[], $13::text[], $14::text[], $15::int2[], $16::float8[], $17::float8[],
    $18::int8[], $19::int8[], $20::bool[], $21::text[], $22::text[], $23::bool[], $24::int4[]
) AS b (request_id, seq, ts, key_id, tenant_id, kind, model, version, provider, worker_id, attempts, fallbacks,
        status, error_code, http_status, latency_ms, ttft_ms, prompt_tokens, completion_tokens, streamed,
        request_body, response_body, bodies_truncated, retention_days)
ON CONFLICT (request_id, seq) DO NOTHING
"""


def _text(body: str | None) -> str | None:
    """PostgreSQL text holds no NUL character."""
    return body.replace("\x00", "\ufffd") if body is not None and "\x00" in body else body


def columns(records: list[RequestRecord]) -> list[list[Any]]:
    """The records as one array per column (first copy of a key wins), in key order, in INSERT's order."""
    first = {(r.request_id, r.seq): r for r in reversed(records)}
    rows = [first[key] for key in sorted(first)]
    return [
        [r.request_id for r in rows],
        [r.seq for r in rows],
        [r.ts for r in rows],
        [r.key_id for r in rows],
        [r.tenant_id for r in rows],
        [r.kind for r in rows],
        [r.model for r in rows],
        [r.version for r in rows],
        [r.provider for r in rows],
        [r.worker_id for r in rows],
        [r.attempts for r in rows],
        [msgspec.json.encode(r.fallbacks).decode() for r in rows],
        [r.status for r in rows],
        [r.error_code for r in rows],
        [r.http_status for r in rows],
        [r.latency_ms for r in rows],
        [r.ttft_ms for r in rows],
        [r.prompt_tokens for r in rows],
        [r.completion_tokens for r in rows],
        [r.streamed for r in rows],
        [_text(r.request_body) for r in rows],
        [_text(r.response_body) for r in rows],
        [r.bodies_truncated for r in rows],
        [r.body_retention_days for r in rows],
    ]


async def insert(pool: asyncpg.Pool, records: list[RequestRecord], *, limit_s: float | None = None) -> int:
    """Write `records` in one statement; the number of rows it added (the rest were there already)."""
    status = await pool.execute(INSERT, *columns(records), timeout=limit_s)
    return int(status.rsplit(" ", 1)[-1])


def decode(data: bytes) -> tuple[list[RequestRecord], int]:
    """The valid records of one message, and how many it held that were not."""
    try:
        return records_decoder.decode(data), 0
    except msgspec.ValidationError:
        pass  # one record outside the bounds: keep the others
    good: list[RequestRecord] = []
    items = _raw_list.decode(data)  # not a list at all: DecodeError, the caller drops the message
    for item in items:
        try:
            good.append(_record.decode(item))
        except msgspec.DecodeError:
            continue
    return good, len(items) - len(good)


# ---- the consumer ------------------------------------------------------------------------------------


async def ensure_consumer(js: bus.JetStreamContext, durable: str, ack_wait_s: float, max_deliver: int) -> None:
    """Create the durable consumer, or bring an existing one to these settings."""
    await js.add_consumer(
        subjects.REQUEST_LOG_STREAM,
        bus.ConsumerConfig(
            name=durable,
            durable_name=durable,
            description="InferBus metering: request log records into PostgreSQL",
            deliver_policy=bus.DeliverPolicy.ALL,
            ack_policy=bus.AckPolicy.EXPLICIT,
            ack_wait=ack_wait_s,
            max_ack_pending=10_000,
            max_deliver=max_deliver,
            filter_subject=subjects.REQUEST_LOG_ALL,
        ),
    )


class RequestLogConsumer:
    def __init__(
        self,
        pool: asyncpg.Pool,
        js: bus.JetStreamContext,
        *,
        durable: str,
        batch_size: int = 64,
        fetch_wait_s: float = 0.2,
        write_timeout_s: float = 20.0,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.pool = pool
        self.js = js
        self.durable = durable
        self.batch_size = batch_size
        self.fetch_wait_s = fetch_wait_s
        self.write_timeout_s = write_timeout_s
        self.max_backoff_s = max_backoff_s
        self.rows_written = 0
        self.duplicates = 0
        self.invalid = 0
        self.pg_errors = 0
        self.backoff = 0.0
        self._sub: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._idle = asyncio.Event()  # not between a fetch and its acks
        self._idle.set()
        self.logger = log.get("metering")

    async def start(self) -> None:
        self._sub = await self.js.pull_subscribe_bind(durable=self.durable, stream=subjects.REQUEST_LOG_STREAM)
        self._task = asyncio.create_task(self._run(), name="requestlog-consumer")

    async def stop(self, grace_s: float) -> None:
        """Stop fetching; let the batch in hand commit and ack (the rest is redelivered)."""
        self._stopping = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):
                await self._idle.wait()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    def stats(self) -> dict[str, Any]:
        return {"requestlog_rows": self.rows_written, "requestlog_duplicates": self.duplicates,
                "requestlog_invalid": self.invalid, "requestlog_pg_errors": self.pg_errors}

    async def _run(self) -> None:
        while not self._stopping:
            try:
                msgs = await self._sub.fetch(self.batch_size, timeout=self.fetch_wait_s)
            except TimeoutError:  # nothing came (nats-py raises its own subclass, or asyncio's)
                continue
            except Exception as exc:  # NATS reconnecting: JetStream keeps the messages
                self.logger.warning("requestlog_fetch_failed", error=repr(exc))
                await asyncio.sleep(1.0)
                continue
            self._idle.clear()
            try:
                await self.write(msgs)
            except Exception:  # a bug, not PostgreSQL: the batch is redelivered after ack_wait
                self.logger.exception("requestlog_batch_failed", messages=len(msgs))
            finally:
                self._idle.set()

    async def write(self, msgs: list[bus.Msg]) -> None:
        records: list[RequestRecord] = []
        good: list[bus.Msg] = []
        for msg in msgs:
            try:
                found, bad = decode(msg.data)
            except msgspec.DecodeError as exc:
                self._invalid(1, "undecodable", str(exc))
                await msg.term()
                continue
            if bad:
                self._invalid(bad, "out_of_bounds", f"{bad} of {bad + len(found)} records in {msg.subject}")
            records += found
            good.append(msg)
        if records:
            await self._commit(records)
        try:
            for msg in good:
                await msg.ack()
        except Exception as exc:  # committed, not acked: redelivered later, then skipped as duplicates
            self.logger.warning("requestlog_ack_failed", error=repr(exc), messages=len(good))

    async def _commit(self, records: list[RequestRecord]) -> None:
        """Write `records`, waiting out a database outage; what it refuses is isolated and dropped."""
        while True:
            try:
                added = await self._insert_isolating(records)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # PostgreSQL down, restarting, timing out: keep the batch, try again
                self.pg_errors += 1
                PG_ERRORS.inc()
                self.backoff = min(max(self.backoff * 2, 0.1), self.max_backoff_s)
                self.logger.warning("requestlog_write_failed", error=repr(exc), records=len(records),
                                    retry_in_s=self.backoff)
                await asyncio.sleep(self.backoff)
        self.backoff = 0.0
        repeated = len(records) - added  # already stored, or twice in this batch (redeliveries, republishes)
        self.rows_written += added
        self.duplicates += repeated
        ROWS.inc(added)
        DUPLICATES.inc(repeated)

    async def _insert_isolating(self, records: list[RequestRecord]) -> int:
        try:
            return await insert(self.pool, records, limit_s=self.write_timeout_s)
        except REFUSED as exc:
            if len(records) == 1:
                self._invalid(1, "refused", f"{type(exc).__name__}: {exc}", records[0].request_id)
                return 0
        half = len(records) // 2
        return await self._insert_isolating(records[:half]) + await self._insert_isolating(records[half:])

    def _invalid(self, n: int, reason: str, detail: str, request_id: str | None = None) -> None:
        self.invalid += n
        INVALID.inc(n)
        self.logger.warning("requestlog_records_dropped", reason=reason, count=n, detail=detail[:500],
                            request_id=request_id)


# ---- retention -----------------------------------------------------------------------------------------

CLEAR_BODIES: Final = """
UPDATE request_log SET request_body = NULL, response_body = NULL, expires_at = NULL
WHERE id IN (SELECT id FROM request_log WHERE expires_at <= now() LIMIT $1 FOR UPDATE SKIP LOCKED)
"""
DELETE_OLD: Final = """
DELETE FROM request_log
WHERE id IN (SELECT id FROM request_log WHERE ts < now() - make_interval(days => $1) LIMIT $2 FOR UPDATE SKIP LOCKED)
"""


async def _in_chunks(pool: asyncpg.Pool, sql: str, *args: Any, chunk: int) -> int:
    """Run `sql` (which touches at most `chunk` rows) until it touches fewer: short locks, no long transaction."""
    total = 0
    while True:
        status = await pool.execute(sql, *args, chunk)
        n = int(status.rsplit(" ", 1)[-1])
        total += n
        if n < chunk:
            return total


async def retention(pool: asyncpg.Pool, row_retention_days: int, *, chunk: int = 5000) -> RetentionReport:
    cleared = await _in_chunks(pool, CLEAR_BODIES, chunk=chunk)
    deleted = await _in_chunks(pool, DELETE_OLD, row_retention_days, chunk=chunk)
    CLEARED.inc(cleared)
    DELETED.inc(deleted)
    return RetentionReport(bodies_cleared=cleared, rows_deleted=deleted)


class Retention:
    """Runs `retention` at start and every `interval_s` (replicas may overlap: SKIP LOCKED shares the work)."""

    def __init__(self, pool: asyncpg.Pool, *, row_retention_days: int, interval_s: float) -> None:
        self.pool = pool
        self.row_retention_days = row_retention_days
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self.logger = log.get("metering")

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="requestlog-retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def run(self) -> RetentionReport:
        report = await retention(self.pool, self.row_retention_days)
        if report.bodies_cleared or report.rows_deleted:
            self.logger.info("requestlog_retention", **msgspec.to_builtins(report))
        return report

    async def _loop(self) -> None:
        while True:
            try:
                await self.run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # PostgreSQL away: the next round catches up
                self.logger.warning("requestlog_retention_failed", error=repr(exc))
            await asyncio.sleep(self.interval_s)


# ---- the query -----------------------------------------------------------------------------------------

_CURSOR = re.compile(r"^(-?\d{1,20}):(\d{1,20})$")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_COLUMNS = (
    "id, request_id, seq, ts, kind, model, version, provider, worker_id, key_id, tenant_id, attempts,"
    " fallbacks::text AS fallbacks, status, error_code, http_status, latency_ms, ttft_ms, prompt_tokens,"
    " completion_tokens, streamed, (request_body IS NOT NULL OR response_body IS NOT NULL) AS has_bodies,"
    " bodies_truncated, expires_at"
)
_fallbacks = msgspec.json.Decoder(list[Fallback])


def moment(value: float | str | None, param: str) -> dt.datetime | None:
    """Unix seconds (a number, or a numeric string) or ISO 8601 (UTC unless it says otherwise)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            try:
                when = dt.datetime.fromisoformat(text)
            except ValueError:
                raise invalid(f"{param} must be unix seconds or an ISO 8601 time, got {text!r}", param) from None
            return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)
    if not math.isfinite(value) or not 0 <= value <= 4_102_444_800:
        raise invalid(f"{param} must be unix seconds between 1970 and 2100, got {value}", param)
    return dt.datetime.fromtimestamp(value, dt.UTC)


def cursor_of(ts: dt.datetime, row_id: int) -> str:
    return f"{(ts - _EPOCH) // dt.timedelta(microseconds=1)}:{row_id}"


def parse_cursor(cursor: str) -> tuple[dt.datetime, int]:
    match = _CURSOR.match(cursor)
    if match is None:
        raise invalid("cursor is not one this service gave out: pass next_cursor as it was", "cursor")
    return _EPOCH + dt.timedelta(microseconds=int(match.group(1))), int(match.group(2))


def query_sql(q: RequestQuery) -> tuple[str, list[Any]]:
    args: list[Any] = []
    where: list[str] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    for col, value in (("key_id", q.key_id), ("tenant_id", q.tenant_id), ("model", q.model),
                       ("status", q.status), ("error_code", q.error_code)):
        if value is not None:
            where.append(f"{col} = {arg(value)}")
    since, until = moment(q.since, "since"), moment(q.until, "until")
    if since is not None and until is not None and since > until:
        raise invalid("since is after until", "since")
    if since is not None:
        where.append(f"ts >= {arg(since)}")
    if until is not None:
        where.append(f"ts < {arg(until)}")
    if q.cursor is not None:
        ts, row_id = parse_cursor(q.cursor)
        where.append(f"(ts, id) < ({arg(ts)}, {arg(row_id)})")
    bodies = ", request_body, response_body" if q.include_bodies else ""
    sql = (
        f"SELECT {_COLUMNS}{bodies} FROM request_log"
        f"{' WHERE ' + ' AND '.join(where) if where else ''}"
        f" ORDER BY ts DESC, id DESC LIMIT {arg(q.limit + 1)}"
    )
    return sql, args


def _iso(value: dt.datetime | None) -> str | None:
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z") if value is not None else None


def _view(r: asyncpg.Record, bodies: bool) -> RequestView:
    return RequestView(
        request_id=r["request_id"],
        seq=r["seq"],
        ts=r["ts"].timestamp(),
        time=_iso(r["ts"]) or "",
        kind=r["kind"],
        model=r["model"],
        version=r["version"],
        provider=r["provider"],
        worker_id=r["worker_id"],
        key_id=r["key_id"],
        tenant_id=r["tenant_id"],
        attempts=r["attempts"],
        fallbacks=_fallbacks.decode(r["fallbacks"]),
        status=r["status"],
        error_code=r["error_code"],
        http_status=r["http_status"],
        latency_ms=r["latency_ms"],
        ttft_ms=r["ttft_ms"],
        prompt_tokens=r["prompt_tokens"],
        completion_tokens=r["completion_tokens"],
        streamed=r["streamed"],
        has_bodies=r["has_bodies"],
        request_body=r["request_body"] if bodies else None,
        response_body=r["response_body"] if bodies else None,
        bodies_truncated=r["bodies_truncated"],
        bodies_expire_at=_iso(r["expires_at"]),
    )


async def query(pool: asyncpg.Pool, q: RequestQuery) -> RequestPage:
    sql, args = query_sql(q)
    rows = await pool.fetch(sql, *args)
    page = rows[: q.limit]
    more = len(rows) > q.limit
    return RequestPage(
        data=[_view(r, q.include_bodies) for r in page],
        next_cursor=cursor_of(page[-1]["ts"], page[-1]["id"]) if more else None,
    )
