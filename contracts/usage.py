"""Usage events: what a worker did for one request, published durably to the JetStream USAGE stream.

The worker that did the work publishes one event per request it accepted, whatever the outcome
(finished, failed part way, cancelled because the client left), with `Nats-Msg-Id` = request id so
JetStream drops a re-publish inside its duplicate window; the metering service writes it to
PostgreSQL with the request id as the key, so a redelivery is never counted twice.
"""

from __future__ import annotations

from typing import Final

import msgspec
from msgspec import Struct

from contracts.subjects import token

STREAM: Final = "USAGE"
SUBJECTS: Final = "usage.>"
DUPLICATE_WINDOW_S: Final = 120.0
MAX_AGE_S: Final = 30 * 24 * 3600.0  # kept for a month: a long metering outage loses nothing


def subject(kind: str, model: str) -> str:
    return f"usage.{kind}.{token(model)}"


class UsageEvent(Struct, frozen=True, kw_only=True, omit_defaults=True):
    request_id: str
    kind: str
    model: str
    version: str
    worker_id: str
    outcome: str  # "ok", "cancelled", or the error code the stream ended with
    started_at: float  # unix seconds: the worker received the request
    finished_at: float
    key_id: str | None = None
    tenant_id: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    audio_seconds_in: float = 0.0
    audio_seconds_out: float = 0.0
    characters_out: int = 0
    images: int = 0
    shadow: bool = False  # a shadow copy: recorded, never billed


event_encoder = msgspec.msgpack.Encoder()
event_decoder = msgspec.msgpack.Decoder(UsageEvent)


# ---- the metering service's admin requests (JSON, answered with contracts.control.Reply) -------

PRICES_SET: Final = "metering.admin.prices.set"
PRICES_LIST: Final = "metering.admin.prices.list"
USAGE_QUERY: Final = "metering.admin.usage.query"
PRICES_CHANGED: Final = "metering.prices.changed"  # broadcast after a price change: a PriceView
ANY_VERSION: Final = "*"
CURRENCY: Final = "USD"
GROUPS: Final = ("tenant", "key", "model", "kind", "day", "hour")


class SetPrice(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Price of a model version ('*': every version without a price of its own), from the next event on."""

    model: str
    version: str = ANY_VERSION
    input_per_1m: float = 0.0  # USD per million prompt tokens
    output_per_1m: float = 0.0  # USD per million completion tokens
    per_audio_second: float = 0.0  # USD per second of audio in or out
    per_image: float = 0.0  # USD per image
    currency: str = CURRENCY
    actor: str = "cli"


class ListPrices(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model: str | None = None


class PriceView(Struct, frozen=True, kw_only=True):
    model: str
    version: str
    input_per_1m: float
    output_per_1m: float
    per_audio_second: float
    per_image: float
    currency: str
    updated_at: str  # ISO 8601, UTC
    updated_by: str


class UsageQuery(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Usage between `since` and `until` (unix seconds; until defaults to now), one minute resolution.

    A minute counts when it starts in [since rounded down to the minute, until). Rows come from the
    rollups, which hold billed traffic only; `include_shadow` adds shadow copies as rows of their own.
    """

    since: float
    until: float | None = None
    tenant_id: str | None = None
    key_id: str | None = None
    model: str | None = None
    group_by: list[str] = []  # a subset of GROUPS; none: one row with the totals
    include_shadow: bool = False


class UsageRow(Struct, frozen=True, kw_only=True):
    # Dimensions not grouped by are null; a request without a tenant or key has "" there.
    tenant_id: str | None = None
    key_id: str | None = None
    model: str | None = None
    kind: str | None = None
    day: str | None = None  # YYYY-MM-DD (UTC)
    hour: str | None = None  # YYYY-MM-DDTHH:00:00Z
    shadow: bool = False  # shadow copies: never billed, never in the totals
    requests: int = 0
    cancelled: int = 0
    failed: int = 0  # ended with an error other than a cancel
    prompt_tokens: int = 0
    completion_tokens: int = 0
    audio_seconds_in: float = 0.0
    audio_seconds_out: float = 0.0
    characters: int = 0
    images: int = 0
    cost_usd: float = 0.0


class UsageReport(Struct, frozen=True, kw_only=True):
    since: float  # the window actually covered (whole minutes)
    until: float
    group_by: list[str]
    rows: list[UsageRow]
    totals: UsageRow  # billed traffic only
    currency: str = CURRENCY
