"""The worker side of the usage ledger: every usage event reaches JetStream, across outages and restarts.

The guarantee: an event the worker created is published until JetStream acknowledges it, however long
JetStream is away and however often the worker restarts, unless the spool's disk itself is lost.
- Publishing never sits on the reply path: `publish` appends the event to this process's spool file
  (written at once, so a crash of the process loses nothing; fsync'd by the background task, one
  flush per batch, before the batch is published) and to an in-memory queue that a background task
  publishes. A lone event travels as one message (`Nats-Msg-Id` = request id and attempt); a burst goes
  as one message per subject of up to `MAX_MESSAGE_EVENTS` events (contracts.usage): under load one
  JetStream store and acknowledgement per burst, not per request. A message JetStream did not
  acknowledge is sent again as it was (same events, same id), with backoff.
- The queue is bounded: past `usage_max_pending` unacknowledged events the worker admits no new
  requests (`overloaded`, and it reports itself not ready) until JetStream acknowledges some; the
  requests already running still finish and their events are kept. Nothing is ever dropped.
- On shutdown the queue is drained for the drain grace; what is left stays in the spool file, and the
  next worker started with the same spool directory (any model, any kind) publishes it at start.
- A replayed event JetStream already had is dropped by its dedup window or the ledger's key, so
  delivery to the ledger is exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import os
import re
import secrets
import struct
import time
import weakref
import zlib
from collections import deque
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Final, NamedTuple

import msgspec
from prometheus_client import Counter, Gauge

from contracts import subjects, usage
from contracts.usage import UsageEvent, event_decoder, event_encoder, msgpack_array
from services.runtime import bus, settings
from services.runtime import logging as log
from services.runtime.bus import direct

PUBLISHED = Counter("inferbus_usage_published_total", "Usage events acknowledged by JetStream", ["kind"])
RETRIES = Counter("inferbus_usage_publish_retries_total", "Usage events whose publish failed and was retried")
PENDING = Gauge("inferbus_usage_pending", "Usage events waiting for a JetStream acknowledgement")
REPLAYED = Counter("inferbus_usage_replayed_total", "Usage events found in a spool file at start and re-published")
SPOOL_ERRORS = Counter("inferbus_usage_spool_errors_total", "Spool file writes or flushes that failed")
FULL = Gauge("inferbus_usage_backlog_full", "1 while the usage backlog is full and the worker admits nothing")


class UsageSettings(msgspec.Struct, kw_only=True):
    """The worker side's settings: INFERBUS_USAGE_* (and INFERBUS_DATA_DIR), or the config file's [usage]."""

    nats_url: str = "nats://127.0.0.1:4222"
    data_dir: str = ".inferbus"  # as `inferbus up`'s
    usage_spool_dir: str = ""  # "": <data_dir>/usage-spool/<NATS server>; "off": no spool (memory only)
    usage_max_pending: int = 50_000  # unacknowledged events before the worker stops admitting requests

    def spool_directory(self) -> Path | None:
        if self.usage_spool_dir == "off":
            return None
        if self.usage_spool_dir:
            return Path(self.usage_spool_dir)
        # One directory per NATS deployment, so workers of two platforms sharing a data dir never
        # replay each other's events.
        servers = [u.split("://", 1)[-1].rsplit("@", 1)[-1] for u in self.nats_url.split(",")]
        return Path(self.data_dir) / "usage-spool" / re.sub(r"[^A-Za-z0-9.-]", "_", "+".join(servers))


async def ensure_stream(js: bus.JetStreamContext) -> None:
    """Create the USAGE stream if it does not exist (idempotent; several services may race to it)."""
    config = bus.StreamConfig(
        name=usage.STREAM,
        subjects=[usage.SUBJECTS],
        duplicate_window=usage.DUPLICATE_WINDOW_S,
        max_age=usage.MAX_AGE_S,
        description="InferBus usage events, one or a worker's burst per message (dedup on Nats-Msg-Id)",
    )
    await bus.ensure_stream(js, config)


class AckBatch:
    """The acknowledgements of one batch of publishes: each publish's result (None: stored; else the exception
    that stands for it) and one future, resolved when the last of them is in."""

    __slots__ = ("done", "left", "results", "tokens")

    def __init__(self, size: int) -> None:
        self.results: list[BaseException | None] = [_UNANSWERED] * size
        self.tokens: list[str | None] = [None] * size
        self.left = 0  # publishes sent whose acknowledgement has not come
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def settle(self, index: int, result: BaseException | None) -> None:
        if self.results[index] is not _UNANSWERED:
            return
        self.results[index] = result
        self.left -= 1
        if self.left == 0 and not self.done.done():
            self.done.set_result(None)


_UNANSWERED = TimeoutError("no JetStream acknowledgement within 2 s")  # a batch's results until answered


class Acks:
    """JetStream publishes whose acknowledgements come back on one direct inbox subscription.

    What `JetStreamContext.publish_async` does, minus its per-message costs (header validation, a
    semaphore, a future and its callback per message, a task hop per acknowledgement), which showed in the
    worker's profile: a batch's publishes share one `AckBatch`.
    """

    def __init__(self, nc: bus.Connection) -> None:
        self.nc = nc
        self.prefix = f"_INBOX.{secrets.token_hex(8)}"
        self.waiting: dict[str, tuple[AckBatch, int]] = {}
        self._next = 0
        self._sub: object | None = None

    async def publish(self, batch: AckBatch, index: int, subject: str, payload: bytes, msg_id: str) -> None:
        """Publish one message as `batch`'s `index`-th; its acknowledgement settles that place."""
        if self._sub is None:
            self._sub = await direct.subscribe(self.nc, self.prefix + ".*", self._on_ack)
        self._next += 1
        token = str(self._next)
        self.waiting[token] = (batch, index)
        batch.tokens[index] = token
        batch.left += 1
        try:
            await bus.publish(self.nc, subject, payload, reply=f"{self.prefix}.{token}", headers={MSG_ID: msg_id})
        except BaseException:
            self.waiting.pop(token, None)
            batch.tokens[index] = None
            batch.left -= 1
            raise

    def forget(self, batch: AckBatch) -> None:
        """Stop waiting for what `batch` has not heard back (a late acknowledgement is then ignored)."""
        for token in batch.tokens:
            if token is not None:
                self.waiting.pop(token, None)

    def _on_ack(self, msg: bus.Msg) -> None:
        entry = self.waiting.pop(msg.subject[len(self.prefix) + 1 :], None)
        if entry is None:
            return
        batch, index = entry
        if not msg.data:  # a status message: 503 when no stream takes the subject
            status = msg.headers.get("Status", "?") if msg.headers else "?"
            batch.settle(index, RuntimeError(f"JetStream did not store the event (status {status})"))
            return
        try:
            ack = _ACK.decode(msg.data)
        except msgspec.DecodeError as exc:
            batch.settle(index, exc)
            return
        batch.settle(index, RuntimeError(f"JetStream refused the event: {ack.error}") if ack.error is not None
                     else None)


class _PubAck(msgspec.Struct):
    stream: str = ""
    error: dict[str, object] | None = None


_ACK = msgspec.json.Decoder(_PubAck)
MSG_ID: Final = "Nats-Msg-Id"


class Envelope(NamedTuple):
    """One USAGE message: its events, sent again as they are until JetStream acknowledges it."""

    subject: str
    payload: bytes
    msg_id: str
    events: list[UsageEvent]


def pack(events: list[UsageEvent], max_payload: int, max_events: int = usage.MAX_MESSAGE_EVENTS) -> list[Envelope]:
    """The messages that carry `events`: one per subject (in the order they first appear), split at `max_events`
    events or where a message would pass `max_payload`; a message of one event is that event alone."""
    by_subject: dict[str, list[tuple[UsageEvent, bytes]]] = {}
    for event in events:
        by_subject.setdefault(usage.subject(event.kind, event.model), []).append((event, event_encoder.encode(event)))
    envelopes: list[Envelope] = []
    for subject, items in by_subject.items():
        # a lone event goes alone whatever its size
        for chunk in usage.array_chunks(items, lambda item: len(item[1]), max_payload - bus.HEADROOM, max_events):
            batch = [event for event, _ in chunk]
            if len(chunk) == 1:
                envelopes.append(Envelope(subject, chunk[0][1], usage.msg_id(batch[0]), batch))
            else:
                envelopes.append(Envelope(subject, msgpack_array([b for _, b in chunk]), usage.batch_msg_id(batch),
                                          batch))
    return envelopes


class _Unacked:
    """The events JetStream has not acknowledged (the outbox's, then the queued ones), without copying them."""

    __slots__ = ("publisher",)

    def __init__(self, publisher: UsagePublisher) -> None:
        self.publisher = publisher

    def __len__(self) -> int:
        return self.publisher.unacked

    def __iter__(self) -> Iterator[UsageEvent]:
        for envelope in self.publisher.outbox:
            yield from envelope.events
        yield from self.publisher.pending

    def __contains__(self, event: object) -> bool:
        return any(e is event for e in self)


class UsagePublisher:
    def __init__(
        self,
        js: bus.JetStreamContext,
        cfg: UsageSettings | None = None,
        *,
        window: int = 64,
        max_events: int = usage.MAX_MESSAGE_EVENTS,
        max_backoff_s: float = 2.0,
        group_commit_s: float = 0.01,
    ) -> None:
        cfg = cfg or settings.load(UsageSettings, "usage")
        self.js = js
        self.acks = Acks(js._nc)
        self._published = {kind: PUBLISHED.labels(kind) for kind in subjects.KINDS}  # bound once
        self.window = window  # messages in flight at once
        self.max_events = max_events  # events per message
        self.max_backoff_s = max_backoff_s
        # Group commit: under load, one spool fsync (and one burst of publishes) per this long, not per event.
        self.group_commit_s = group_commit_s
        self._last_sync = 0.0
        self.max_pending = cfg.usage_max_pending
        directory = cfg.spool_directory()
        self.spool = Spool(directory) if directory is not None else None
        self.pending: deque[UsageEvent] = deque()
        self._outbox: list[Envelope] = []  # packed, not yet acknowledged: sent again as they are
        self._outboxed = 0  # events in it (`full` is asked per request)
        self.published = 0
        self.replayed = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self.logger = log.get("usage")

    def start(self) -> None:
        """Open the spool (publishing what earlier workers left in it first), then start publishing."""
        if self.spool is not None:
            try:
                replayed = self.spool.open()
            except OSError as exc:
                self.logger.error("usage_spool_unavailable", directory=str(self.spool.directory), error=repr(exc))
                self.spool = None
            else:
                self.replayed = len(replayed)
                REPLAYED.inc(len(replayed))
                self._queue(replayed)
        # Read at scrape time: nothing to set per event on the request path.
        this = weakref.ref(self)
        PENDING.set_function(lambda: p.unacked if (p := this()) is not None else 0)
        FULL.set_function(lambda: 1 if (p := this()) is not None and p.full else 0)
        self._task = asyncio.create_task(self._run())

    @property
    def unacked(self) -> int:
        return len(self.pending) + self._outboxed

    @property
    def outbox(self) -> list[Envelope]:
        return self._outbox

    @outbox.setter
    def outbox(self, envelopes: list[Envelope]) -> None:
        self._outbox = envelopes
        self._outboxed = sum(len(e.events) for e in envelopes)

    @property
    def full(self) -> bool:
        """The backlog is at its bound: admit no new request until JetStream acknowledges some."""
        return self.unacked >= self.max_pending

    def publish(self, event: UsageEvent) -> None:
        if self.spool is not None:
            try:
                self.spool.append(event)
            except OSError as exc:  # disk full, say: the event is still published from memory
                SPOOL_ERRORS.inc()
                self.logger.error("usage_spool_write_failed", error=repr(exc), request_id=event.request_id)
        self._queue([event])

    def _queue(self, events: Iterable[UsageEvent]) -> None:
        self.pending.extend(events)
        if self.pending:
            self._idle.clear()
            self._wake.set()

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            if not self.outbox:
                if not self.pending:
                    self._idle.set()
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if self.spool is not None and self.spool.dirty:
                    wait = self._last_sync + self.group_commit_s - time.monotonic()
                    if wait > 0 and len(self.pending) < self.window * self.max_events:
                        await asyncio.sleep(wait)  # gather the events that arrive meanwhile into this commit
                    self._last_sync = time.monotonic()
                    try:
                        await asyncio.to_thread(self.spool.sync)
                    except OSError as exc:  # the events are still in the kernel's hands, and in memory
                        SPOOL_ERRORS.inc()
                        self.logger.error("usage_spool_sync_failed", error=repr(exc))
                count = min(len(self.pending), self.window * self.max_events)
                try:
                    self.outbox = pack(list(itertools.islice(self.pending, count)), self.acks.nc.max_payload,
                                       self.max_events)
                except Exception:  # a bug: the events stay queued (and spooled); try again after a back-off
                    self.logger.exception("usage_pack_failed", events=count)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.max_backoff_s)
                    continue
                for _ in range(count):
                    self.pending.popleft()
            sent = self.outbox[: self.window]
            results = await self._send_all(sent)
            failed = [e for e, r in zip(sent, results, strict=True) if isinstance(r, BaseException)]
            self.published += sum(len(e.events) for e, r in zip(sent, results, strict=True) if r is None)
            self.outbox = failed + self.outbox[self.window :]  # JetStream or NATS unreachable: sent again first
            if self.spool is not None:
                self._settle()
            if failed:
                RETRIES.inc(sum(len(e.events) for e in failed))
                self.logger.warning(
                    "usage_publish_retry",
                    failed=sum(len(e.events) for e in failed),
                    pending=self.unacked,
                    error=repr(next(r for r in results if isinstance(r, BaseException))),
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
            else:
                backoff = 0.05

    def _settle(self) -> None:
        assert self.spool is not None
        try:
            self.spool.settle(_Unacked(self))
        except OSError as exc:  # the file keeps events already acknowledged: replayed, then deduplicated
            self.logger.warning("usage_spool_settle_failed", error=repr(exc))

    async def _send_all(self, envelopes: list[Envelope]) -> list[object]:
        """Publish the messages without waiting in between, then wait for their acks under one timer (per
        message: None once JetStream stored it, or the exception that stands for its ack)."""
        acks = AckBatch(len(envelopes))
        for index, envelope in enumerate(envelopes):
            try:
                await self.acks.publish(acks, index, envelope.subject, envelope.payload, envelope.msg_id)
            except Exception as exc:  # not connected: this one (and likely the rest) is retried
                acks.results[index] = exc
        if acks.left:
            await asyncio.wait((acks.done,), timeout=2.0)
            self.acks.forget(acks)
        results: list[object] = list(acks.results)
        for envelope, result in zip(envelopes, results, strict=True):
            if result is None:  # a message's events share a subject, so a kind
                kind = envelope.events[0].kind
                (self._published.get(kind) or PUBLISHED.labels(kind)).inc(len(envelope.events))
        return results

    async def drain(self, grace_s: float) -> None:
        """Wait until every queued event is acknowledged (or `grace_s` passes: the rest stay in the spool)."""
        try:
            async with asyncio.timeout(grace_s):
                await self._idle.wait()
        except TimeoutError:
            self.logger.error(
                "usage_events_spooled" if self.spool is not None else "usage_events_unpublished",
                count=self.unacked,
                request_ids=[e.request_id for e in itertools.islice(_Unacked(self), 50)],
            )
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.spool is not None:
            self.spool.close(keep=self.unacked > 0)


# ---- the spool file ---------------------------------------------------------------------------

SUFFIX: Final = ".spool"
HEADER: Final = struct.Struct("<II")
MAX_RECORD: Final = 1 << 20


def frame(event: UsageEvent) -> bytes:
    payload = event_encoder.encode(event)
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def read_spool(path: Path) -> tuple[list[UsageEvent], int]:
    """The events in a spool file, and how many bytes at its end could not be read (a torn write)."""
    data = path.read_bytes()
    events: list[UsageEvent] = []
    at = 0
    while at + HEADER.size <= len(data):
        size, crc = HEADER.unpack_from(data, at)
        payload = data[at + HEADER.size : at + HEADER.size + size]
        if size > MAX_RECORD or len(payload) < size or zlib.crc32(payload) != crc:
            break
        try:
            events.append(event_decoder.decode(payload))
        except msgspec.DecodeError:
            break
        at += HEADER.size + size
    return events, len(data) - at


class Spool:
    """An append-only file of the events JetStream has not acknowledged yet, one per live publisher.

    Each publisher owns one file (`<pid>-<random>.spool`) and holds an exclusive `flock` on it, so a
    file nobody holds belongs to a publisher that is gone. At start a publisher adopts every such file
    in its directory: it copies their events into its own file (fsync'd) and only then deletes them, so
    a crash at any point leaves each event in at least one file. Re-publishing an event JetStream
    already has is harmless (the ledger's key drops it), so the file is cut lazily: emptied once it holds
    `truncate_bytes` and nothing is unacknowledged, or rewritten with only the unacknowledged events once
    it grows past `compact_bytes`. Not after every acknowledgement: on a lightly loaded worker that was an
    ftruncate per request on the event loop (0.1-5 ms on ext4 with online discard, measured in an embed
    worker at one client), for at most `truncate_bytes` of events replayed after a crash.
    A record is `<length u32><crc32 u32><msgpack UsageEvent>`; a torn tail ends a file's readable part.
    """

    def __init__(self, directory: Path, *, truncate_bytes: int = 64 << 10, compact_bytes: int = 8 << 20) -> None:
        self.directory = directory
        self.truncate_bytes = truncate_bytes
        self.compact_bytes = compact_bytes
        self.path = directory / f"{os.getpid()}-{secrets.token_hex(4)}{SUFFIX}"
        self.size = 0  # bytes in the file
        self.dirty = False  # appended since the last fsync
        self._fd = -1
        self.logger = log.get("usage")

    def open(self) -> list[UsageEvent]:
        """Create this publisher's file; adopt the files of publishers that are gone and return their events."""
        for tries_left in (1, 0):  # once more if a stopping publisher removed the directory meanwhile
            self.directory.mkdir(parents=True, exist_ok=True)
            try:
                self._fd = self._create(self.path)
                break
            except FileNotFoundError:
                if not tries_left:
                    raise
        adopted: list[UsageEvent] = []
        orphans: list[Path] = []
        for path in sorted(self.directory.glob("*" + SUFFIX)):
            events = None if path == self.path else self._read_orphan(path)
            if events is not None:
                adopted += events
                orphans.append(path)
        if adopted:
            self.append_all(adopted)
            self.sync()
        for path in orphans:  # only now: their events are on disk in our file
            path.unlink(missing_ok=True)
        if orphans:
            self._sync_directory()
            self.logger.info("usage_spool_adopted", files=len(orphans), events=len(adopted))
        return adopted

    def _read_orphan(self, path: Path) -> list[UsageEvent] | None:
        """The events of a file no live publisher holds; None while one does (or when it vanished)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            events, torn = read_spool(path)
        finally:
            os.close(fd)
        if torn:
            self.logger.warning("usage_spool_torn_tail", file=str(path), bytes=torn, events=len(events))
        return events

    @staticmethod
    def _create(path: Path) -> int:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd

    def append(self, event: UsageEvent) -> None:
        """Write one event: in the kernel's hands at once (a process crash loses nothing), on disk at the next sync."""
        self._write(frame(event))

    def append_all(self, events: Iterable[UsageEvent]) -> None:
        self._write(b"".join(frame(e) for e in events))

    def _write(self, record: bytes) -> None:
        os.write(self._fd, record)
        self.size += len(record)
        self.dirty = True

    def sync(self) -> None:
        """fsync what was appended (from a thread when on the event loop: it waits for the disk)."""
        self.dirty = False
        os.fsync(self._fd)

    def settle(self, unacked: Collection[UsageEvent]) -> None:
        """Forget what JetStream acknowledged: keep only `unacked` (call between publishes)."""
        if not unacked:
            if self.size and self.size >= self.truncate_bytes:
                os.ftruncate(self._fd, 0)
                self.size = 0
        elif self.size > self.compact_bytes:
            self._compact(unacked)

    def _compact(self, unacked: Iterable[UsageEvent]) -> None:
        fresh = self.path.with_suffix(".tmp")
        fd = self._create(fresh)
        record = b"".join(frame(e) for e in unacked)
        os.write(fd, record)
        os.fsync(fd)
        os.replace(fresh, self.path)
        os.close(self._fd)
        self._fd = fd
        self.size = len(record)
        self.dirty = False

    def close(self, *, keep: bool) -> None:
        """Close the file; delete it unless `keep` (its events are published by the next worker to start)."""
        if self._fd < 0:
            return
        if keep:
            os.fsync(self._fd)
        else:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = -1
        if not keep:
            with contextlib.suppress(OSError):  # not empty: another publisher's file is there
                self.directory.rmdir()

    def _sync_directory(self) -> None:
        with contextlib.suppress(OSError):
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
