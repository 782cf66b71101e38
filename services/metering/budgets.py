"""What is left of each tenant's and key's budget this UTC day and month, by the ledger: gauges on a slow timer.

The gateway enforces budgets per request (Redis counters); this is the operators' view, for alerts on a
budget near exhaustion. Spend is the ledger's billed usage (the day rollups) and counts tokens the way the
gateway does: prompt + completion, and a second of audio as TOKENS_PER_AUDIO_SECOND tokens (summed per
rollup, so it may differ from the gateway's per-request rounding by a token a request). The budgets are the
gateway's (tenants.budget, api_keys.budget in the same database): until its tables exist nothing is shown.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterable
from typing import Final, NamedTuple

import asyncpg
import msgspec
from prometheus_client import Gauge

from contracts.tenancy import Budget
from services.runtime import logging as log

TOKENS_PER_AUDIO_SECOND: Final = 10  # as the gateway's governance counts audio against token budgets
# Labels spelt out in each (tests/test_infra.py reads them from the source): a tenant's own budget has key "".
REMAINING = Gauge(
    "inferbus_budget_remaining",
    "Budget left this UTC period, by the ledger (0 when spent)",
    ["tenant", "key", "period", "unit"],
)
LIMIT = Gauge(
    "inferbus_budget_limit", "The budget of this UTC period (tokens or USD)", ["tenant", "key", "period", "unit"]
)

BUDGETS: Final = """
SELECT id AS tenant_id, '' AS key_id, budget::text AS budget FROM tenants WHERE budget <> '{}'::jsonb
UNION ALL
SELECT tenant_id, id, budget::text FROM api_keys
WHERE budget <> '{}'::jsonb AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())
"""
# Per tenant and key: this day's and this month's tokens and USD, from the day rollups since the month began.
SPEND: Final = f"""
SELECT tenant_id, key_id,
    coalesce(sum(tokens) FILTER (WHERE bucket >= $2), 0) AS day_tokens,
    coalesce(sum(cost_usd) FILTER (WHERE bucket >= $2), 0) AS day_usd,
    sum(tokens) AS month_tokens, sum(cost_usd) AS month_usd
FROM (
    SELECT tenant_id, key_id, bucket, cost_usd,
        prompt_tokens + completion_tokens
        + ceil((audio_seconds_in + audio_seconds_out) * {TOKENS_PER_AUDIO_SECOND})::bigint AS tokens
    FROM usage_rollups
    WHERE granularity = 'day' AND bucket >= $1 AND (tenant_id = ANY($3) OR key_id = ANY($4))
) AS days
GROUP BY tenant_id, key_id
"""


class Left(NamedTuple):
    tenant: str
    key: str
    period: str  # "day" or "month"
    unit: str  # "tokens" or "usd"
    limit: float
    remaining: float


class Spend(NamedTuple):
    day_tokens: float = 0.0
    day_usd: float = 0.0
    month_tokens: float = 0.0
    month_usd: float = 0.0


def periods(now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The start of this UTC month and of this UTC day."""
    day = now.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day.replace(day=1), day


def remaining(tenant: str, key: str, budget: Budget, spent: Spend) -> list[Left]:
    """Every cap `budget` sets, with what `spent` leaves of it."""
    caps = (
        ("day", "tokens", budget.tokens_per_day, spent.day_tokens),
        ("month", "tokens", budget.tokens_per_month, spent.month_tokens),
        ("day", "usd", budget.usd_per_day, spent.day_usd),
        ("month", "usd", budget.usd_per_month, spent.month_usd),
    )
    return [
        Left(tenant, key, period, unit, float(cap), max(0.0, cap - used))
        for period, unit, cap, used in caps
        if cap is not None
    ]


async def read(pool: asyncpg.Pool, now: dt.datetime) -> list[Left]:
    """Every budget's remainder now; raises asyncpg.UndefinedTableError before the gateway made its tables."""
    month, day = periods(now)
    async with pool.acquire() as conn:
        budgets = []
        for r in await conn.fetch(BUDGETS):
            try:
                budgets.append((r["tenant_id"], r["key_id"], msgspec.json.decode(r["budget"], type=Budget)))
            except msgspec.ValidationError:  # not a budget this version knows: the gateway reports it
                continue
        if not budgets:
            return []
        tenants = sorted({t for t, k, _ in budgets if not k})
        keys = sorted({k for _, k, _ in budgets if k})
        rows = await conn.fetch(SPEND, month, day, tenants, keys)
    by_tenant: dict[str, list[float]] = {}
    by_key: dict[str, list[float]] = {}
    for r in rows:
        figures = [float(r[c]) for c in ("day_tokens", "day_usd", "month_tokens", "month_usd")]
        for table, who in ((by_tenant, r["tenant_id"]), (by_key, r["key_id"])):
            total = table.setdefault(who, [0.0] * 4)
            table[who] = [a + b for a, b in zip(total, figures, strict=True)]
    out: list[Left] = []
    for tenant, key, budget in budgets:
        spent = by_key.get(key) if key else by_tenant.get(tenant)
        out += remaining(tenant, key, budget, Spend(*spent) if spent else Spend())
    return out


class BudgetGauges:
    """Refreshes the gauges every `interval_s`; a budget that goes away takes its series with it."""

    def __init__(self, pool: asyncpg.Pool, interval_s: float) -> None:
        self.pool = pool
        self.interval_s = interval_s
        self.shown: set[tuple[str, str, str, str]] = set()
        self.logger = log.get("budgets")
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="budget-gauges")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def refresh(self) -> None:
        try:
            lefts = await read(self.pool, dt.datetime.now(dt.UTC))
        except asyncpg.UndefinedTableError:
            lefts = []  # no gateway tables in this database (yet): no budgets
        self.show(lefts)

    def show(self, lefts: Iterable[Left]) -> None:
        now_shown = set()
        for left in lefts:
            labels = (left.tenant, left.key, left.period, left.unit)
            REMAINING.labels(*labels).set(left.remaining)
            LIMIT.labels(*labels).set(left.limit)
            now_shown.add(labels)
        for labels in self.shown - now_shown:
            REMAINING.remove(*labels)
            LIMIT.remove(*labels)
        self.shown = now_shown

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
                if self._failing:
                    self.logger.info("budget_gauges_recovered")
                self._failing = False
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                if not self._failing:  # once per outage: the ledger's own errors say the rest
                    self.logger.warning("budget_gauges_failed", error=repr(exc))
                self._failing = True
            await asyncio.sleep(self.interval_s)
