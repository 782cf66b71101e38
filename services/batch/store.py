"""The batch service's PostgreSQL: files, batches, per-line results, retries, webhooks and their deliveries."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator, Sequence
from typing import NamedTuple

import asyncpg

from contracts.batch import (
    BatchError,
    BatchErrors,
    BatchList,
    BatchObject,
    BatchUsage,
    Caller,
    Delivery,
    FileList,
    FileObject,
    RequestCounts,
    WebhookView,
)


def _unix(value: dt.datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def _iso(value: dt.datetime | None) -> str | None:
    return value.astimezone(dt.UTC).isoformat() if value is not None else None


def _at(unix: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(unix, dt.UTC)


def file_object(row: asyncpg.Record) -> FileObject:
    return FileObject(id=row["id"], bytes=row["bytes"], created_at=_unix(row["created_at"]) or 0,
                      filename=row["filename"], purpose=row["purpose"], expires_at=_unix(row["expires_at"]))


def batch_object(row: asyncpg.Record) -> BatchObject:
    errors = None
    if row["errors"]:
        errors = BatchErrors(data=[BatchError(**e) for e in json.loads(row["errors"])])
    usage = None
    if row["status"] in ("completed", "cancelled", "expired") or row["prompt_tokens"] or row["completion_tokens"]:
        usage = BatchUsage(input_tokens=row["prompt_tokens"], output_tokens=row["completion_tokens"],
                           total_tokens=row["prompt_tokens"] + row["completion_tokens"])
    models = list(row["models"])
    return BatchObject(
        id=row["id"], endpoint=row["endpoint"], input_file_id=row["input_file_id"],
        completion_window=row["completion_window"], status=row["status"], created_at=_unix(row["created_at"]) or 0,
        request_counts=RequestCounts(total=row["total"], completed=row["completed"], failed=row["failed"]),
        errors=errors, output_file_id=row["output_file_id"], error_file_id=row["error_file_id"],
        in_progress_at=_unix(row["in_progress_at"]), expires_at=_unix(row["expires_at"]),
        finalizing_at=_unix(row["finalizing_at"]), completed_at=_unix(row["completed_at"]),
        failed_at=_unix(row["failed_at"]), expired_at=_unix(row["expired_at"]),
        cancelling_at=_unix(row["cancelling_at"]), cancelled_at=_unix(row["cancelled_at"]),
        metadata=json.loads(row["metadata"]) if row["metadata"] else None,
        model=models[0] if len(models) == 1 else None, usage=usage,
    )


class Active(NamedTuple):
    """What a runner needs of a batch it executes."""

    id: str
    tenant_id: str
    key_id: str
    endpoint: str
    status: str
    expires_at: float
    total: int
    done: int


class Result(NamedTuple):
    batch_id: str
    line: int
    ok: bool
    record: bytes
    prompt_tokens: int
    completion_tokens: int


class Due(NamedTuple):
    event_id: str
    url: str
    payload: bytes
    attempts: int
    key_id: str
    created_at: dt.datetime


class Store:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # ---- files ---------------------------------------------------------------------------------

    async def add_file(self, file_id: str, caller: Caller | None, tenant_id: str, filename: str, purpose: str,
                       size: int, expires_at: float | None) -> FileObject:
        row = await self.pool.fetchrow(
            "INSERT INTO batch_files (id, tenant_id, key_id, filename, purpose, bytes, expires_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)"
            " ON CONFLICT (id) DO UPDATE SET bytes = EXCLUDED.bytes, deleted_at = NULL RETURNING *",
            file_id, tenant_id, caller.key_id if caller else None, filename, purpose, size,
            _at(expires_at) if expires_at is not None else None,
        )
        return file_object(row)

    async def file(self, tenant_id: str | None, file_id: str) -> FileObject | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM batch_files WHERE id = $1 AND deleted_at IS NULL AND ($2::text IS NULL OR tenant_id = $2)",
            file_id, tenant_id)
        return file_object(row) if row else None

    async def files(self, tenant_id: str, purpose: str | None, limit: int, after: str | None,
                    descending: bool) -> FileList:
        op, order = ("<", "DESC") if descending else (">", "ASC")
        rows = await self.pool.fetch(
            "SELECT * FROM batch_files f WHERE tenant_id = $1 AND deleted_at IS NULL"
            " AND ($2::text IS NULL OR purpose = $2)"
            f" AND ($3::text IS NULL OR (created_at, id) {op} (SELECT created_at, id FROM batch_files WHERE id = $3))"
            f" ORDER BY created_at {order}, id {order} LIMIT $4",
            tenant_id, purpose, after, limit + 1)
        data = [file_object(r) for r in rows[:limit]]
        return FileList(data=data, has_more=len(rows) > limit, first_id=data[0].id if data else None,
                        last_id=data[-1].id if data else None)

    async def delete_file(self, tenant_id: str, file_id: str) -> bool:
        return bool(await self.pool.fetchval(
            "UPDATE batch_files SET deleted_at = now() WHERE id = $1 AND tenant_id = $2 AND deleted_at IS NULL"
            " RETURNING true", file_id, tenant_id))

    async def expired_files(self, limit: int = 100) -> list[str]:
        rows = await self.pool.fetch(
            "UPDATE batch_files SET deleted_at = now() WHERE id IN (SELECT id FROM batch_files"
            " WHERE deleted_at IS NULL AND expires_at < now() LIMIT $1) RETURNING id", limit)
        return [r["id"] for r in rows]

    # ---- batches -------------------------------------------------------------------------------

    async def add_batch(self, batch_id: str, caller: Caller, endpoint: str, input_file_id: str, window: str,
                        expires_at: float, metadata: dict[str, str] | None, webhook_url: str | None) -> BatchObject:
        row = await self.pool.fetchrow(
            "INSERT INTO batches (id, tenant_id, key_id, scopes, endpoint, input_file_id, completion_window, status,"
            " metadata, expires_at, webhook_url) VALUES ($1, $2, $3, $4, $5, $6, $7, 'validating', $8, $9, $10)"
            " RETURNING *",
            batch_id, caller.tenant_id, caller.key_id, caller.scopes, endpoint, input_file_id, window,
            json.dumps(metadata) if metadata is not None else None, _at(expires_at), webhook_url)
        return batch_object(row)

    async def batch(self, tenant_id: str | None, batch_id: str) -> BatchObject | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM batches WHERE id = $1 AND ($2::text IS NULL OR tenant_id = $2)", batch_id, tenant_id)
        return batch_object(row) if row else None

    async def row(self, batch_id: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow("SELECT * FROM batches WHERE id = $1", batch_id)

    async def batches(self, tenant_id: str | None, limit: int, after: str | None,
                      status: str | None = None) -> BatchList:
        rows = await self.pool.fetch(
            "SELECT * FROM batches WHERE ($1::text IS NULL OR tenant_id = $1) AND ($4::text IS NULL OR status = $4)"
            " AND ($2::text IS NULL OR (created_at, id) < (SELECT created_at, id FROM batches WHERE id = $2))"
            " ORDER BY created_at DESC, id DESC LIMIT $3",
            tenant_id, after, limit + 1, status)
        data = [batch_object(r) for r in rows[:limit]]
        return BatchList(data=data, has_more=len(rows) > limit, first_id=data[0].id if data else None,
                         last_id=data[-1].id if data else None)

    async def active(self) -> list[Active]:
        rows = await self.pool.fetch(
            "SELECT id, tenant_id, key_id, endpoint, status, expires_at, total, completed + failed AS done"
            " FROM batches WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling')")
        return [Active(r["id"], r["tenant_id"], r["key_id"], r["endpoint"], r["status"], r["expires_at"].timestamp(),
                       r["total"], r["done"]) for r in rows]

    async def fail_validation(self, batch_id: str, errors: list[BatchError]) -> bool:
        body = json.dumps([{k: v for k, v in (("code", e.code), ("message", e.message), ("param", e.param),
                                               ("line", e.line)) if v is not None} for e in errors])
        return bool(await self.pool.fetchval(
            "UPDATE batches SET status = 'failed', failed_at = now(), errors = $2 WHERE id = $1"
            " AND status = 'validating' RETURNING true", batch_id, body))

    async def validated(self, batch_id: str, total: int, models: Sequence[str]) -> None:
        await self.pool.execute("UPDATE batches SET total = $2, models = $3 WHERE id = $1 AND status = 'validating'",
                                batch_id, total, list(models))

    async def enqueued(self, batch_id: str, lines: int) -> None:
        await self.pool.execute("UPDATE batches SET enqueued = greatest(enqueued, $2) WHERE id = $1", batch_id, lines)

    async def start(self, batch_id: str) -> bool:
        return bool(await self.pool.fetchval(
            "UPDATE batches SET status = 'in_progress', in_progress_at = now() WHERE id = $1 AND status = 'validating'"
            " RETURNING true", batch_id))

    async def cancel(self, tenant_id: str, batch_id: str) -> BatchObject | None:
        """Ask a running batch to stop; a finished one is returned as it is (OpenAI answers the same)."""
        row = await self.pool.fetchrow(
            "UPDATE batches SET status = 'cancelling', cancelling_at = now() WHERE id = $1 AND tenant_id = $2"
            " AND status IN ('validating', 'in_progress') RETURNING *", batch_id, tenant_id)
        if row is None:
            return await self.batch(tenant_id, batch_id)
        return batch_object(row)

    async def expire(self, now: float) -> list[str]:
        """Batches past their window: marked (status stays until finalized), ids returned."""
        rows = await self.pool.fetch(
            "UPDATE batches SET expired_at = now() WHERE status IN ('validating', 'in_progress')"
            " AND expires_at <= $1 AND expired_at IS NULL RETURNING id", _at(now))
        return [r["id"] for r in rows]

    # ---- results -------------------------------------------------------------------------------

    async def done_lines(self, batch_id: str, lines: list[int]) -> set[int]:
        rows = await self.pool.fetch(
            "SELECT line FROM batch_results WHERE batch_id = $1 AND line = ANY($2::int[])", batch_id, lines)
        return {r["line"] for r in rows}

    async def write(self, results: list[Result]) -> dict[str, tuple[int, int]]:
        """Store results (a line already answered is left as it is) and count the new ones in their batches, in
        one transaction; returns batch id -> (lines answered, lines in the batch) after it."""
        async with self.pool.acquire() as conn, conn.transaction():
            # A finished batch takes no more (a late run of one of its lines is dropped).
            rows = await conn.fetch(
                "INSERT INTO batch_results (batch_id, line, ok, record)"
                " SELECT u.* FROM unnest($1::text[], $2::int[], $3::bool[], $4::bytea[]) AS u (batch_id, line, ok, rec)"
                " JOIN batches b ON b.id = u.batch_id"
                " AND b.status IN ('validating', 'in_progress', 'finalizing', 'cancelling')"
                " ON CONFLICT (batch_id, line) DO NOTHING RETURNING batch_id, line",
                [r.batch_id for r in results], [r.line for r in results], [r.ok for r in results],
                [r.record for r in results])
            new = {(r["batch_id"], r["line"]) for r in rows}
            sums: dict[str, list[int]] = {}
            for r in results:
                if (r.batch_id, r.line) in new:
                    s = sums.setdefault(r.batch_id, [0, 0, 0, 0])
                    s[0 if r.ok else 1] += 1
                    s[2] += r.prompt_tokens
                    s[3] += r.completion_tokens
            out: dict[str, tuple[int, int]] = {}
            for batch_id in sorted({r.batch_id for r in results}):  # one order: concurrent writers never deadlock
                ok, failed, prompt, completion = sums.get(batch_id, [0, 0, 0, 0])
                row = await conn.fetchrow(
                    "UPDATE batches SET completed = completed + $2, failed = failed + $3,"
                    " prompt_tokens = prompt_tokens + $4, completion_tokens = completion_tokens + $5 WHERE id = $1"
                    " RETURNING completed + failed AS done, total", batch_id, ok, failed, prompt, completion)
                if row is not None:
                    out[batch_id] = (row["done"], row["total"])
            return out

    async def records(self, batch_id: str, ok: bool, page: int = 500) -> AsyncIterator[bytes]:
        """A batch's output (or error) records in the order they completed, a page at a time."""
        after = 0
        while True:
            rows = await self.pool.fetch(
                "SELECT done, record FROM batch_results WHERE batch_id = $1 AND ok = $2 AND done > $3"
                " ORDER BY done LIMIT $4", batch_id, ok, after, page)
            for r in rows:
                yield bytes(r["record"])
            if len(rows) < page:
                return
            after = rows[-1]["done"]

    async def count_results(self, batch_id: str) -> tuple[int, int]:
        row = await self.pool.fetchrow(
            "SELECT count(*) FILTER (WHERE ok) AS ok, count(*) FILTER (WHERE NOT ok) AS failed"
            " FROM batch_results WHERE batch_id = $1", batch_id)
        return row["ok"], row["failed"]

    async def retries(self, batch_id: str, lines: list[int]) -> dict[int, tuple[int, int]]:
        rows = await self.pool.fetch(
            "SELECT line, tries, attempt FROM batch_retries WHERE batch_id = $1 AND line = ANY($2::int[])",
            batch_id, lines)
        return {r["line"]: (r["tries"], r["attempt"]) for r in rows}

    async def retried(self, batch_id: str, line: int, tries: int, attempt: int) -> None:
        await self.pool.execute(
            "INSERT INTO batch_retries (batch_id, line, tries, attempt) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (batch_id, line) DO UPDATE SET tries = EXCLUDED.tries, attempt = EXCLUDED.attempt",
            batch_id, line, tries, attempt)

    # ---- finishing ------------------------------------------------------------------------------

    async def lock(self, conn: asyncpg.Connection, batch_id: str) -> bool:
        """A session lock on one batch's finalization (released when the connection closes)."""
        return bool(await conn.fetchval("SELECT pg_try_advisory_lock(hashtext('batch:' || $1))", batch_id))

    async def unlock(self, conn: asyncpg.Connection, batch_id: str) -> None:
        await conn.execute("SELECT pg_advisory_unlock(hashtext('batch:' || $1))", batch_id)

    async def finalizing(self, batch_id: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow(
            "UPDATE batches SET status = 'finalizing', finalizing_at = coalesce(finalizing_at, now()) WHERE id = $1"
            " AND status IN ('in_progress', 'finalizing') RETURNING *", batch_id)

    async def finish(self, conn: asyncpg.Connection, batch_id: str, status: str, output_file_id: str | None,
                     error_file_id: str | None, delivery: tuple[str, str, bytes] | None) -> None:
        """The terminal status, its file ids and (same transaction) the webhook delivery it owes."""
        column = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}[status]
        async with conn.transaction():
            row = await conn.fetchrow(
                f"UPDATE batches SET status = $2, {column} = coalesce({column}, now()), output_file_id = $3,"
                " error_file_id = $4 WHERE id = $1 RETURNING tenant_id, key_id", batch_id, status, output_file_id,
                error_file_id)
            await conn.execute("DELETE FROM batch_retries WHERE batch_id = $1", batch_id)
            await conn.execute("DELETE FROM batch_results WHERE batch_id = $1", batch_id)  # they are in the files now
            if delivery is not None and row is not None:
                await self.add_delivery(conn, batch_id, row["tenant_id"], row["key_id"], *delivery)

    async def add_delivery(self, conn: asyncpg.Connection, batch_id: str, tenant_id: str, key_id: str,
                           url: str, event_type: str, payload: bytes) -> None:
        event_id = json.loads(payload)["id"]
        await conn.execute(
            "INSERT INTO batch_deliveries (event_id, batch_id, tenant_id, key_id, type, url, payload)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (event_id) DO NOTHING",
            event_id, batch_id, tenant_id, key_id, event_type, url, payload)

    # ---- webhooks ------------------------------------------------------------------------------

    async def set_webhook(self, key_id: str, tenant_id: str, url: str | None, secret: str | None) -> WebhookView:
        row = await self.pool.fetchrow(
            "INSERT INTO batch_webhooks (key_id, tenant_id, url, secret) VALUES ($1, $2, $3, coalesce($4, ''))"
            " ON CONFLICT (key_id) DO UPDATE SET url = coalesce(EXCLUDED.url, batch_webhooks.url),"
            " secret = CASE WHEN $4::text IS NULL THEN batch_webhooks.secret ELSE EXCLUDED.secret END"
            " RETURNING *", key_id, tenant_id, url, secret)
        return WebhookView(key_id=row["key_id"], tenant_id=row["tenant_id"], url=row["url"],
                           created_at=_iso(row["created_at"]) or "")

    async def webhook(self, key_id: str) -> tuple[str | None, str] | None:
        row = await self.pool.fetchrow("SELECT url, secret FROM batch_webhooks WHERE key_id = $1", key_id)
        return (row["url"], row["secret"]) if row and row["secret"] else None

    async def webhooks(self, key_id: str | None) -> list[WebhookView]:
        rows = await self.pool.fetch(
            "SELECT * FROM batch_webhooks WHERE $1::text IS NULL OR key_id = $1 ORDER BY created_at", key_id)
        return [WebhookView(key_id=r["key_id"], tenant_id=r["tenant_id"], url=r["url"],
                            created_at=_iso(r["created_at"]) or "") for r in rows]

    async def delete_webhook(self, key_id: str) -> bool:
        return bool(await self.pool.fetchval("DELETE FROM batch_webhooks WHERE key_id = $1 RETURNING true", key_id))

    async def due(self, conn: asyncpg.Connection, limit: int) -> list[Due]:
        """Deliveries due now, locked for this transaction (replicas never send one twice at once)."""
        rows = await conn.fetch(
            "SELECT event_id, url, payload, attempts, key_id, created_at FROM batch_deliveries"
            " WHERE status = 'pending' AND next_at <= now() ORDER BY next_at LIMIT $1 FOR UPDATE SKIP LOCKED", limit)
        return [Due(r["event_id"], r["url"], bytes(r["payload"]), r["attempts"], r["key_id"], r["created_at"])
                for r in rows]

    async def delivered(self, conn: asyncpg.Connection, event_id: str, status: int | None, error: str | None,
                        ok: bool, next_in: float | None) -> None:
        new_status = "delivered" if ok else ("pending" if next_in is not None else "failed")
        await conn.execute(
            "UPDATE batch_deliveries SET attempts = attempts + 1, last_status = $2, last_error = $3, status = $4,"
            " delivered_at = CASE WHEN $4 = 'delivered' THEN now() END,"
            " next_at = now() + make_interval(secs => coalesce($5, 0)) WHERE event_id = $1",
            event_id, status, error, new_status, next_in)

    async def deliveries(self, batch_id: str | None, limit: int) -> list[Delivery]:
        rows = await self.pool.fetch(
            "SELECT * FROM batch_deliveries WHERE $1::text IS NULL OR batch_id = $1 ORDER BY created_at DESC LIMIT $2",
            batch_id, limit)
        return [Delivery(event_id=r["event_id"], type=r["type"], batch_id=r["batch_id"], url=r["url"],
                         status=r["status"], attempts=r["attempts"], created_at=_iso(r["created_at"]) or "",
                         last_status=r["last_status"], last_error=r["last_error"],
                         delivered_at=_iso(r["delivered_at"]),
                         next_attempt_at=_iso(r["next_at"]) if r["status"] == "pending" else None) for r in rows]

