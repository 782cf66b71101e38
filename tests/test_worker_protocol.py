"""The worker's side of the streaming protocol, spoken to directly over NATS (no gateway)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from contracts import headers as h
from contracts import subjects
from contracts.errors import InferBusError
from contracts.llm import (
    Accepted,
    Bundle,
    Chunk,
    Delta,
    ErrorChunk,
    Final,
    GenerateRequest,
    Heartbeat,
    Message,
    chunk_decoder,
    request_encoder,
)
from services.runtime import bus
from services.runtime.local import EmbeddedStack, wait_worker
from services.runtime.streaming import StreamClient, unbundle
from tests.conftest import BENCH_MODEL, start_worker, worker_stats

QUEUED_MODEL = "bench-one-slot"


def _req(rid: str, n: int, model: str = BENCH_MODEL, **kw: Any) -> GenerateRequest:
    return GenerateRequest(request_id=rid, model=model, max_tokens=n, messages=[Message("user", "a b")], **kw)


async def _raw(nc: bus.Connection, subject: str, payload: bytes, limit: float = 10) -> list[Chunk]:
    """Every chunk of one stream, heartbeats included, until the terminal one."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subject, payload, reply=inbox)
    out: list[Chunk] = []
    try:
        while not out or not isinstance(out[-1], Final | ErrorChunk):
            out.append(chunk_decoder.decode((await sub.next_msg(timeout=limit)).data))
    finally:
        await sub.unsubscribe()
    return out


async def _bundled(nc: bus.Connection, model: str, request: GenerateRequest) -> list[bytes]:
    """The raw messages of one stream asked for with `Inferbus-Bundle: 1`, until the terminal chunk."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subjects.infer("llm", model, "v1"), request_encoder.encode(request), reply=inbox,
                     headers={h.BUNDLE: "1"})
    messages: list[bytes] = []
    try:
        while not messages or not isinstance(unbundle(chunk_decoder, messages[-1])[-1], Final | ErrorChunk):
            messages.append((await sub.next_msg(timeout=10)).data)
    finally:
        await sub.unsubscribe()
    return messages


@pytest.fixture(scope="module")
async def one_slot(infra: EmbeddedStack, nc: bus.Connection) -> AsyncIterator[dict[str, Any]]:
    proc = start_worker(infra, QUEUED_MODEL, engine_options={"tokens_per_s": 40, "capacity": 1}, heartbeat_s=0.2)
    stats = await wait_worker(nc, QUEUED_MODEL, proc)
    yield stats
    proc.stop()


async def test_stream_shape(nc: bus.Connection, bench_worker: dict[str, Any]) -> None:
    chunks = await _raw(nc, subjects.infer("llm", BENCH_MODEL, "v1"), request_encoder.encode(_req("shape-1", 100)))
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert isinstance(chunks[0], Accepted) and chunks[0].version == "v1"
    assert isinstance(chunks[-1], Final)
    assert sum(c.tokens for c in chunks if isinstance(c, Delta)) == 100 == chunks[-1].usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == 2


async def test_per_worker_subject(nc: bus.Connection, bench_worker: dict[str, Any]) -> None:
    subject = subjects.infer("llm", BENCH_MODEL, "v1", bench_worker["worker_id"])
    chunks = await _raw(nc, subject, request_encoder.encode(_req("direct-1", 3)))
    assert isinstance(chunks[0], Accepted) and chunks[0].worker_id == bench_worker["worker_id"]


async def test_undecodable_request_gets_error_chunk(nc: bus.Connection, bench_worker: dict[str, Any]) -> None:
    chunks = await _raw(nc, subjects.infer("llm", BENCH_MODEL, "v1"), b"\xc1garbage")
    assert len(chunks) == 1 and isinstance(chunks[0], ErrorChunk) and chunks[0].code == "invalid_request"
    again = await _raw(nc, subjects.infer("llm", BENCH_MODEL, "v1"), request_encoder.encode(_req("after-bad", 2)))
    assert isinstance(again[-1], Final)


async def test_stop_sequence_ends_stream(nc: bus.Connection, bench_worker: dict[str, Any]) -> None:
    chunks = await _raw(nc, subjects.infer("llm", BENCH_MODEL, "v1"),
                        request_encoder.encode(_req("stop-1", 50, stop=["tok tok"])))
    text = "".join(c.text for c in chunks if isinstance(c, Delta))
    assert text == " "
    assert isinstance(chunks[-1], Final) and chunks[-1].finish_reason == "stop"


async def test_queued_request_gets_heartbeats_then_runs(nc: bus.Connection, one_slot: dict[str, Any]) -> None:
    subject = subjects.infer("llm", QUEUED_MODEL, "v1")
    first = asyncio.create_task(_raw(nc, subject, request_encoder.encode(_req("q-1", 40, QUEUED_MODEL))))
    while (await worker_stats(nc, one_slot["worker_id"]))["in_flight"] == 0:
        pass
    second = await _raw(nc, subject, request_encoder.encode(_req("q-2", 4, QUEUED_MODEL)), limit=5)
    await first
    heartbeats = [c for c in second if isinstance(c, Heartbeat)]
    assert len(heartbeats) >= 2, "a queued request must keep its stream alive"
    assert [c.seq for c in second] == list(range(len(second)))
    assert isinstance(second[-1], Final) and second[-1].usage.completion_tokens == 4


async def test_cancel_subject_frees_the_slot(nc: bus.Connection, one_slot: dict[str, Any]) -> None:
    subject = subjects.infer("llm", QUEUED_MODEL, "v1")
    running = asyncio.create_task(_raw(nc, subject, request_encoder.encode(_req("c-1", 10_000, QUEUED_MODEL))))
    while (await worker_stats(nc, one_slot["worker_id"]))["in_flight"] == 0:
        pass
    await nc.publish(subjects.cancel("c-1"), b"")
    chunks = await asyncio.wait_for(running, 3)
    assert isinstance(chunks[-1], ErrorChunk) and chunks[-1].code == "cancelled"
    follow = await _raw(nc, subject, request_encoder.encode(_req("c-2", 2, QUEUED_MODEL)))
    assert isinstance(follow[-1], Final)


async def test_deadline_is_enforced(nc: bus.Connection, one_slot: dict[str, Any]) -> None:
    client = StreamClient(nc)
    await client.start()
    start = time.monotonic()
    with pytest.raises(InferBusError) as failure:
        async for _ in client.stream(subjects.infer("llm", QUEUED_MODEL, "v1"), _req("d-1", 10_000, QUEUED_MODEL),
                                     deadline=time.time() + 0.5):
            pass
    assert failure.value.code == "deadline_exceeded"
    assert time.monotonic() - start < 1.5


async def test_no_responders_is_immediate(nc: bus.Connection) -> None:
    client = StreamClient(nc)
    await client.start()
    start = time.monotonic()
    with pytest.raises(InferBusError) as failure:
        async for _ in client.stream(subjects.infer("llm", "nobody", "v1"), _req("n-1", 1, "nobody")):
            pass
    assert failure.value.code == "no_worker"
    assert time.monotonic() - start < 0.1


async def test_bundles_when_asked_a_short_answer_is_one_message(
    nc: bus.Connection, bench_worker: dict[str, Any]
) -> None:
    messages = await _bundled(nc, BENCH_MODEL, _req("bundled-1", 16))
    chunks = [c for m in messages for c in unbundle(chunk_decoder, m)]
    assert len(messages) == 1 and isinstance(chunk_decoder.decode(messages[0]), Bundle)
    assert isinstance(chunks[0], Accepted) and isinstance(chunks[-1], Final)
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert sum(c.tokens for c in chunks if isinstance(c, Delta)) == 16 == chunks[-1].usage.completion_tokens


async def test_bundles_keep_a_paced_stream_streaming(nc: bus.Connection, one_slot: dict[str, Any]) -> None:
    """Tokens that come apart still go out as they come: bundling never holds a token back for the next."""
    messages = await _bundled(nc, QUEUED_MODEL, _req("bundled-2", 8, QUEUED_MODEL))
    per_message = [unbundle(chunk_decoder, m) for m in messages]
    chunks = [c for m in per_message for c in m]
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert sum(isinstance(c, Delta) for c in chunks) == 8
    assert len(per_message) >= 8  # at 40 tokens/s each token is its own message (the last may share with Final)


async def test_bundles_coalesce_a_fast_stream(infra: EmbeddedStack, nc: bus.Connection) -> None:
    """Tokens that each take a loop turn but come faster than one per `ReplyStream.COALESCE_S` share messages."""
    proc = start_worker(infra, "bench-burst", engine_options={"tokens_per_s": 1e12})
    try:
        await wait_worker(nc, "bench-burst", proc)
        messages = await _bundled(nc, "bench-burst", _req("bundled-3", 32, "bench-burst"))
    finally:
        proc.stop()
    chunks = [c for m in messages for c in unbundle(chunk_decoder, m)]
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    deltas = [c for c in chunks if isinstance(c, Delta)]
    assert sum(d.tokens for d in deltas) == 32
    assert len(messages) < len(deltas)  # tokens that came apart share messages


async def test_publish_nowait_keeps_order_with_awaited_publishes(infra: EmbeddedStack, nc: bus.Connection) -> None:
    """The callback-safe publish (what a reply stream's flush uses) and nats-py's awaited one share one outbound
    buffer: interleaved, with and without headers, the messages arrive in the order they were made; where only
    nats-py's path may send (a payload over the server's limit, a closed connection) it sends nothing and says so."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        for i in range(40):
            if i % 3 == 0:
                await nc.publish(inbox, b"%d" % i)
            elif i % 3 == 1:
                assert bus.publish_nowait(nc, inbox, b"%d" % i, reply=f"r.{i}")
            else:
                assert bus.publish_nowait(nc, inbox, b"%d" % i, headers={"X-N": f"{i}\r\nX-Injected: 1"})
        got = [await sub.next_msg(timeout=5) for _ in range(40)]
        assert [int(m.data) for m in got] == list(range(40))
        assert [m.reply for m in got[1::3]] == [f"r.{i}" for i in range(1, 40, 3)]
        assert all(m.headers == {"X-N": f"{i}  X-Injected: 1"} for i, m in zip(range(2, 40, 3), got[2::3], strict=True))
        assert not bus.publish_nowait(nc, inbox, b"x" * (nc.max_payload + 1))
        await nc.publish(inbox, b"after")  # the refused one never reached the buffer
        assert (await sub.next_msg(timeout=5)).data == b"after"
    finally:
        await sub.unsubscribe()
    closed = await bus.connect(infra.nats_url, "tests-closed", identity=infra.identity())
    await closed.close()
    assert not bus.publish_nowait(closed, inbox, b"late")
