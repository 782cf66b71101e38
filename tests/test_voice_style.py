"""TTS style through the openai SDK: `instructions`, inline breaks and emphasis change the audio as documented
(rate, pitch, loudness and pauses measured on the output), also per session and per response on /v1/realtime,
and GET /v1/audio/voices lists what the workers offer."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import pytest
from openai import AsyncOpenAI, BadRequestError

from services.runtime import bus
from services.runtime.local import EmbeddedStack, ServiceProcess
from tests.conftest import ADMIN_KEY, Gateway, start_worker
from tests.test_realtime import client, events_until, wait_ready

RATE = 24_000
TEXT = "The garden was quiet in the early morning light. A small bird sang on the fence."
RT_MODEL = "rt-style"
ANSWER = " The garden was quiet in the early morning light."  # each token of RT_MODEL's answers


@pytest.fixture(scope="module")
async def tts(infra: EmbeddedStack, nc: bus.Connection) -> AsyncIterator[ServiceProcess]:
    proc = ServiceProcess("tts", "services.speech.tts", infra.env(), infra.root)
    try:
        await wait_ready(nc, "inferbus-tts", proc)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
async def talker(infra: EmbeddedStack, nc: bus.Connection) -> AsyncIterator[ServiceProcess]:
    """An LLM whose every answer is the same: what the TTS makes of it differs only by voice and style."""
    proc = start_worker(infra, RT_MODEL, engine_options={"token_text": ANSWER})
    try:
        await wait_ready(nc, "inferbus-llm", proc)
        yield proc
    finally:
        proc.stop()


async def say(gateway: Gateway, text: str = TEXT, **extra: Any) -> np.ndarray:
    client = AsyncOpenAI(base_url=gateway.url + "/v1", api_key=ADMIN_KEY)
    response = await client.audio.speech.create(model="tts-1", voice="alloy", input=text, response_format="pcm",
                                                **extra)
    return np.frombuffer(response.content, "<i2").astype(np.float32) / 32768.0


def voiced(audio: np.ndarray) -> np.ndarray:
    """The 20 ms frames loud enough to be speech."""
    frames = audio[: audio.size // 480 * 480].reshape(-1, 480)
    rms = np.sqrt(np.mean(frames**2, axis=1))
    return frames[rms > 0.1 * rms.max()]


def loudness_db(audio: np.ndarray) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(voiced(audio) ** 2))))


def pitch_hz(audio: np.ndarray) -> float:
    """Median F0 of the voiced 20 ms frames (autocorrelation, 70-400 Hz)."""
    f0 = []
    for raw in voiced(audio):
        frame = raw - raw.mean()
        corr = np.correlate(frame, frame, "full")[frame.size - 1 :]
        lo, hi = RATE // 400, RATE // 70
        lag = lo + int(np.argmax(corr[lo:hi]))
        if corr[lag] > 0.3 * corr[0]:
            f0.append(RATE / lag)
    return float(np.median(f0))


def speech_seconds(audio: np.ndarray) -> float:
    return voiced(audio).size / RATE


async def test_instructions_change_rate_pitch_and_loudness_as_documented(
    gateway: Gateway, tts: ServiceProcess
) -> None:
    plain = await say(gateway)
    unrelated = await say(gateway, instructions="Answer as a helpful assistant would.")
    assert unrelated.size == plain.size  # no vocabulary word: nothing changes
    slow = await say(gateway, instructions="Speak slow and clear.")
    high = await say(gateway, instructions="Use a high-pitched voice.")
    deep = await say(gateway, instructions="A deep voice, please.")
    whisper = await say(gateway, instructions="whisper-like")
    excited = await say(gateway, instructions="Sound excited!")
    # rate: x0.8 and +300 ms per sentence; excited x1.12
    assert slow.size / plain.size == pytest.approx(1 / 0.8 + 0.3 * RATE / plain.size, rel=0.12)
    assert excited.size < plain.size * 0.95
    # pitch: +3 / -3 semitones (ratio 1.19 / 0.84), length kept
    assert pitch_hz(high) / pitch_hz(plain) == pytest.approx(2 ** (3 / 12), rel=0.06)
    assert pitch_hz(deep) / pitch_hz(plain) == pytest.approx(2 ** (-3 / 12), rel=0.06)
    assert high.size == pytest.approx(plain.size, rel=0.08) and deep.size == pytest.approx(plain.size, rel=0.08)
    # loudness: -12 dB
    assert loudness_db(whisper) - loudness_db(plain) == pytest.approx(-12, abs=1.5)
    assert loudness_db(excited) > loudness_db(plain)


async def test_inline_breaks_insert_silence_and_bad_tags_are_refused(gateway: Gateway, tts: ServiceProcess) -> None:
    plain = await say(gateway, "Hello there. How are you today?")
    paused = await say(gateway, 'Hello there. <break time="1500ms"/> How are you today?')
    extra = (paused.size - plain.size) / RATE
    assert extra == pytest.approx(1.5, abs=0.15)
    assert speech_seconds(paused) == pytest.approx(speech_seconds(plain), abs=0.15)  # silence, not speech
    with pytest.raises(BadRequestError) as bad:
        await say(gateway, 'Hello <break strength="strong"/> there.')
    assert bad.value.code == "invalid_request" or bad.value.status_code == 400


async def test_voices_are_listed_with_language_and_rate(gateway: Gateway, tts: ServiceProcess) -> None:
    async with aiohttp.ClientSession() as http, http.get(
        f"{gateway.url}/v1/audio/voices", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ) as resp:
        assert resp.status == 200
        body = await resp.json()
    heart = next(v for v in body["data"] if v["id"] == "heart" and v["model"] == "hibari")
    assert heart["language"] == "en-US" and heart["sample_rate"] == RATE and heart["default"] is True
    assert "alloy" in heart["aliases"]


def test_the_vocabulary_and_breaks_parse_as_documented() -> None:
    from contracts.errors import InferBusError
    from services.speech.tts import style

    assert style.parse("Please answer helpfully.").neutral
    calm = style.parse("Speak in a calm, SLOW and clear voice")
    assert calm.words == ("calm", "slow-and-clear") and calm.rate == pytest.approx(0.9 * 0.8)
    assert calm.semitones == -1 and calm.pause_s == 0.3
    assert style.parse("excited excited").rate == pytest.approx(1.12)  # a word counts once
    assert style.segments('One. <break time="1.5s"/> Two.') == ["One. ", 1.5, " Two."]
    with pytest.raises(InferBusError):
        style.segments('<break time="9s"/> too long')
    assert style.segments('Say <emphasis level="strong">no <break time="200ms"/> more</emphasis> now.') == [
        "Say ", style.Emphasis("no ", "strong"), 0.2, style.Emphasis(" more", "strong"), " now."]
    assert style.segments("<emphasis>Once</emphasis>") == [style.Emphasis("Once", "moderate")]
    loud = style.emphasized(style.parse("whisper"), "moderate")
    assert loud.gain_db == -12 + 4 and loud.rate == pytest.approx(0.95 * 0.9)  # on top of the instructions


async def test_emphasis_speaks_its_span_louder_and_slower(gateway: Gateway, tts: ServiceProcess) -> None:
    before, words, after = [await say(gateway, text) for text in ("Please read", "this line", "twice.")]
    mixed = await say(gateway, "Please read <emphasis>this line</emphasis> twice.")
    # The span is synthesized as a phrase of its own: it lies between the two plain phrases, whose lengths are known.
    span = mixed[before.size : mixed.size - after.size]
    assert loudness_db(span) - loudness_db(words) == pytest.approx(4, abs=1.0)
    assert speech_seconds(span) / speech_seconds(words) == pytest.approx(1 / 0.9, rel=0.06)
    assert loudness_db(mixed[: before.size]) == pytest.approx(loudness_db(before), abs=0.5)  # the rest as it was
    assert loudness_db(mixed[-after.size :]) == pytest.approx(loudness_db(after), abs=0.5)
    strong = await say(gateway, '<emphasis level="strong">this line</emphasis>')
    reduced = await say(gateway, "<emphasis level='reduced'>this line</emphasis>")
    assert loudness_db(strong) - loudness_db(words) == pytest.approx(6, abs=1.0)
    assert speech_seconds(strong) / speech_seconds(words) == pytest.approx(1 / 0.85, rel=0.06)
    assert loudness_db(reduced) - loudness_db(words) == pytest.approx(-4, abs=1.0)
    assert reduced.size / words.size == pytest.approx(1 / 1.05, rel=0.02)  # too little for 20 ms frames to show
    # A style's pause goes after sentences, not where a span begins or ends within one.
    slow = "Speak slow and clear."
    parts = [await say(gateway, text, instructions=slow)
             for text in ("Please read", "<emphasis>this line</emphasis>", "twice.")]
    whole = await say(gateway, "Please read <emphasis>this line</emphasis> twice.", instructions=slow)
    assert whole.size == sum(p.size for p in parts)
    for bad in ("<emphasis>one <emphasis>two</emphasis></emphasis>", "<emphasis>never closed",
                "closes nothing</emphasis>", '<emphasis level="loud">no such level</emphasis>'):
        with pytest.raises(BadRequestError) as refused:
            await say(gateway, bad)
        assert refused.value.status_code == 400 and "emphasis" in refused.value.message, bad
        assert refused.value.param == "input"


async def realtime_answer(conn: Any, **response: Any) -> tuple[np.ndarray, Any, list[Any]]:
    """One response's audio, its response.done and the events that came with it."""
    await conn.response.create(response=response) if response else await conn.response.create()
    seen = await events_until(conn, lambda e: e.type == "response.done")
    pcm = b"".join(base64.b64decode(e.delta) for e in seen if e.type == "response.output_audio.delta")
    return np.frombuffer(pcm, "<i2").astype(np.float32) / 32768.0, seen[-1], seen


@contextlib.asynccontextmanager
async def realtime_session(gateway: Gateway, **session: Any) -> AsyncIterator[Any]:
    async with client(gateway).realtime.connect(model=RT_MODEL) as conn:
        assert (await conn.recv()).type == "session.created"
        await conn.session.update(session={"type": "realtime", "max_output_tokens": 2, **session})
        assert (await conn.recv()).type == "session.updated"
        yield conn


async def test_realtime_voice_and_instructions_per_session_and_per_response(
    gateway: Gateway, tts: ServiceProcess, talker: ServiceProcess
) -> None:
    async with realtime_session(gateway) as conn:  # the default instructions hold no style word
        plain, done, _ = await realtime_answer(conn)
    assert done.response.status == "completed" and speech_seconds(plain) > 3
    async with realtime_session(gateway, instructions="Speak slow and clear.") as conn:
        slow, _, _ = await realtime_answer(conn)
        whispered, _, _ = await realtime_answer(conn, instructions="whisper-like")  # this response only
        slow_again, _, _ = await realtime_answer(conn)
    assert speech_seconds(slow) / speech_seconds(plain) == pytest.approx(1 / 0.8, rel=0.06)
    # The response's instructions replace the session's (quiet, x0.95), not add to them (that would be x0.76).
    assert loudness_db(whispered) - loudness_db(plain) == pytest.approx(-12, abs=1.5)
    assert speech_seconds(whispered) / speech_seconds(plain) == pytest.approx(1 / 0.95, rel=0.06)
    assert speech_seconds(slow_again) / speech_seconds(plain) == pytest.approx(1 / 0.8, rel=0.06)
    assert loudness_db(slow_again) == pytest.approx(loudness_db(plain), abs=1.0)

    # hibari has one voice here: a voice it does not have shows whose voice reached the TTS.
    async with realtime_session(gateway, audio={"output": {"voice": "no-such-voice"}}) as conn:
        _, failed, seen = await realtime_answer(conn)
        heart, done, _ = await realtime_answer(conn, audio={"output": {"voice": "heart"}})
        beta, beta_done, _ = await realtime_answer(conn, voice="alloy")  # the beta field
    assert failed.response.status == "failed"
    error = next(e for e in seen if e.type == "error")
    assert error.error.param == "voice" and "no-such-voice" in error.error.message
    assert done.response.status == "completed" and heart.size == plain.size
    assert beta_done.response.status == "completed" and beta.size == plain.size
    async with realtime_session(gateway, audio={"output": {"voice": "alloy"}}) as conn:
        _, failed, seen = await realtime_answer(conn, audio={"output": {"voice": "no-such-voice"}})
    assert failed.response.status == "failed"
    assert any(e.type == "error" and e.error.param == "voice" for e in seen)
