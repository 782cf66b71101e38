"""/v1/realtime with the openai SDK's own realtime client: speech in, transcript, text and audio out, barge-in."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import numpy as np
import pytest
from openai import AsyncOpenAI

from contracts import usage
from contracts.usage import UsageEvent
from services.runtime import bus
from services.runtime.local import EmbeddedStack, ServiceProcess
from tests.conftest import ADMIN_KEY, Gateway, start_worker

RATE = 24_000
FRAME = RATE // 50  # 20 ms
BARGE_MODEL = "rt-chatty"
# No sentence ends: after its first clause the gateway sends it to the TTS in pieces of MAX_SENTENCE_CHARS,
# which come faster than they can be spoken, so once the second piece went out (by the 6th token) the TTS
# worker is always busy with one: a barge-in after the 8th token always catches it.
BARGE_TOKEN = " yes I am here, and I am listening"


async def wait_ready(nc: bus.Connection, service: str, proc: ServiceProcess, limit_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        proc.check_alive()
        for data in await bus.service_stats(nc, service, wait=0.2):
            if data.get("pid") == proc.pid and data.get("ready"):
                return data
    raise TimeoutError(f"{service} not ready:\n{proc.log()[-3000:]}")


async def stats_of(nc: bus.Connection, service: str, pid: int) -> dict[str, Any]:
    for data in await bus.service_stats(nc, service, wait=0.3):
        if data.get("pid") == pid:
            return data
    raise LookupError(service)


@pytest.fixture(scope="module")
async def speech(infra: EmbeddedStack, nc: bus.Connection) -> AsyncIterator[dict[str, ServiceProcess]]:
    procs = {
        "asr": ServiceProcess("asr", "services.speech.asr", infra.env(), infra.root),
        "tts": ServiceProcess("tts", "services.speech.tts", infra.env(), infra.root),
        # An LLM that talks in sentences faster than they can be spoken, for as long as it is let: the
        # TTS worker is always busy, so an interruption always catches both mid-request.
        "llm": start_worker(infra, BARGE_MODEL, engine_options={"tokens_per_s": 100, "token_text": BARGE_TOKEN}),
    }
    try:
        await wait_ready(nc, "inferbus-asr", procs["asr"])
        await wait_ready(nc, "inferbus-tts", procs["tts"])
        await wait_ready(nc, "inferbus-llm", procs["llm"])
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


def speech_pcm(text: str) -> bytes:
    from hibari import Hibari

    audio = np.asarray(Hibari()(text), dtype=np.float32)
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def frames(pcm: bytes) -> list[str]:
    step = FRAME * 2
    return [base64.b64encode(pcm[i : i + step]).decode() for i in range(0, len(pcm), step)]


SILENCE = bytes(RATE * 2)  # one second


def client(gateway: Gateway, key: str = ADMIN_KEY) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key)


async def new_key(gateway: Gateway, name: str, **fields: Any) -> tuple[str, str]:
    async with aiohttp.ClientSession() as http, http.post(
        f"{gateway.url}/v1/admin/keys", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, json={"name": name, **fields}
    ) as resp:
        assert resp.status == 201, await resp.text()
        body = await resp.json()
    return body["key"], body["info"]["id"]


async def events_until(conn: Any, done: Any, limit_s: float = 60) -> list[Any]:
    seen = []
    async with asyncio.timeout(limit_s):
        async for event in conn:
            seen.append(event)
            if done(event):
                return seen
    raise AssertionError(f"connection ended after {[e.type for e in seen]}")


async def test_voice_turn_with_the_sdk_client(
    gateway: Gateway, speech: dict[str, ServiceProcess], default_worker: dict[str, Any], nc: bus.Connection
) -> None:
    pcm = speech_pcm("What is the capital of France?")
    async with client(gateway).realtime.connect(model="smollm2-135m-instruct") as conn:
        created = await conn.recv()
        assert created.type == "session.created"
        # temperature (a beta session field) 0: a greedy answer the test can check.
        await conn.session.update(session={"type": "realtime", "max_output_tokens": 24, "temperature": 0})  # type: ignore[arg-type]
        updated = await conn.recv()
        assert updated.type == "session.updated" and updated.session.max_output_tokens == 24  # type: ignore[union-attr]
        for chunk in frames(SILENCE[: RATE] + pcm + SILENCE):  # half a second, the question, a second
            await conn.input_audio_buffer.append(audio=chunk)
        seen = await events_until(conn, lambda e: e.type == "response.done")
    kinds = [e.type for e in seen]
    for expected in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                     "input_audio_buffer.committed", "conversation.item.input_audio_transcription.completed",
                     "response.created", "response.output_audio_transcript.delta", "response.output_audio.delta",
                     "response.output_audio.done", "response.done"):
        assert expected in kinds, (expected, kinds)
    order = [kinds.index(k) for k in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                                      "conversation.item.input_audio_transcription.completed", "response.created",
                                      "response.output_audio.delta", "response.done")]
    assert order == sorted(order), kinds
    transcript = next(e for e in seen if e.type == "conversation.item.input_audio_transcription.completed")
    assert "capital" in transcript.transcript.lower() and "france" in transcript.transcript.lower()
    text = "".join(e.delta for e in seen if e.type == "response.output_audio_transcript.delta")
    assert "Paris" in text
    audio = b"".join(base64.b64decode(e.delta) for e in seen if e.type == "response.output_audio.delta")
    assert len(audio) > RATE  # more than half a second of speech came back
    done = seen[-1]
    assert done.response.status == "completed"
    assert done.response.usage.output_tokens > 0 and done.response.usage.input_tokens > 0


async def test_text_turn_and_bad_events(gateway: Gateway, speech: dict[str, ServiceProcess]) -> None:
    async with client(gateway).realtime.connect(model=BARGE_MODEL) as conn:
        await conn.recv()
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                           "max_output_tokens": 5})
        await conn.recv()
        await conn.send({"type": "no.such.event"})  # type: ignore[arg-type]
        error = await conn.recv()
        assert error.type == "error" and error.error.param == "type"
        await conn.send({"type": "input_audio_buffer.append", "audio": "%%% not base64"})
        assert (await conn.recv()).type == "error"
        await conn.input_audio_buffer.commit()  # nothing buffered
        error = await conn.recv()
        assert error.error.code == "input_audio_buffer_commit_empty"  # type: ignore[union-attr]
        await conn.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello?"}]}
        )
        await conn.response.create()
        seen = await events_until(conn, lambda e: e.type == "response.done")
    text = "".join(e.delta for e in seen if e.type == "response.output_text.delta")
    assert text == BARGE_TOKEN * 5
    assert not any(e.type == "response.output_audio.delta" for e in seen)
    assert seen[-1].response.usage.output_tokens == 5


async def test_barge_in_cancels_llm_and_tts_and_stops_the_audio(
    gateway: Gateway, speech: dict[str, ServiceProcess], nc: bus.Connection
) -> None:
    llm_before = await stats_of(nc, "inferbus-llm", speech["llm"].pid)
    tts_before = await stats_of(nc, "inferbus-tts", speech["tts"].pid)
    interruption = speech_pcm("Stop, wait a moment please.")
    async with client(gateway).realtime.connect(model=BARGE_MODEL) as conn:
        await conn.recv()
        await conn.session.update(session={"type": "realtime", "max_output_tokens": 2000})
        await conn.recv()
        await conn.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Talk to me."}]}
        )
        await conn.response.create()
        seen = await events_until(conn, lambda e: e.type == "response.output_audio.delta")
        response_id = seen[-1].response_id
        deltas = [e for e in seen if e.type == "response.output_audio_transcript.delta"]

        def eighth(event: Any) -> bool:
            if event.type == "response.output_audio_transcript.delta":
                deltas.append(event)
            return len(deltas) >= 8

        if len(deltas) < 8:
            seen += await events_until(conn, eighth)
        for chunk in frames(interruption):  # the user talks over the answer
            await conn.input_audio_buffer.append(audio=chunk)
        seen += await events_until(conn, lambda e: e.type == "response.done" and e.response.id == response_id)
        done = seen[-1]
        # Nothing more for that response after it is done; the user's turn goes on.
        for chunk in frames(SILENCE):
            await conn.input_audio_buffer.append(audio=chunk)
        after = await events_until(conn, lambda e: e.type == "input_audio_buffer.committed")
    kinds = [e.type for e in seen]
    assert kinds.index("input_audio_buffer.speech_started") < len(kinds) - 1
    assert done.response.status == "cancelled"
    assert not any(getattr(e, "response_id", None) == response_id and e.type == "response.output_audio.delta"
                   for e in after)
    deadline = time.monotonic() + 5  # the workers hear the cancel subjects just after response.done
    while True:
        llm_after = await stats_of(nc, "inferbus-llm", speech["llm"].pid)
        tts_after = await stats_of(nc, "inferbus-tts", speech["tts"].pid)
        settled = llm_after["in_flight"] == 0 and tts_after["in_flight"] == 0
        if settled or time.monotonic() > deadline:
            break
    assert llm_after["cancelled"] == llm_before["cancelled"] + 1 and llm_after["in_flight"] == 0
    assert tts_after["cancelled"] == tts_before["cancelled"] + 1 and tts_after["in_flight"] == 0


async def test_dictation_session_streams_partial_then_final_transcripts(
    gateway: Gateway, speech: dict[str, ServiceProcess]
) -> None:
    sentence = "The quick brown fox jumps over the lazy dog, and then it runs far away into the green forest."
    pcm = speech_pcm(sentence)
    assert len(pcm) > 3 * RATE * 2  # long enough for partials (one per second of speech)
    async with client(gateway).realtime.connect(model=BARGE_MODEL, extra_query={"intent": "transcription"}) as conn:
        created = await conn.recv()
        assert created.session.type == "transcription"  # type: ignore[union-attr]
        # A longer silence ends a turn here, so the synthesizer's pause at the comma does not.
        await conn.session.update(session={"type": "transcription", "audio": {"input": {
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 900}}}})
        assert (await conn.recv()).type == "session.updated"
        for chunk in frames(SILENCE[:RATE] + pcm + SILENCE):
            await conn.input_audio_buffer.append(audio=chunk)
        seen = await events_until(conn, lambda e: e.type == "conversation.item.input_audio_transcription.completed")
    kinds = [e.type for e in seen]
    partials = [e for e in seen if e.type == "conversation.item.input_audio_transcription.delta"]
    final = seen[-1]
    assert partials, kinds
    assert all(p.item_id == final.item_id for p in partials)
    words = final.transcript.lower()
    assert "fox" in words and "forest" in words
    assert "fox" in partials[-1].transcript.lower()  # the partials were about this speech
    assert "response.created" not in kinds  # dictation: no answers


async def test_max_output_tokens_inf_and_events_checked_against_the_schema(
    gateway: Gateway, speech: dict[str, ServiceProcess]
) -> None:
    async with client(gateway).realtime.connect(model=BARGE_MODEL) as conn:
        await conn.recv()
        bad: list[tuple[dict[str, Any], str | None]] = [
            ({"type": "session.update", "session": {"max_output_tokens": "lots"}}, "session.max_output_tokens"),
            ({"type": "session.update", "session": {"audio": {"input": {"turn_detection": "on"}}}},
             "session.audio.input.turn_detection"),
            ({"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}},
             "session.audio.input.format.type"),
            ({"type": "conversation.item.create", "item": {"role": "user", "content": "not a list"}},
             "item.content"),
            ({"type": "response.create", "response": {"max_output_tokens": -1}}, "response.max_output_tokens"),
            ({"type": "input_audio_buffer.append", "audio": 12}, "audio"),
        ]
        for event, param in bad:
            await conn.send({**event, "event_id": "evt_bad"})  # type: ignore[arg-type]
            error = await conn.recv()
            assert error.type == "error", (event, error)
            assert error.error.param == param and error.error.event_id == "evt_bad", (event, error)
        # The session is unchanged by all that, and "inf" (a documented value) works.
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                           "max_output_tokens": "inf"})
        updated = await conn.recv()
        assert updated.type == "session.updated" and updated.session.max_output_tokens == "inf"  # type: ignore[union-attr]
        assert updated.session.audio.input.turn_detection.type == "server_vad"  # type: ignore[union-attr]
        await conn.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello?"}]}
        )
        await conn.response.create(response={"max_output_tokens": "inf"})
        seen = await events_until(conn, lambda e: e.type in ("response.done", "error"))
        assert seen[-1].type == "response.done" and seen[-1].response.status == "completed", seen[-1]
        assert seen[-1].response.usage.output_tokens > 5  # not cut at the session's old 256 or at 5
        await conn.response.create(response={"max_output_tokens": 3})
        seen = await events_until(conn, lambda e: e.type == "response.done")
        assert seen[-1].response.usage.output_tokens == 3


async def test_realtime_streams_are_governed_by_the_keys_scopes_and_limits(
    gateway: Gateway, speech: dict[str, ServiceProcess]
) -> None:
    pcm = speech_pcm("Hello there, how are you?")
    # A chat-only key: its turns are not transcribed and its answers not spoken.
    chat_only, _ = await new_key(gateway, "rt-chat-only", scopes=["kind:llm"])
    async with client(gateway, chat_only).realtime.connect(model=BARGE_MODEL) as conn:
        await conn.recv()
        await conn.session.update(session={"type": "realtime", "max_output_tokens": 5})
        await conn.recv()
        for chunk in frames(SILENCE[: RATE // 2] + pcm + SILENCE):
            await conn.input_audio_buffer.append(audio=chunk)
        seen = await events_until(conn, lambda e: e.type.startswith("conversation.item.input_audio_transcription."))
        assert seen[-1].type == "conversation.item.input_audio_transcription.failed"
        assert seen[-1].error.code == "permission_denied"
        await conn.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}
        )
        await conn.response.create()  # audio out: the TTS model is not this key's to use
        seen = await events_until(conn, lambda e: e.type == "response.done")
        assert seen[-1].response.status == "failed"
        assert any(e.type == "error" and e.error.code == "permission_denied" for e in seen)
        assert not any(e.type == "response.output_audio.delta" for e in seen)
    # Each dictated turn is one request under the key's requests-per-minute limit, however many partials.
    limited, _ = await new_key(gateway, "rt-limited", limits={"rpm": 2})
    async with client(gateway, limited).realtime.connect(model=BARGE_MODEL,
                                                         extra_query={"intent": "transcription"}) as conn:
        await conn.recv()
        outcomes = []
        for _ in range(3):
            for chunk in frames(pcm + SILENCE):
                await conn.input_audio_buffer.append(audio=chunk)
            seen = await events_until(
                conn, lambda e: e.type in ("conversation.item.input_audio_transcription.completed",
                                           "conversation.item.input_audio_transcription.failed"))
            outcomes.append(seen[-1].error.code if seen[-1].type.endswith("failed") else "ok")
    assert outcomes == ["ok", "ok", "rate_limited"], outcomes


async def test_dictation_bills_each_second_of_audio_once(
    gateway: Gateway, speech: dict[str, ServiceProcess], nc: bus.Connection
) -> None:
    key, key_id = await new_key(gateway, "rt-dictation-billing")
    events: list[UsageEvent] = []

    async def heard(msg: Any) -> None:
        events.extend(e for e in usage.events_of(msg.data) if e.key_id == key_id)

    sub = await nc.subscribe("usage.asr.>", cb=heard)
    pcm = speech_pcm("The quick brown fox jumps over the lazy dog, and then it runs far away into the green forest.")
    try:
        async with client(gateway, key).realtime.connect(model=BARGE_MODEL,
                                                         extra_query={"intent": "transcription"}) as conn:
            await conn.recv()
            await conn.session.update(session={"type": "transcription", "audio": {"input": {
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 900}}}})  # one turn, commas and all
            assert (await conn.recv()).type == "session.updated"
            for chunk in frames(SILENCE + pcm + SILENCE):
                await conn.input_audio_buffer.append(audio=chunk)
            seen = await events_until(conn, lambda e: e.type == "conversation.item.input_audio_transcription.completed")
        started = next(e for e in seen if e.type == "input_audio_buffer.speech_started")
        stopped = next(e for e in seen if e.type == "input_audio_buffer.speech_stopped")
        partials = [e for e in seen if e.type == "conversation.item.input_audio_transcription.delta"]
        # The turn: its speech plus the 300 ms of prefix padding before it.
        turn_s = (stopped.audio_end_ms - started.audio_start_ms) / 1000 + 0.3
        assert partials and "fox" in seen[-1].transcript.lower() and "forest" in seen[-1].transcript.lower()
        assert seen[-1].usage.seconds == pytest.approx(turn_s, abs=0.05)
        deadline = time.monotonic() + 10
        while sum(e.audio_seconds_in for e in events) < turn_s - 0.05:
            assert time.monotonic() < deadline, [msgspec.to_builtins(e) for e in events]
            await nc.flush()
            await asyncio.sleep(0.05)
        billed = sum(e.audio_seconds_in for e in events)
        assert billed == pytest.approx(turn_s, abs=0.1), (billed, turn_s, len(events))
        assert len(events) >= 2  # it was transcribed in windows (a partial each), not once at the end
        assert all(e.outcome == "ok" for e in events)
    finally:
        await sub.unsubscribe()


async def test_silence_keeps_the_input_buffer_bounded(gateway: Gateway, speech: dict[str, ServiceProcess]) -> None:
    async with client(gateway).realtime.connect(model=BARGE_MODEL, extra_query={"intent": "transcription"}) as conn:
        await conn.recv()
        second = base64.b64encode(SILENCE).decode()
        for _ in range(120):  # two minutes of nobody speaking
            await conn.input_audio_buffer.append(audio=second)
        await conn.input_audio_buffer.commit()  # what is buffered now is what turn detection still needs
        seen = await events_until(conn, lambda e: e.type.startswith("conversation.item.input_audio_transcription."))
        assert seen[-1].type == "conversation.item.input_audio_transcription.completed", seen[-1]
        assert seen[-1].usage.seconds <= 0.5
    # Without turn detection the client commits; the buffer still has a ceiling.
    async with client(gateway).realtime.connect(model=BARGE_MODEL, extra_query={"intent": "transcription"}) as conn:
        await conn.recv()
        await conn.session.update(session={"type": "transcription", "audio": {"input": {"turn_detection": None}}})
        assert (await conn.recv()).type == "session.updated"
        errors = []
        for _ in range(20):
            await conn.input_audio_buffer.append(audio=second)
        await conn.input_audio_buffer.clear()
        async with asyncio.timeout(10):
            async for event in conn:
                if event.type == "input_audio_buffer.cleared":
                    break
                errors.append(event)
        assert len(errors) == 5 and all(e.error.param == "audio" for e in errors), errors  # type: ignore[union-attr]
