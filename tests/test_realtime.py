"""/v1/realtime with the openai SDK's own realtime client: speech in, transcript, text and audio out, barge-in."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from openai import AsyncOpenAI

from services.runtime import bus
from services.runtime.local import EmbeddedStack, ServiceProcess
from tests.conftest import ADMIN_KEY, Gateway, start_worker

RATE = 24_000
FRAME = RATE // 50  # 20 ms
BARGE_MODEL = "rt-chatty"


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
        "llm": start_worker(infra, BARGE_MODEL, engine_options={"tokens_per_s": 100, "token_text": " Yes, I am here."}),
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


def client(gateway: Gateway) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=gateway.url + "/v1", api_key=ADMIN_KEY)


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
        await conn.session.update(session={"type": "realtime", "max_output_tokens": 24, "temperature": 0})  # type: ignore[typeddict-item]
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
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],  # type: ignore[typeddict-item]
                                           "max_output_tokens": 5})
        await conn.recv()
        await conn.send({"type": "no.such.event"})  # type: ignore[arg-type, typeddict-item]
        error = await conn.recv()
        assert error.type == "error" and error.error.param == "type"  # type: ignore[union-attr]
        await conn.send({"type": "input_audio_buffer.append", "audio": "%%% not base64"})  # type: ignore[arg-type]
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
    assert text == " Yes, I am here." * 5
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
        await conn.session.update(session={"type": "realtime", "max_output_tokens": 2000})  # type: ignore[typeddict-item]
        await conn.recv()
        await conn.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Talk to me."}]}
        )
        await conn.response.create()
        seen = await events_until(conn, lambda e: e.type == "response.output_audio.delta")
        response_id = seen[-1].response_id
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
        await conn.session.update(session={"type": "transcription", "audio": {"input": {  # type: ignore[typeddict-item]
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
