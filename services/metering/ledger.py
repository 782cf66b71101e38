"""The usage ledger in PostgreSQL: a batch of events written once each, its rollups updated in the same statement.

(request id, attempt) is the key: an event already in the ledger (a JetStream redelivery, a re-publish
outside the duplicate window) inserts nothing and so adds nothing to the rollups, while each attempt
at a request (a retry on another worker before the first token) is a row of its own, priced for what
that attempt did. Shadow copies are recorded but never priced nor rolled up; failures on our side are
recorded but not priced. A batch line (an event with a batch id) costs its price less that price's
`batch_discount` fraction, and is rolled up apart from interactive traffic. The `usage_requests` view
shows one row per request: the final (highest) attempt's outcome, with every attempt's tokens and cost summed.
"""

from __future__ import annotations

from typing import Final

import asyncpg
import msgspec

from contracts.errors import CATALOGUE
from contracts.usage import UsageEvent

# Outcomes that are our fault: the client is not charged for them (a cancel is the client's choice).
UNBILLED_OUTCOMES: Final = frozenset(
    code for code, spec in CATALOGUE.items() if spec.type == "server_error" and code != "cancelled"
)

# One statement is one transaction: the events that were inserted (RETURNING) and only those feed the
# rollups. Rollup rows are upserted in key order so concurrent writers lock them in the same order.
WRITE_BATCH: Final = """
WITH batch AS (
    SELECT * FROM unnest(
        $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
        $9::float8[], $10::float8[], $11::int8[], $12::int8[], $13::float8[], $14::float8[], $15::int8[],
        $16::int4[], $17::bool[], $18::bool[], $19::int4[], $20::text[]
    ) AS b (request_id, kind, model, version, worker_id, outcome, tenant_id, key_id, started_at, finished_at,
            prompt_tokens, completion_tokens, audio_seconds_in, audio_seconds_out, characters_out, images,
            shadow, billed, attempt, batch_id)
),
inserted AS (
    INSERT INTO usage_events (request_id, attempt, kind, model, version, worker_id, outcome, tenant_id, key_id,
        started_at, finished_at, prompt_tokens, completion_tokens, audio_seconds_in, audio_seconds_out,
        characters_out, images, shadow, batch_id, cost_usd)
    SELECT b.request_id, b.attempt, b.kind, b.model, b.version, b.worker_id, b.outcome, b.tenant_id, b.key_id,
        to_timestamp(b.started_at), to_timestamp(b.finished_at), b.prompt_tokens, b.completion_tokens,
        b.audio_seconds_in, b.audio_seconds_out, b.characters_out, b.images, b.shadow, b.batch_id,
        CASE WHEN b.billed THEN
            ((b.prompt_tokens * coalesce(v.input_per_1m, a.input_per_1m, 0)
              + b.completion_tokens * coalesce(v.output_per_1m, a.output_per_1m, 0)) / 1000000
             + (b.audio_seconds_in + b.audio_seconds_out)::numeric * coalesce(v.per_audio_second, a.per_audio_second, 0)
             + b.images * coalesce(v.per_image, a.per_image, 0))
            * CASE WHEN b.batch_id IS NULL THEN 1 ELSE 1 - coalesce(v.batch_discount, a.batch_discount, 0) END
        ELSE 0 END
    FROM batch b
    LEFT JOIN prices v ON v.model = b.model AND v.version = b.version  -- this version's own price
    LEFT JOIN prices a ON a.model = b.model AND a.version = '*'  -- else the model's price for any version
    ON CONFLICT (request_id, attempt) DO NOTHING
    RETURNING kind, model, tenant_id, key_id, finished_at, outcome, shadow, prompt_tokens, completion_tokens,
        audio_seconds_in, audio_seconds_out, characters_out, images, cost_usd, batch_id
),
minutes AS (
    SELECT date_bin('1 minute', finished_at, TIMESTAMPTZ 'epoch') AS bucket, coalesce(tenant_id, '') AS tenant_id,
        coalesce(key_id, '') AS key_id, model, kind, batch_id IS NOT NULL AS batch, count(*) AS requests,
        count(*) FILTER (WHERE outcome = 'cancelled') AS cancelled,
        count(*) FILTER (WHERE outcome NOT IN ('ok', 'cancelled')) AS failed,
        sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
        sum(audio_seconds_in) AS audio_seconds_in, sum(audio_seconds_out) AS audio_seconds_out,
        sum(characters_out) AS characters, sum(images) AS images, sum(cost_usd) AS cost_usd
    FROM inserted WHERE NOT shadow
    GROUP BY 1, 2, 3, 4, 5, 6
),
rolled AS (
    INSERT INTO usage_rollups AS r (granularity, bucket, tenant_id, key_id, model, kind, batch, requests, cancelled,
        failed, prompt_tokens, completion_tokens, audio_seconds_in, audio_seconds_out, characters, images, cost_usd)
    SELECT g.name, date_bin(g.width, m.bucket, TIMESTAMPTZ 'epoch'), m.tenant_id, m.key_id, m.model, m.kind, m.batch,
        sum(m.requests), sum(m.cancelled), sum(m.failed), sum(m.prompt_tokens), sum(m.completion_tokens),
        sum(m.audio_seconds_in), sum(m.audio_seconds_out), sum(m.characters), sum(m.images), sum(m.cost_usd)
    FROM minutes m
    CROSS JOIN (VALUES ('minute', INTERVAL '1 minute'), ('hour', INTERVAL '1 hour'), ('day', INTERVAL '1 day'))
        AS g (name, width)
    GROUP BY 1, 2, 3, 4, 5, 6, 7
    ORDER BY 1, 2, 3, 4, 5, 6, 7
    ON CONFLICT (granularity, bucket, tenant_id, key_id, model, kind, batch) DO UPDATE SET
        requests = r.requests + EXCLUDED.requests,
        cancelled = r.cancelled + EXCLUDED.cancelled,
        failed = r.failed + EXCLUDED.failed,
        prompt_tokens = r.prompt_tokens + EXCLUDED.prompt_tokens,
        completion_tokens = r.completion_tokens + EXCLUDED.completion_tokens,
        audio_seconds_in = r.audio_seconds_in + EXCLUDED.audio_seconds_in,
        audio_seconds_out = r.audio_seconds_out + EXCLUDED.audio_seconds_out,
        characters = r.characters + EXCLUDED.characters,
        images = r.images + EXCLUDED.images,
        cost_usd = r.cost_usd + EXCLUDED.cost_usd
)
SELECT kind, model, shadow, count(*) AS events, sum(prompt_tokens) AS prompt_tokens,
    sum(completion_tokens) AS completion_tokens, sum(cost_usd) AS cost_usd
FROM inserted GROUP BY kind, model, shadow
"""


class Inserted(msgspec.Struct, frozen=True):
    """What one batch added to the ledger, per kind, model and shadow flag."""

    kind: str
    model: str
    shadow: bool
    events: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


class Written(msgspec.Struct, frozen=True):
    received: int
    inserted: list[Inserted]

    @property
    def events(self) -> int:
        return sum(g.events for g in self.inserted)

    @property
    def duplicates(self) -> int:
        return self.received - self.events


def columns(events: list[UsageEvent]) -> list[list[object]]:
    """The batch as one array per column (first event of an attempt wins), in WRITE_BATCH's order.

    Sorted by key, so concurrent writers take the events' key locks in the same order.
    """
    first = {(e.request_id, e.attempt): e for e in reversed(events)}
    unique = [first[key] for key in sorted(first)]
    return [
        [e.request_id for e in unique],
        [e.kind for e in unique],
        [e.model for e in unique],
        [e.version for e in unique],
        [e.worker_id for e in unique],
        [e.outcome for e in unique],
        [e.tenant_id for e in unique],
        [e.key_id for e in unique],
        [e.started_at for e in unique],
        [e.finished_at for e in unique],
        [e.prompt_tokens for e in unique],
        [e.completion_tokens for e in unique],
        [e.audio_seconds_in for e in unique],
        [e.audio_seconds_out for e in unique],
        [e.characters_out for e in unique],
        [e.images for e in unique],
        [e.shadow for e in unique],
        [not e.shadow and e.outcome not in UNBILLED_OUTCOMES for e in unique],
        [e.attempt for e in unique],
        [e.batch_id for e in unique],
    ]


async def write(pool: asyncpg.Pool, events: list[UsageEvent], *, limit_s: float | None = None) -> Written:
    """Write `events` in one transaction; raises (nothing written) when PostgreSQL fails."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(WRITE_BATCH, *columns(events), timeout=limit_s)
    return Written(
        received=len(events),
        inserted=[
            Inserted(
                kind=r["kind"],
                model=r["model"],
                shadow=r["shadow"],
                events=r["events"],
                prompt_tokens=int(r["prompt_tokens"]),
                completion_tokens=int(r["completion_tokens"]),
                cost_usd=float(r["cost_usd"]),
            )
            for r in rows
        ],
    )
