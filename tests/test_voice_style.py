"""TTS style through the openai SDK: `instructions` and inline breaks change the audio as documented (rate,
pitch, loudness and pauses measured on the output), and GET /v1/audio/voices lists what the workers offer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import pytest
from openai import AsyncOpenAI, BadRequestError

from services.runtime import bus
from services.runtime.local import EmbeddedStack, ServiceProcess
from tests.conftest import ADMIN_KEY, Gateway
from tests.test_realtime import wait_ready

RATE = 24_000
TEXT = "The garden was quiet in the early morning light. A small bird sang on the fence."


@pytest.fixture(scope="module")
async def tts(infra: EmbeddedStack, nc: bus.Connection) -> AsyncIterator[ServiceProcess]:
    proc = ServiceProcess("tts", "services.speech.tts", infra.env(), infra.root)
    try:
        await wait_ready(nc, "inferbus-tts", proc)
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
