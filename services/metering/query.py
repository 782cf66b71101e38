"""Usage queries over the rollups: validate, cut the window into whole days, hours and minutes, sum.

The window [since rounded down to the minute, until rounded up) is read from the coarsest rollups
that fit inside it: minute rows at the ragged edges, hour rows next, day rows in the middle (never
rows coarser than the time bucket grouped by: day, hour or minute). So a 30-day report reads a few
hundred rows per series, not 43,200.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from typing import Any, Final

import asyncpg

from contracts.errors import InferBusError, invalid
from contracts.usage import GROUPS, UsageQuery, UsageReport, UsageRow

SPANS: Final = ((86_400, "day"), (3_600, "hour"), (60, "minute"))
MAX_ROWS: Final = 50_000
SUMS: Final = (
    "requests",
    "cancelled",
    "failed",
    "prompt_tokens",
    "completion_tokens",
    "audio_seconds_in",
    "audio_seconds_out",
    "characters",
    "images",
    "cost_usd",
)
# What each sum is over the raw events (shadow copies are read from there: they have no rollups).
EVENT_SUMS: Final = {
    "requests": "count(*)",
    "cancelled": "count(*) FILTER (WHERE outcome = 'cancelled')",
    "failed": "count(*) FILTER (WHERE outcome NOT IN ('ok', 'cancelled'))",
    "prompt_tokens": "sum(prompt_tokens)",
    "completion_tokens": "sum(completion_tokens)",
    "audio_seconds_in": "sum(audio_seconds_in)",
    "audio_seconds_out": "sum(audio_seconds_out)",
    "characters": "sum(characters_out)",
    "images": "sum(images)",
    "cost_usd": "0",
}


def check(q: UsageQuery, now: float) -> tuple[int, int, list[str]]:
    """The window as whole minutes (unix seconds) and the group-by list, or a typed error."""
    until = now if q.until is None else q.until
    for name, value in (("since", q.since), ("until", until)):
        if not math.isfinite(value) or value < 0:
            raise invalid(f"{name} must be unix seconds (a finite number >= 0), got {value}", name)
    if q.since > until:
        raise invalid(f"since ({q.since}) is after until ({until})", "since")
    unknown = [g for g in q.group_by if g not in GROUPS]
    if unknown:
        raise invalid(f"cannot group by {', '.join(map(repr, unknown))}: choose from {', '.join(GROUPS)}", "group_by")
    if len(set(q.group_by)) != len(q.group_by):
        raise invalid("group_by lists a dimension twice", "group_by")
    for field, text in (("tenant_id", q.tenant_id), ("key_id", q.key_id), ("model", q.model)):
        if text is not None and len(text) > 256:
            raise invalid(f"{field} is too long", field)
    return math.floor(q.since / 60) * 60, math.ceil(until / 60) * 60, list(q.group_by)


def plan(start: int, end: int, spans: tuple[tuple[int, str], ...] = SPANS) -> list[tuple[str, int, int]]:
    """Cover [start, end) (whole minutes) with the fewest rollup buckets: (granularity, from, to) pieces."""
    if start >= end:
        return []
    (span, name), finer = spans[0], spans[1:]
    if not finer:
        return [(name, start, end)]
    first, last = -(-start // span) * span, end // span * span
    if first >= last:
        return plan(start, end, finer)
    return [*plan(start, first, finer), (name, first, last), *plan(last, end, finer)]


def _dims(groups: list[str], time_col: str, raw: bool) -> dict[str, str]:
    def dim(col: str) -> str:
        return f"coalesce({col}, '')" if raw else col

    exprs = {
        "tenant": dim("tenant_id"),
        "key": dim("key_id"),
        "model": "model",
        "kind": "kind",
        "day": f"date_bin('1 day', {time_col}, TIMESTAMPTZ 'epoch')",
        "hour": f"date_bin('1 hour', {time_col}, TIMESTAMPTZ 'epoch')",
        "minute": f"date_bin('1 minute', {time_col}, TIMESTAMPTZ 'epoch')",
        "batch": "batch_id IS NOT NULL" if raw else "batch",
    }
    return {g: exprs[g] for g in groups}


def _filters(q: UsageQuery, args: list[Any], raw: bool) -> list[str]:
    where = []
    for col, value in (("tenant_id", q.tenant_id), ("key_id", q.key_id), ("model", q.model)):
        if value is not None:
            args.append(value)
            target = f"coalesce({col}, '')" if raw and col != "model" else col
            where.append(f"{target} = ${len(args)}")
    return where


def _select(dims: dict[str, str], sums: list[str], source: str, where: list[str]) -> str:
    cols = [f"{expr} AS {name}" for name, expr in dims.items()] + sums
    group = f" GROUP BY {', '.join(dims)}" if dims else ""
    order = f" ORDER BY {', '.join(dims)}" if dims else ""
    return (
        f"SELECT {', '.join(cols)} FROM {source} WHERE {' AND '.join(where)}{group}"
        f" HAVING count(*) > 0{order} LIMIT {MAX_ROWS + 1}"
    )


def rollup_sql(q: UsageQuery, start: int, end: int, groups: list[str]) -> tuple[str, list[Any]]:
    # A rollup row is one bucket wide: grouping by a time bucket reads no coarser rows than it.
    finest = max((i for i, (_, name) in enumerate(SPANS) if name in groups), default=0)
    spans = SPANS[finest:]
    args: list[Any] = []
    pieces = []
    for granularity, lo, hi in plan(start, end, spans):
        args += [granularity, _ts(lo), _ts(hi)]
        n = len(args)
        pieces.append(f"(granularity = ${n - 2} AND bucket >= ${n - 1} AND bucket < ${n})")
    where = ["(" + " OR ".join(pieces or ["false"]) + ")", *_filters(q, args, raw=False)]
    sums = [f"coalesce(sum({s}), 0) AS {s}" for s in SUMS]
    return _select(_dims(groups, "bucket", raw=False), sums, "usage_rollups", where), args


def shadow_sql(q: UsageQuery, start: int, end: int, groups: list[str]) -> tuple[str, list[Any]]:
    args: list[Any] = [_ts(start), _ts(end)]
    where = ["shadow", "finished_at >= $1", "finished_at < $2", *_filters(q, args, raw=True)]
    sums = [f"coalesce({expr}, 0) AS {name}" for name, expr in EVENT_SUMS.items()]
    return _select(_dims(groups, "finished_at", raw=True), sums, "usage_events", where), args


def _ts(unix: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(unix, dt.UTC)


def _row(r: asyncpg.Record, groups: list[str], shadow: bool) -> UsageRow:
    dims: dict[str, Any] = {}
    for g in groups:
        if g == "day":
            dims["day"] = r["day"].astimezone(dt.UTC).strftime("%Y-%m-%d")
        elif g == "hour":
            dims["hour"] = r["hour"].astimezone(dt.UTC).strftime("%Y-%m-%dT%H:00:00Z")
        elif g == "minute":
            dims["minute"] = r["minute"].astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:00Z")
        else:
            dims[{"tenant": "tenant_id", "key": "key_id"}.get(g, g)] = r[g]
    return UsageRow(
        **dims,
        shadow=shadow,
        requests=int(r["requests"]),
        cancelled=int(r["cancelled"]),
        failed=int(r["failed"]),
        prompt_tokens=int(r["prompt_tokens"]),
        completion_tokens=int(r["completion_tokens"]),
        audio_seconds_in=float(r["audio_seconds_in"]),
        audio_seconds_out=float(r["audio_seconds_out"]),
        characters=int(r["characters"]),
        images=int(r["images"]),
        cost_usd=float(r["cost_usd"]),
    )


def totals(rows: list[UsageRow]) -> UsageRow:
    billed = [r for r in rows if not r.shadow]
    return UsageRow(**{s: sum(getattr(r, s) for r in billed) for s in SUMS})


async def run(pool: asyncpg.Pool, q: UsageQuery, now: float | None = None) -> UsageReport:
    start, end, groups = check(q, time.time() if now is None else now)
    queries = [(rollup_sql(q, start, end, groups), False)]
    if q.include_shadow:
        queries.append((shadow_sql(q, start, end, groups), True))
    rows: list[UsageRow] = []
    async with pool.acquire() as conn:
        for (sql, args), shadow in queries:
            records = await conn.fetch(sql, *args)
            if len(records) > MAX_ROWS:
                raise InferBusError(
                    "invalid_request",
                    f"the report would have more than {MAX_ROWS} rows: narrow the window, filter, or group by less",
                    param="group_by",
                )
            rows += [_row(r, groups, shadow) for r in records]
    return UsageReport(since=float(start), until=float(end), group_by=groups, rows=rows, totals=totals(rows))
