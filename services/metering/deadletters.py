"""The usage dead-letter stream: messages the ledger cannot take, moved aside with why, so the rest flows.

A message goes to USAGE_DLQ (subject `usage_dlq.<kind>.<model>`, body as it was, the reason in
headers) and only then is terminated on USAGE, so nothing is lost between the two: if the move fails
the message stays unacked and comes back. `Nats-Msg-Id` = consumer and USAGE sequence, so moving the
same delivery twice (a crash between the two steps) stores it once. One bad event of a worker's batch
message is copied alone (its body that event, `Inferbus-Dlq-Part` its place, the id suffixed with it)
and the message is acked once its other events are written.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
from typing import Any, Final

import msgspec
from prometheus_client import Counter

from contracts import usage
from contracts.usage import DeadLetter, DeadLetterReport
from services.runtime import bus
from services.runtime import logging as log

DEAD_LETTERS = Counter(
    "inferbus_metering_dead_letters_total", "Usage messages moved to the dead-letter stream", ["reason"]
)
REASON: Final = "Inferbus-Dlq-Reason"
DETAIL: Final = "Inferbus-Dlq-Detail"
SUBJECT: Final = "Inferbus-Dlq-Subject"
SEQ: Final = "Inferbus-Dlq-Stream-Seq"
CONSUMER: Final = "Inferbus-Dlq-Consumer"
DELIVERIES: Final = "Inferbus-Dlq-Deliveries"
REQUEST_ID: Final = "Inferbus-Dlq-Request-Id"
PART: Final = "Inferbus-Dlq-Part"  # the event's place in a worker's batch message (0-based); absent: the whole message
DETAIL_MAX: Final = 500
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


async def ensure_stream(js: bus.JetStreamContext) -> None:
    """The dead-letter stream, and the one that keeps JetStream's max_deliver advisories for USAGE."""
    for name, subject, description in (
        (usage.DLQ_STREAM, usage.DLQ_SUBJECTS,
         "InferBus usage messages the ledger could not take (see the Inferbus-Dlq-* headers)"),
        (usage.ADVISORY_STREAM, usage.ADVISORY_SUBJECTS,
         "JetStream's max_deliver advisories for USAGE, kept until metering has moved each message"),
    ):
        config = bus.StreamConfig(name=name, subjects=[subject], max_age=usage.DLQ_MAX_AGE_S, description=description)
        await bus.ensure_stream(js, config)


class _Named(msgspec.Struct):
    request_id: Any = None


_named = msgspec.msgpack.Decoder(_Named)


def request_id_of(data: bytes) -> str | None:
    """The request id of a message that is not a valid event, when one can be read."""
    try:
        rid = _named.decode(data).request_id
    except msgspec.DecodeError:
        return None
    return rid[: usage.MAX_ID_CHARS] if isinstance(rid, str) and rid else None


def printable(text: str) -> str:
    """`text` fit for a header value: control characters (NUL, CR, LF, ...) shown as '?'."""
    return _CONTROL.sub("?", text)


def advisory_subject(consumer: str) -> str:
    """Where JetStream announces a message it stopped delivering to `consumer` (max_deliver reached)."""
    return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{usage.STREAM}.{consumer}"


class DeadLetters:
    def __init__(self, js: bus.JetStreamContext, consumer: str) -> None:
        self.js = js
        self.consumer = consumer
        self.moved = 0
        self.logger = log.get("metering")

    async def move(self, msg: bus.Msg, reason: str, detail: str, request_id: str | None = None) -> bool:
        """Copy `msg` to the dead-letter stream, then terminate it; False (left unacked) when the copy failed."""
        meta = msg.metadata
        seq = meta.sequence.stream
        if not await self._store(msg.subject, msg.data, seq, meta.num_delivered, reason, detail, request_id):
            return False
        try:
            await msg.term()
        except Exception as exc:  # redelivered, then moved again: the stream keeps one copy
            self.logger.warning("term_failed", error=repr(exc), stream_seq=seq)
        return True

    async def copy_part(
        self, msg: bus.Msg, index: int, size: int, data: bytes, reason: str, detail: str, request_id: str | None = None
    ) -> bool:
        """Copy event `index` (of `size`) of a worker's batch message to the dead-letter stream, as a message of its
        own; the batch message is not terminated (its other events are written). False when the copy failed."""
        meta = msg.metadata
        seq = meta.sequence.stream
        return await self._store(msg.subject, data, seq, meta.num_delivered, reason,
                                 f"event {index + 1} of {size} in the message: {detail}", request_id, part=index)

    async def on_max_deliveries(self, advisory: bus.Msg) -> bool:
        """JetStream gave up on a message (no delivery ended in an ack or a term: a crash each time): keep it.

        True when the advisory is dealt with (the message stored, or nothing left to store); False to see it again.
        """
        try:
            body = json.loads(advisory.data)
            seq, deliveries = int(body["stream_seq"]), int(body.get("deliveries", 0))
        except Exception as exc:
            self.logger.error("max_deliveries_advisory_invalid", error=repr(exc), advisory=advisory.data[:200])
            return True
        try:
            raw = await self.js.get_msg(usage.STREAM, seq)
        except bus.js_errors.NotFoundError:  # aged out of USAGE meanwhile: nothing left to keep
            self.logger.error("max_deliveries_message_gone", stream_seq=seq)
            return True
        except Exception as exc:
            self.logger.warning("max_deliveries_advisory_failed", error=repr(exc), stream_seq=seq)
            return False
        data = raw.data or b""
        detail = f"JetStream stopped delivering it after {deliveries} deliveries without an ack"
        return await self._store(raw.subject or "", data, seq, deliveries, "max_deliver", detail, request_id_of(data))

    async def follow_advisories(self, durable: str) -> None:
        """Handle this consumer's max_deliver advisories from their stream, each acked once handled (replicas
        share the durable, so each advisory is handled by one of them, and none is lost while all are down)."""
        sub = await self.js.pull_subscribe(
            advisory_subject(self.consumer), durable=durable, stream=usage.ADVISORY_STREAM
        )
        while True:
            try:
                msgs = await sub.fetch(16, timeout=5)
            except (TimeoutError, bus.errors.TimeoutError):
                continue
            except Exception as exc:  # NATS away: fetch again once it is back
                self.logger.warning("advisory_fetch_failed", error=repr(exc))
                await asyncio.sleep(1)
                continue
            for msg in msgs:
                if await self.on_max_deliveries(msg):
                    await msg.ack()
                else:
                    await msg.nak(delay=1)

    async def _store(
        self, subject: str, data: bytes, seq: int, deliveries: int, reason: str, detail: str, request_id: str | None,
        part: int | None = None,
    ) -> bool:
        detail = printable(" ".join(detail.split()))[:DETAIL_MAX]  # a header value is one line
        headers = {
            "Nats-Msg-Id": f"{self.consumer}:{seq}" if part is None else f"{self.consumer}:{seq}:{part}",
            REASON: reason,
            DETAIL: detail,
            SUBJECT: subject,
            SEQ: str(seq),
            CONSUMER: self.consumer,
            DELIVERIES: str(deliveries),
        }
        if request_id:
            headers[REQUEST_ID] = printable(request_id)
        if part is not None:
            headers[PART] = str(part)
        try:
            ack = await self.js.publish(usage.dlq_subject(subject), data, headers=headers, timeout=5.0)
        except Exception as exc:
            self.logger.warning("dead_letter_failed", error=repr(exc), stream_seq=seq)
            return False
        if ack.duplicate:
            return True
        self.moved += 1
        DEAD_LETTERS.labels(reason).inc()
        self.logger.error(
            "usage_dead_lettered", reason=reason, detail=detail, subject=subject, stream_seq=seq,
            request_id=request_id, deliveries=deliveries,
        )
        return True


async def recent(js: bus.JetStreamContext, limit: int) -> DeadLetterReport:
    """The newest `limit` dead letters, newest first."""
    try:
        info = await js.stream_info(usage.DLQ_STREAM)
    except bus.js_errors.NotFoundError:
        return DeadLetterReport(total=0, letters=[])
    letters: list[DeadLetter] = []
    seq = info.state.last_seq
    while seq >= max(info.state.first_seq, 1) and len(letters) < limit:
        try:
            raw = await js.get_msg(usage.DLQ_STREAM, seq)
        except bus.js_errors.NotFoundError:  # deleted, or aged out meanwhile
            seq -= 1
            continue
        letters.append(_letter(raw.seq or seq, raw.time, raw.headers or {}, len(raw.data or b"")))
        seq -= 1
    return DeadLetterReport(total=info.state.messages, letters=letters)


def _letter(seq: int, when: dt.datetime | None, headers: dict[str, Any], size: int) -> DeadLetter:
    return DeadLetter(
        seq=seq,
        time=(when or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).isoformat(),
        reason=headers.get(REASON, "unknown"),
        detail=headers.get(DETAIL, ""),
        subject=headers.get(SUBJECT, ""),
        stream_seq=int(headers.get(SEQ, 0)),
        consumer=headers.get(CONSUMER, ""),
        deliveries=int(headers.get(DELIVERIES, 0)),
        size=size,
        request_id=headers.get(REQUEST_ID),
        part=int(headers[PART]) if PART in headers else None,
    )
