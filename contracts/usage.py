"""Usage events: what a worker did for one attempt at a request, published durably to the JetStream USAGE stream.

The worker that did the work makes one event per attempt it accepted, whatever the outcome (finished,
failed part way, cancelled because the client left). A USAGE message holds one event (a msgpack map,
`Nats-Msg-Id` = `msg_id(event)`: request id and attempt) or, when a worker publishes a burst, up to
`MAX_MESSAGE_EVENTS` events of one subject (a msgpack array of them, `Nats-Msg-Id` = `batch_msg_id`,
derived from theirs), so JetStream drops a re-publish inside its duplicate window either way; `parts`
splits a message into its encoded events. The metering service writes each event to PostgreSQL keyed
on (request id, attempt), so a redelivery (or an event published again in another message) is never
counted twice and a retry on another worker is counted as the attempt it was. Decoding validates every
field: an event that fails is never written, it goes to the dead-letter stream (alone: the other events
of its message are written).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from typing import Annotated, Final, TypeVar

import msgspec
from msgspec import Meta, Struct

from contracts.llm import Attempt
from contracts.subjects import token

STREAM: Final = "USAGE"
SUBJECTS: Final = "usage.>"
DUPLICATE_WINDOW_S: Final = 120.0
MAX_AGE_S: Final = 30 * 24 * 3600.0  # kept for a month: a long metering outage loses nothing

# Where the metering service moves what it cannot write (undecodable, out of bounds, refused by the
# database, or delivered max_deliver times): kept for inspection (`inferbus usage dead-letters`).
DLQ_STREAM: Final = "USAGE_DLQ"
DLQ_SUBJECTS: Final = "usage_dlq.>"
DLQ_MAX_AGE_S: Final = 90 * 24 * 3600.0
# JetStream announces a usage message it stopped delivering (max_deliver) once, when it gives up; the
# announcements are kept here so one made while no metering process listened is still handled.
ADVISORY_STREAM: Final = "USAGE_ADVISORIES"
ADVISORY_SUBJECTS: Final = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{STREAM}.>"

# Bounds a worker's event always meets; anything outside is a forgery or a bug, never billed as is.
MAX_ID_CHARS: Final = 256  # request, key, tenant and worker ids; a worker refuses longer request ids
MAX_COUNT: Final = 1_000_000_000  # tokens or characters of one request
MAX_IMAGES: Final = 1_000_000
MAX_SECONDS: Final = 1_000_000.0  # audio seconds of one request (about 11 days)
MAX_UNIX: Final = 4_102_444_800.0  # 2100-01-01

Id = Annotated[str, Meta(min_length=1, max_length=MAX_ID_CHARS, pattern=r"\S")]
Name = Annotated[str, Meta(max_length=MAX_ID_CHARS)]
Count = Annotated[int, Meta(ge=0, le=MAX_COUNT)]
Seconds = Annotated[float, Meta(ge=0.0, le=MAX_SECONDS)]  # NaN fails every bound: rejected too
Unix = Annotated[float, Meta(ge=0.0, le=MAX_UNIX)]


def subject(kind: str, model: str) -> str:
    return f"usage.{kind}.{token(model)}"


def dlq_subject(source: str) -> str:
    """A dead letter's subject: the USAGE subject it came from, under usage_dlq."""
    return "usage_dlq." + (source.removeprefix("usage.") or "unknown")


class UsageEvent(Struct, frozen=True, kw_only=True, omit_defaults=True):
    request_id: Id
    kind: Name
    model: Name
    version: Name
    worker_id: Name
    outcome: Name  # "ok", "cancelled", or the error code the stream ended with
    started_at: Unix  # unix seconds: the worker received the request
    finished_at: Unix
    key_id: Name | None = None
    tenant_id: Name | None = None
    prompt_tokens: Count = 0
    completion_tokens: Count = 0
    audio_seconds_in: Seconds = 0.0
    audio_seconds_out: Seconds = 0.0
    characters_out: Count = 0
    images: Annotated[int, Meta(ge=0, le=MAX_IMAGES)] = 0
    shadow: bool = False  # a shadow copy: recorded, never billed
    attempt: Attempt = 0  # the request's attempt this event accounts for (contracts.llm.Attempt)
    # A batch line's batch (the request's Inferbus-Batch header, contracts.batch.BATCH_HEADER): batch work,
    # priced with the batch discount where the price table has one.
    batch_id: Name | None = None


def msg_id(event: UsageEvent) -> str:
    """The event's JetStream `Nats-Msg-Id`: one per attempt, so a retry's event is never a duplicate."""
    return f"{event.request_id}:{event.attempt}"


event_encoder = msgspec.msgpack.Encoder()
event_decoder = msgspec.msgpack.Decoder(UsageEvent)  # raises msgspec.ValidationError outside the bounds

T = TypeVar("T")

# A worker's message carries at most this many events (and stays under the server's max payload).
MAX_MESSAGE_EVENTS: Final = 128
_ARRAY_MARKERS: Final = frozenset({*range(0x90, 0xA0), 0xDC, 0xDD})  # fixarray, array 16, array 32
_array_decoder = msgspec.msgpack.Decoder(list[msgspec.Raw])


def msgpack_array(items: list[bytes]) -> bytes:
    """A msgpack array of already-encoded items."""
    n = len(items)
    if n < 16:
        head = bytes([0x90 | n])
    elif n < 1 << 16:
        head = b"\xdc" + struct.pack(">H", n)
    else:
        head = b"\xdd" + struct.pack(">I", n)
    return head + b"".join(items)


ARRAY_HEAD: Final = 5  # the most bytes a msgpack array's head takes


def array_chunks(items: list[T], size: Callable[[T], int], limit: int, most: int = 0) -> list[list[T]]:
    """`items` in order, cut into runs whose msgpack array (`msgpack_array`) stays within `limit` bytes and `most`
    items (0: any number); an item too big for `limit` alone is a run of its own."""
    chunks: list[list[T]] = []
    chunk: list[T] = []
    total = ARRAY_HEAD
    for item in items:
        n = size(item)
        if chunk and ((most and len(chunk) >= most) or total + n > limit):
            chunks.append(chunk)
            chunk, total = [], ARRAY_HEAD
        chunk.append(item)
        total += n
    if chunk:
        chunks.append(chunk)
    return chunks


def batch_msg_id(events: list[UsageEvent]) -> str:
    """The `Nats-Msg-Id` of a message of several events: the same events in the same order, the same id."""
    digest = hashlib.blake2b("\n".join(map(msg_id, events)).encode(), digest_size=16).hexdigest()
    return f"batch:{len(events)}:{digest}"


def parts(data: bytes) -> list[bytes]:
    """The encoded events of one USAGE message: the message itself (one event), or each of its array's items.
    Raises msgspec.DecodeError when an array is not decodable as one, or is empty."""
    if not data[:1] or data[0] not in _ARRAY_MARKERS:
        return [data]
    try:
        items = _array_decoder.decode(data)
    except RecursionError:  # arrays nested thousands deep: msgspec gives up by recursing too far
        raise msgspec.DecodeError("arrays nested too deep to be a message of usage events") from None
    if not items:
        raise msgspec.DecodeError("an empty array is no usage event")
    return [bytes(raw) for raw in items]


def events_of(data: bytes) -> list[UsageEvent]:
    """Every event of one USAGE message, validated (raises msgspec.DecodeError / ValidationError)."""
    return [event_decoder.decode(part) for part in parts(data)]


# ---- the metering service's admin requests (JSON, answered with contracts.control.Reply) -------

PRICES_SET: Final = "metering.admin.prices.set"
PRICES_LIST: Final = "metering.admin.prices.list"
USAGE_QUERY: Final = "metering.admin.usage.query"
PRICES_CHANGED: Final = "metering.prices.changed"  # broadcast after a price change: a PriceView
DEAD_LETTERS: Final = "metering.admin.dead_letters.list"
ANY_VERSION: Final = "*"
CURRENCY: Final = "USD"
GROUPS: Final = ("tenant", "key", "model", "kind", "day", "hour", "minute", "batch")


class SetPrice(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Price of a model version ('*': every version without a price of its own), from the next event on."""

    model: str
    version: str = ANY_VERSION
    input_per_1m: float = 0.0  # USD per million prompt tokens
    output_per_1m: float = 0.0  # USD per million completion tokens
    per_audio_second: float = 0.0  # USD per second of audio in or out
    per_image: float = 0.0  # USD per image
    batch_discount: float = 0.0  # the fraction taken off a batch line's cost: 0.5 is half price
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
    batch_discount: float = 0.0  # off a batch line's cost (SetPrice.batch_discount)


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
    minute: str | None = None  # YYYY-MM-DDTHH:MM:00Z
    batch: bool | None = None  # grouped by batch: batch lines (true) or interactive requests (false)
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


class ListDeadLetters(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    limit: Annotated[int, Meta(ge=1, le=1000)] = 100  # the most recent ones, newest first


class DeadLetter(Struct, frozen=True, kw_only=True):
    seq: int  # in USAGE_DLQ
    time: str  # ISO 8601, UTC: when it was dead-lettered
    reason: str  # "undecodable", "invalid", "refused" (by the database) or "max_deliver"
    detail: str  # what exactly: the validation error, the database's message
    subject: str  # the USAGE subject it was published to
    stream_seq: int  # its sequence in USAGE
    consumer: str  # the metering consumer that gave up on it
    deliveries: int
    size: int  # bytes; the message itself is kept in USAGE_DLQ as it was
    request_id: str | None = None  # when it could be read
    part: int | None = None  # one event of a worker's batch message: its place (0-based); None: the whole message


class DeadLetterReport(Struct, frozen=True, kw_only=True):
    total: int  # dead letters in the stream
    letters: list[DeadLetter]
