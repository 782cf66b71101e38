"""Realtime voice turns with the openai SDK's client: Silero turn ends, speculative answers, noise, semantic_vad.

The audio goes in faster than real time: turn detection works on audio offsets, so a test controls what the
server has heard by what it has sent, and waits on conditions (the LLM worker has a stream running), never
on the clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from services.runtime import bus
from services.runtime.local import EmbeddedStack, ServiceProcess
from tests.conftest import Gateway, start_worker
from tests.test_realtime import client, events_until, frames, stats_of, wait_ready

RATE = 24_000
MODEL = "rt-voice"
TOKEN = " Sure thing."


def speech(text: str) -> np.ndarray:
    """hibari's voice, its own leading and trailing silence trimmed: the speech ends where the array does."""
    from hibari import Hibari

    audio = np.asarray(Hibari()(text), dtype=np.float32)
    voiced = np.flatnonzero(np.abs(audio) > 0.02)
    return audio[voiced[0] : voiced[-1] + 1]


def noise(seconds: float, rms: float, seed: int = 7) -> np.ndarray:
    """Broadband noise with a low-frequency rumble (a fan, traffic), at the given RMS."""
    rng = np.random.default_rng(seed)
    white = rng.standard_normal(int(seconds * RATE)).astype(np.float32)
    rumble = np.convolve(white, np.ones(64, np.float32) / 8, mode="same")
    out = rumble + 0.5 * white
    return (out * rms / np.sqrt(np.mean(out**2))).astype(np.float32)


def pcm(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def silence(seconds: float) -> bytes:
    return bytes(int(seconds * RATE) * 2)


@pytest.fixture(scope="module")
async def voice(infra: EmbeddedStack, nc: bus.Connection) -> AsyncIterator[dict[str, ServiceProcess]]:
    procs = {
        "asr": ServiceProcess("asr", "services.speech.asr", infra.env(), infra.root),
        "tts": ServiceProcess("tts", "services.speech.tts", infra.env(), infra.root),
        # 50 tokens/s: a 100-token answer runs for 2 s, long enough to be caught running.
        "llm": start_worker(infra, MODEL, engine_options={"tokens_per_s": 50, "token_text": TOKEN}),
    }
    try:
        await wait_ready(nc, "inferbus-asr", procs["asr"])
        await wait_ready(nc, "inferbus-tts", procs["tts"])
        await wait_ready(nc, "inferbus-llm", procs["llm"])
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


async def send(conn: Any, audio: bytes) -> None:
    for chunk in frames(audio):
        await conn.input_audio_buffer.append(audio=chunk)


async def llm_running(nc: bus.Connection, proc: ServiceProcess, limit_s: float = 30) -> dict[str, Any]:
    """Once the LLM worker has a stream in flight (the speculative answer started), its stats."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        stats = await stats_of(nc, "inferbus-llm", proc.pid)
        if stats["in_flight"]:
            return stats
    raise TimeoutError("no LLM stream started")


async def settled(nc: bus.Connection, procs: dict[str, ServiceProcess]) -> tuple[dict[str, Any], dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        llm = await stats_of(nc, "inferbus-llm", procs["llm"].pid)
        tts = await stats_of(nc, "inferbus-tts", procs["tts"].pid)
        if (llm["in_flight"] == 0 and tts["in_flight"] == 0) or time.monotonic() > deadline:
            return llm, tts


async def session(conn: Any, **turn_detection: Any) -> None:
    assert (await conn.recv()).type == "session.created"
    await conn.session.update(session={"type": "realtime", "max_output_tokens": 100, "audio": {"input": {
        "turn_detection": {"type": "server_vad", **turn_detection}}}})
    assert (await conn.recv()).type == "session.updated"


async def test_a_pause_then_more_speech_cancels_the_speculative_answer(
    gateway: Gateway, voice: dict[str, ServiceProcess], nc: bus.Connection
) -> None:
    before = await stats_of(nc, "inferbus-llm", voice["llm"].pid)
    async with client(gateway).realtime.connect(model=MODEL) as conn:
        await session(conn, silence_duration_ms=3000)  # the pause below does not end the turn
        await send(conn, silence(0.5) + pcm(speech("Please tell me about the weather")) + silence(0.4))
        await llm_running(nc, voice["llm"])  # the pause started a speculative answer
        await send(conn, pcm(speech("in London tomorrow morning.")) + silence(3.5))
        seen = await events_until(conn, lambda e: e.type == "response.done")
    llm, tts = await settled(nc, voice)
    kinds = [e.type for e in seen]
    assert kinds.count("input_audio_buffer.speech_started") == 1 and kinds.count("response.created") == 1, kinds
    completed = next(e for e in seen if e.type == "conversation.item.input_audio_transcription.completed")
    assert kinds.index(completed.type) < kinds.index("response.created")
    text = completed.transcript.lower()
    assert "weather" in text and "london" in text, text  # both parts: the speculation's window stood
    created = next(e for e in seen if e.type == "response.created")
    audio = [e for e in seen if e.type == "response.output_audio.delta"]
    assert audio and all(e.response_id == created.response.id for e in audio)  # the speculative one: never heard
    assert seen[-1].response.status == "completed"
    # Two LLM streams: the speculative one, cancelled when the user went on, and the answer.
    assert llm["cancelled"] == before["cancelled"] + 1 and llm["served"] == before["served"] + 2
    assert llm["in_flight"] == 0 and tts["in_flight"] == 0


async def test_a_turn_that_ends_takes_the_speculative_answer(
    gateway: Gateway, voice: dict[str, ServiceProcess], nc: bus.Connection
) -> None:
    before = await stats_of(nc, "inferbus-llm", voice["llm"].pid)
    async with client(gateway).realtime.connect(model=MODEL) as conn:
        await session(conn)  # OpenAI's defaults: 500 ms of silence ends a turn
        await send(conn, silence(0.5) + pcm(speech("What is the capital of France?")) + silence(0.25))
        await llm_running(nc, voice["llm"])  # answering already, though the turn has not ended
        await send(conn, silence(1.0))
        seen = await events_until(conn, lambda e: e.type == "response.done")
    llm, _ = await settled(nc, voice)
    kinds = [e.type for e in seen]
    order = [kinds.index(k) for k in ("input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
                                      "conversation.item.input_audio_transcription.completed", "response.created",
                                      "response.output_audio.delta", "response.done")]
    assert order == sorted(order), kinds
    assert "france" in seen[kinds.index("conversation.item.input_audio_transcription.completed")].transcript.lower()
    assert seen[-1].response.status == "completed"
    text = "".join(e.delta for e in seen if e.type == "response.output_audio_transcript.delta")
    assert text == TOKEN * 100
    # One LLM stream, the speculative one, taken as the answer: nothing cancelled, nothing asked twice.
    assert llm["served"] == before["served"] + 1 and llm["cancelled"] == before["cancelled"]


async def test_a_noisy_turn_ends_and_noise_does_not_barge_in(
    gateway: Gateway, voice: dict[str, ServiceProcess], nc: bus.Connection
) -> None:
    spoken = speech("Turn the music down a little, please.")
    rms = float(np.sqrt(np.mean(spoken**2)))
    background = noise(6.0, rms / 10 ** (12 / 20))  # 12 dB under the speech, before, during and after it
    lead = RATE  # one second of noise before the speech
    mixed = background.copy()
    mixed[lead : lead + spoken.size] += spoken
    turn_end = lead + spoken.size + RATE * 3 // 2
    async with client(gateway).realtime.connect(model=MODEL) as conn:
        await session(conn)
        await send(conn, pcm(mixed[:turn_end]))  # the noise goes on after the speech ...
        seen = await events_until(conn, lambda e: e.type == "response.created")
        await send(conn, pcm(mixed[turn_end:]))  # ... and while the answer plays
        seen += await events_until(conn, lambda e: e.type == "response.done")
    kinds = [e.type for e in seen]
    assert kinds.count("input_audio_buffer.speech_started") == 1, kinds  # noise alone never starts a turn
    assert kinds.count("input_audio_buffer.speech_stopped") == 1, kinds  # the turn ended with the noise still on
    started = next(e for e in seen if e.type == "input_audio_buffer.speech_started")
    stopped = next(e for e in seen if e.type == "input_audio_buffer.speech_stopped")
    assert abs(started.audio_start_ms - 1000) <= 150  # where the speech began, not the noise
    assert stopped.audio_end_ms - (1000 + spoken.size * 1000 // RATE) <= 800  # ended by the silence setting
    transcript = next(e for e in seen if e.type == "conversation.item.input_audio_transcription.completed")
    assert "music" in transcript.transcript.lower()
    assert seen[-1].response.status == "completed"  # not cancelled by the noise that went on


async def test_turns_are_detected_by_silero_not_by_loudness(gateway: Gateway) -> None:
    """Noise louder than the speech, then the speech: an energy detector (the fallback where Silero cannot run)
    starts a turn at the noise; Silero starts one where the speech begins, and only there."""
    from services.gateway import vad

    spoken = speech("Turn the music down a little, please.")
    loud = noise(2.0, 0.2)  # ~-14 dBFS: 10 dB over the speech
    assert np.sqrt(np.mean(loud**2)) > 3 * np.sqrt(np.mean(spoken**2))
    stream = pcm(loud) + silence(0.5) + pcm(spoken) + silence(1.0)
    energy = vad.EnergyVad(vad.Thresholds(0.5, 500), 0)
    assert energy.feed(stream)[0] == ("start", 0)  # what the fallback would make of it
    async with client(gateway).realtime.connect(model=MODEL, extra_query={"intent": "transcription"}) as conn:
        assert (await conn.recv()).type == "session.created"
        await send(conn, stream)  # no ASR worker needed: turn detection is the gateway's own
        seen = await events_until(conn, lambda e: e.type == "input_audio_buffer.speech_stopped")
    started = [e for e in seen if e.type == "input_audio_buffer.speech_started"]
    assert len(started) == 1, [e.type for e in seen]
    assert abs(started[0].audio_start_ms - 2500) <= 100  # the speech, 2.5 s in
    speech_end_ms = 2500 + spoken.size * 1000 // RATE
    assert 0 <= seen[-1].audio_end_ms - speech_end_ms <= 800


async def test_semantic_vad_ends_a_finished_sentence_sooner_than_an_unfinished_one(
    gateway: Gateway, voice: dict[str, ServiceProcess], nc: bus.Connection
) -> None:
    async def silence_until_stopped(sentence: str) -> int:
        """Milliseconds of silence after `sentence` until the server ended the turn."""
        async with client(gateway).realtime.connect(model=MODEL) as conn:
            assert (await conn.recv()).type == "session.created"
            await conn.session.update(session={"type": "realtime", "max_output_tokens": 100, "audio": {"input": {
                "turn_detection": {"type": "semantic_vad", "eagerness": "high"}}}})
            assert (await conn.recv()).type == "session.updated"
            spoken = speech(sentence)
            await send(conn, silence(0.5) + pcm(spoken) + silence(0.2))
            await llm_running(nc, voice["llm"])  # the pause's transcript is in
            sent_ms = 200
            stopped = None
            async with asyncio.timeout(30):
                while stopped is None:
                    await send(conn, silence(0.1))
                    sent_ms += 100
                    while stopped is None:
                        try:
                            event = await asyncio.wait_for(conn.recv(), 0.05)
                        except TimeoutError:
                            break
                        if event.type == "input_audio_buffer.speech_stopped":
                            stopped = event
            assert sent_ms < 3000
            return int(stopped.audio_end_ms - 500 - spoken.size * 1000 // RATE)

    finished = await silence_until_stopped("What time is it in Tokyo?")
    unfinished = await silence_until_stopped("I would like to book a table for")
    assert finished < 600 and unfinished >= 1000, (finished, unfinished)



def test_the_first_piece_of_an_answer_is_its_first_clause_or_first_words() -> None:
    from services.gateway.realtime_speech import first_piece, reads_finished

    assert first_piece("Sure, I") is None  # "Sure," is one word: wait for more
    assert first_piece("Sure thing, here it") == ("Sure thing,", "here it")
    assert first_piece("The capital of France is") is None
    assert first_piece("The capital of France is Paris and") == ("The capital of France is Paris", " and")
    assert reads_finished("What time is it in Tokyo?") and reads_finished("Turn it off.")
    assert not reads_finished("I would like to book a table for.") and not reads_finished("So I was thinking...")
    assert not reads_finished("and then") and not reads_finished("")
