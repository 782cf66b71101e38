"""The per-request log: one record per request the edge served, batched to the JetStream REQUESTS stream.

The edge publishes a msgpack list of `RequestRecord`s per message (subject `requestlog.<kind>`); the
metering service writes each record once to PostgreSQL, keyed on (request id, seq), and answers
queries over it on `metering.admin.requests.query`. The log is for operators (what happened to a
request, which fallbacks it took, what it cost in time), not billing: that is the usage ledger.
Request and response bodies travel only when the key's or tenant's `log_bodies` asks for them, and
are kept `body_retention_days`, then cleared.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta, Struct

from contracts.tenancy import DEFAULT_LOG_RETENTION_DAYS, MAX_LOG_RETENTION_DAYS
from contracts.usage import MAX_ID_CHARS, Count, Id, Name, Unix

DUPLICATE_WINDOW_S: Final = 120.0
MAX_AGE_S: Final = 7 * 24 * 3600.0  # what the stream keeps: a week of metering outage loses nothing
MAX_BODY_CHARS: Final = 64 * 1024  # longer bodies are cut at the edge (`bodies_truncated`)
MAX_FALLBACKS: Final = 32
MAX_MS: Final = 7 * 24 * 3600 * 1000.0

Status = Literal["ok", "error"]
Millis = Annotated[float, Meta(ge=0.0, le=MAX_MS)]
Days = Annotated[int, Meta(ge=1, le=MAX_LOG_RETENTION_DAYS)]
Body = Annotated[str, Meta(max_length=MAX_BODY_CHARS)]


class Fallback(Struct, frozen=True, kw_only=True):
    """A route tried before the one that served (or before the request failed), and how it failed."""

    target: Name  # "model:version"
    code: Name  # the error code it failed with (contracts.errors)


class RequestRecord(Struct, frozen=True, kw_only=True, omit_defaults=True):
    request_id: Id
    ts: Unix  # unix seconds: the edge admitted the request
    kind: Name
    model: Name  # as the client asked for it (the alias)
    status: Status
    version: Name = ""  # the version that served ("" when none did)
    provider: Name | None = None  # the engine that served: llamacpp, benchmark, openai, anthropic, ...
    worker_id: Name | None = None
    key_id: Name | None = None
    tenant_id: Name | None = None
    attempts: Annotated[int, Meta(ge=0, le=1000)] = 1  # tries, retries on other workers included
    fallbacks: Annotated[list[Fallback], Meta(max_length=MAX_FALLBACKS)] = []
    error_code: Name | None = None
    http_status: Annotated[int, Meta(ge=0, le=999)] = 200  # 0: not an HTTP request (NATS edge, WebSocket)
    latency_ms: Millis = 0.0  # admitted to the last byte sent
    ttft_ms: Millis | None = None  # admitted to the first token sent (streams)
    prompt_tokens: Count = 0
    completion_tokens: Count = 0
    streamed: bool = False
    # Several records under one request id (a realtime session's responses): 0, 1, 2, ...
    seq: Annotated[int, Meta(ge=0, le=1_000_000)] = 0
    # Only when the key's (else the tenant's) `log_bodies` is on; cleared `body_retention_days` after `ts`.
    request_body: Body | None = None
    response_body: Body | None = None
    bodies_truncated: bool = False
    body_retention_days: Days = DEFAULT_LOG_RETENTION_DAYS


records_encoder = msgspec.msgpack.Encoder()
records_decoder = msgspec.msgpack.Decoder(list[RequestRecord])  # raises msgspec.ValidationError outside the bounds


# ---- the metering service's admin requests (JSON, answered with contracts.control.Reply) -------

REQUESTS_QUERY: Final = "metering.admin.requests.query"
REQUESTS_RETENTION: Final = "metering.admin.requests.retention"  # run the retention job now
MAX_LIMIT: Final = 1000


class RequestQuery(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Logged requests, newest first. `since`/`until`: unix seconds or ISO 8601 (UTC unless it says otherwise);
    `cursor`: the `next_cursor` of the page before (opaque)."""

    key_id: Annotated[str, Meta(max_length=MAX_ID_CHARS)] | None = None
    tenant_id: Annotated[str, Meta(max_length=MAX_ID_CHARS)] | None = None
    model: Annotated[str, Meta(max_length=MAX_ID_CHARS)] | None = None
    status: Status | None = None
    error_code: Annotated[str, Meta(max_length=MAX_ID_CHARS)] | None = None
    since: float | str | None = None
    until: float | str | None = None
    limit: Annotated[int, Meta(ge=1, le=MAX_LIMIT)] = 50
    cursor: Annotated[str, Meta(max_length=64)] | None = None
    include_bodies: bool = False


class RequestView(Struct, frozen=True, kw_only=True):
    request_id: str
    seq: int
    ts: float  # unix seconds
    time: str  # the same, ISO 8601 UTC
    kind: str
    model: str
    version: str
    provider: str | None
    worker_id: str | None
    key_id: str | None
    tenant_id: str | None
    attempts: int
    fallbacks: list[Fallback]
    status: str
    error_code: str | None
    http_status: int
    latency_ms: float
    ttft_ms: float | None
    prompt_tokens: int
    completion_tokens: int
    streamed: bool
    has_bodies: bool  # bodies are stored (shown only with include_bodies)
    request_body: str | None = None
    response_body: str | None = None
    bodies_truncated: bool = False
    bodies_expire_at: str | None = None  # ISO 8601 UTC


class RequestPage(Struct, frozen=True, kw_only=True):
    data: list[RequestView]
    next_cursor: str | None = None  # None: this is the last page


class RunRetention(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class RetentionReport(Struct, frozen=True, kw_only=True):
    bodies_cleared: int
    rows_deleted: int
