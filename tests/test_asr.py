"""Speech to text end to end: hibari speech -> gateway (multipart) -> NATS -> faster-whisper worker.

Real models (tiny.en; base for translation and language detection), real servers, every format.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import itertools
import math
import re
import secrets
import shutil
import struct
import subprocess
import time
import wave
from collections.abc import AsyncIterator
from typing import Any, Literal

import aiohttp
import av
import msgspec
import nats.errors
import nats.js.errors
import numpy as np
import numpy.typing as npt
import openai
import pytest
import redis.asyncio as aioredis
from multidict import CIMultiDict

from contracts import subjects
from contracts.llm import Accepted, ErrorChunk, Heartbeat
from contracts.speech import (
    INLINE_MAX,
    MEDIA_BUCKET,
    AsrChunk,
    Segment,
    TranscribeRequest,
    Transcript,
    asr_chunk_decoder,
    asr_encoder,
)
from services.runtime import bus
from services.runtime.bus import direct
from services.runtime.local import EmbeddedStack, ServiceProcess, settings_env
from services.speech.wer import wer, words
from tests.conftest import ADMIN_KEY, Gateway, usage_event
from tests.test_tenancy import admin

TINY = "whisper-tiny-en"
BASE = "whisper-base"
VERSION = "int8"
MAX_SECONDS = 60.0  # the test workers' max_audio_seconds
RATE = 24_000  # hibari's sample rate
Wave = npt.NDArray[np.float32]

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "The weather today is cold and windy near the coast.",
    "She opened the window and listened to the birds outside.",
    "He bought fresh bread and cheese at the market.",
    "Our train leaves the station at noon on Friday.",
]


# ---- speech and scoring ---------------------------------------------------------------------


def test_wer_function() -> None:
    assert wer("the cat sat", "the cat sat") == 0.0
    assert wer("the cat sat", "The cat, sat!") == 0.0
    assert wer("the cat sat", "the dog sat") == pytest.approx(1 / 3)
    assert wer("the cat sat", "the cat") == pytest.approx(1 / 3)
    assert wer("the cat sat", "") == 1.0


def to_wav(samples: Wave, rate: int = RATE) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def encode(samples: Wave, container: str, codec: str, rate: int = RATE) -> bytes:
    """The waveform in another container/codec, through PyAV (as a client would upload it)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(
            (np.clip(samples, -1.0, 1.0) * 32767).astype(np.int16).reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


class Speech(msgspec.Struct):
    sentences: list[Wave]
    pause: Wave

    def joined(self, indices: list[int]) -> Wave:
        parts: list[Wave] = []
        for i in indices:
            parts += [self.sentences[i], self.pause]
        return np.concatenate(parts)

    def text(self, indices: list[int]) -> str:
        return " ".join(SENTENCES[i] for i in indices)


@pytest.fixture(scope="module")
def speech() -> Speech:
    from hibari import Hibari

    tts = Hibari()
    return Speech([tts(s, seed=i) for i, s in enumerate(SENTENCES)], np.zeros(RATE // 2, np.float32))


# ---- workers --------------------------------------------------------------------------------


async def asr_stats(nc: bus.Connection, pid: int | None = None) -> dict[str, Any]:
    for data in await bus.service_stats(nc, "inferbus-asr", wait=0.2):
        if pid is None or data.get("pid") == pid:
            return data
    raise LookupError(pid)


async def wait_asr(
    nc: bus.Connection, gateway: Gateway, model: str, proc: ServiceProcess, limit_s: float = 120
) -> dict[str, Any]:
    """Ready in its micro stats, then listed by the gateway with a live worker (it heard a heartbeat)."""
    deadline = time.monotonic() + limit_s
    stats: dict[str, Any] = {}
    while time.monotonic() < deadline and not stats:
        proc.check_alive()
        for data in await bus.service_stats(nc, "inferbus-asr", wait=0.2):
            if data.get("pid") == proc.pid and data.get("model") == model and data.get("ready"):
                stats = data
    async with aiohttp.ClientSession(headers=gateway.headers) as http:
        while time.monotonic() < deadline and stats:
            async with http.get(f"{gateway.url}/v1/models/{model}") as resp:
                if resp.status == 200 and (await resp.json())["workers"] >= 1:
                    return stats
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{model} worker not ready:\n{proc.log()[-3000:]}")


def start_asr(infra: EmbeddedStack, model: str, **settings: Any) -> ServiceProcess:
    limits = {"max_audio_seconds": MAX_SECONDS, "data_dir": str(infra.root)}
    env = infra.env(**settings_env(model=model, version=VERSION, **limits, **settings))
    return ServiceProcess(f"asr-{model}", "services.speech.asr", env, infra.root)


@pytest.fixture(scope="module")
async def tiny(infra: EmbeddedStack, nc: bus.Connection, gateway: Gateway) -> AsyncIterator[dict[str, Any]]:
    proc = start_asr(infra, TINY, heartbeat_s=0.1)  # heartbeats show even where a 30 s window decodes fast
    try:
        yield await wait_asr(nc, gateway, TINY, proc)
    finally:
        proc.stop()
    assert proc.popen.returncode == 0, proc.log()[-3000:]  # drained and exited cleanly on SIGTERM
    assert "model_loading" in proc.log()


@pytest.fixture(scope="module")
async def base(infra: EmbeddedStack, nc: bus.Connection, gateway: Gateway) -> AsyncIterator[dict[str, Any]]:
    proc = start_asr(infra, BASE)
    try:
        yield await wait_asr(nc, gateway, BASE, proc, limit_s=180)
    finally:
        proc.stop()


# ---- HTTP helpers ---------------------------------------------------------------------------


@dataclasses.dataclass
class Reply:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return msgspec.json.decode(self.body)

    @property
    def error(self) -> dict[str, Any]:
        err: dict[str, Any] = self.json()["error"]
        return err


async def post_audio(
    gateway: Gateway,
    data: bytes | None,
    *,
    endpoint: str = "transcriptions",
    filename: str = "speech.wav",
    model: str | None = TINY,
    **fields: Any,
) -> Reply:
    form = aiohttp.FormData(default_to_multipart=True)
    if data is not None:
        form.add_field("file", data, filename=filename, content_type="application/octet-stream")
    if model is not None:
        form.add_field("model", model)
    for name, value in fields.items():
        for item in value if isinstance(value, list) else [value]:
            form.add_field(name, str(item))
    async with (
        aiohttp.ClientSession(headers=gateway.headers) as http,
        http.post(f"{gateway.url}/v1/audio/{endpoint}", data=form) as resp,
    ):
        return Reply(resp.status, CIMultiDict(resp.headers), await resp.read())


async def transcript(gateway: Gateway, data: bytes, **fields: Any) -> str:
    reply = await post_audio(gateway, data, **fields)
    assert reply.status == 200, reply.body
    text: str = reply.json()["text"]
    return text


# ---- transcription quality and formats ------------------------------------------------------


async def test_word_error_rate(gateway: Gateway, tiny: dict[str, Any], speech: Speech) -> None:
    texts = [await transcript(gateway, to_wav(speech.sentences[i])) for i in range(len(SENTENCES))]
    for reference, text in zip(SENTENCES, texts, strict=True):
        assert wer(reference, text) <= 0.2, (reference, text)
    assert wer(" ".join(SENTENCES), " ".join(texts)) <= 0.1


async def test_json_response_and_headers(gateway: Gateway, tiny: dict[str, Any], speech: Speech) -> None:
    reply = await post_audio(gateway, to_wav(speech.joined([0, 1])), response_format="json")
    assert reply.status == 200
    assert reply.headers["x-inferbus-model-version"] == VERSION
    assert reply.headers["x-request-id"].startswith("transcr-")
    body = reply.json()
    assert wer(speech.text([0, 1]), body["text"]) <= 0.2
    assert body["text"] == body["text"].strip()
    duration = len(speech.joined([0, 1])) / RATE
    assert body["usage"] == {"type": "duration", "seconds": pytest.approx(duration, abs=0.01)}


async def test_text_srt_vtt(gateway: Gateway, tiny: dict[str, Any], speech: Speech) -> None:
    wav = to_wav(speech.joined([0, 2]))
    text = await post_audio(gateway, wav, response_format="text")
    assert text.status == 200 and text.headers["Content-Type"].startswith("text/plain")
    assert wer(speech.text([0, 2]), text.body.decode()) <= 0.2 and text.body.endswith(b"\n")

    srt = (await post_audio(gateway, wav, response_format="srt")).body.decode()
    blocks = srt.strip().split("\n\n")
    assert len(blocks) >= 2
    for number, block in enumerate(blocks, 1):
        lines = block.split("\n")
        assert lines[0] == str(number)
        assert re.fullmatch(r"\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}", lines[1]), lines[1]
    assert wer(speech.text([0, 2]), " ".join(b.split("\n", 2)[2] for b in blocks)) <= 0.2

    vtt_reply = await post_audio(gateway, wav, response_format="vtt")
    assert vtt_reply.headers["Content-Type"].startswith("text/vtt")
    vtt = vtt_reply.body.decode()
    assert vtt.startswith("WEBVTT\n\n")
    cues = vtt.removeprefix("WEBVTT\n\n").strip().split("\n\n")
    assert len(cues) == len(blocks)
    for cue in cues:
        assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} --> \d\d:\d\d:\d\d\.\d{3}", cue.split("\n")[0])


async def test_verbose_json_segments_and_words(gateway: Gateway, tiny: dict[str, Any], speech: Speech) -> None:
    audio = speech.joined([0, 3])
    reply = await post_audio(
        gateway, to_wav(audio), response_format="verbose_json", **{"timestamp_granularities[]": ["word", "segment"]}
    )
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["task"] == "transcribe" and body["language"] == "english"
    assert body["duration"] == pytest.approx(len(audio) / RATE, abs=0.01)
    assert wer(speech.text([0, 3]), body["text"]) <= 0.2
    segments = body["segments"]
    assert [s["id"] for s in segments] == list(range(len(segments))) and len(segments) >= 2
    assert all(0 <= s["start"] < s["end"] <= body["duration"] + 0.5 for s in segments)
    assert all(a["end"] <= b["start"] + 0.01 for a, b in itertools.pairwise(segments))
    spoken = words(speech.text([0, 3]))
    got = [w["word"] for w in body["words"]]
    assert wer(" ".join(spoken), " ".join(got)) <= 0.2
    assert all(0 <= w["start"] <= w["end"] <= body["duration"] + 0.5 for w in body["words"])
    assert all(a["start"] <= b["start"] for a, b in itertools.pairwise(body["words"]))
    fox = next(w for w in body["words"] if "fox" in w["word"].lower())
    bread = next(w for w in body["words"] if "bread" in w["word"].lower())
    assert fox["end"] < len(speech.sentences[0]) / RATE + 0.5 < bread["start"]  # each word in its own sentence

    plain = (await post_audio(gateway, to_wav(audio), response_format="verbose_json")).json()
    assert "segments" in plain and "words" not in plain


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK marks audio.translations deprecated
async def test_openai_sdk_unchanged(gateway: Gateway, tiny: dict[str, Any], speech: Speech) -> None:
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    wav = to_wav(speech.joined([1, 4]))
    result = await client.audio.transcriptions.create(model="whisper-1", file=("speech.wav", wav))
    assert wer(speech.text([1, 4]), result.text) <= 0.2

    verbose = await client.audio.transcriptions.create(
        model="whisper-1",
        file=("speech.wav", wav),
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    assert verbose.language == "english" and verbose.words and verbose.segments
    assert wer(speech.text([1, 4]), " ".join(w.word for w in verbose.words)) <= 0.2

    srt = await client.audio.transcriptions.create(model="whisper-1", file=("speech.wav", wav), response_format="srt")
    assert isinstance(srt, str) and srt.startswith("1\n00:00:")

    stream = await client.audio.transcriptions.create(model="whisper-1", file=("speech.wav", wav), stream=True)
    events = [event async for event in stream]
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert len(deltas) >= 2 and events[-1].type == "transcript.text.done"
    assert "".join(deltas).strip() == events[-1].text
    assert wer(speech.text([1, 4]), events[-1].text) <= 0.2

    with pytest.raises(openai.BadRequestError) as caught:
        await client.audio.translations.create(model="whisper-1", file=("speech.wav", wav))
    assert "English-only" in caught.value.message and BASE in caught.value.message


async def test_segment_granularity_goes_with_any_format_word_only_with_verbose_json(
    gateway: Gateway, tiny: dict[str, Any], speech: Speech
) -> None:
    """As OpenAI: segment (its default granularity) is accepted with json and changes nothing there; word is
    refused with anything but verbose_json, before any audio is decoded."""
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    wav = to_wav(speech.joined([0, 2]))
    raw = await client.audio.transcriptions.with_raw_response.create(
        model="whisper-1", file=("speech.wav", wav), response_format="json", timestamp_granularities=["segment"]
    )
    body = raw.parse()
    assert raw.status_code == 200 and wer(speech.text([0, 2]), body.text) <= 0.2
    assert set(msgspec.json.decode(raw.content)) == {"text", "usage"}  # json's shape: no segments
    refused: list[list[Literal["word", "segment"]]] = [["word"], ["segment", "word"]]
    for granularities in refused:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.audio.transcriptions.create(
                model="whisper-1", file=("speech.wav", wav), response_format="json",
                timestamp_granularities=granularities,
            )
        assert caught.value.param == "timestamp_granularities" and "verbose_json" in caught.value.message
    await client.close()

    text = await post_audio(gateway, wav, response_format="text", **{"timestamp_granularities[]": "segment"})
    assert text.status == 200 and wer(speech.text([0, 2]), text.body.decode()) <= 0.2
    for fmt in ("text", "srt", "vtt", "diarized_json"):
        reply = await post_audio(gateway, wav, response_format=fmt, **{"timestamp_granularities[]": "word"})
        assert (reply.status, reply.error["param"]) == (400, "timestamp_granularities"), reply.body
    segments = await post_audio(gateway, wav, response_format="verbose_json",
                                **{"timestamp_granularities[]": "segment"})
    assert segments.status == 200 and segments.json()["segments"] and "words" not in segments.json()


@pytest.mark.parametrize(
    ("container", "codec", "filename"),
    [("mp3", "libmp3lame", "speech.mp3"), ("flac", "flac", "speech.flac"), ("ogg", "libopus", "speech.ogg"),
     ("webm", "libopus", "speech.webm")],
)
async def test_compressed_formats(
    gateway: Gateway, tiny: dict[str, Any], speech: Speech, container: str, codec: str, filename: str
) -> None:
    data = encode(speech.joined([2, 3]), container, codec)
    text = await transcript(gateway, data, filename=filename, response_format="verbose_json")
    assert wer(speech.text([2, 3]), text) <= 0.2


async def test_large_file_goes_through_object_store(
    gateway: Gateway, tiny: dict[str, Any], nc: bus.Connection, speech: Speech
) -> None:
    indices = [0, 1, 2, 3, 4]
    wav = to_wav(speech.joined(indices))
    assert len(wav) > INLINE_MAX
    reply = await post_audio(gateway, wav)
    assert reply.status == 200, reply.body
    assert wer(speech.text(indices), reply.json()["text"]) <= 0.2
    rid = reply.headers["x-request-id"]
    await deleted(nc, rid)
    await deleted(nc, f"{rid}-1")


async def deleted(nc: bus.Connection, name: str) -> None:
    """The upload `name` leaves the media store (the worker deletes it once read, off the reply path)."""
    store = await nc.jetstream().object_store(MEDIA_BUCKET)  # the gateway created the bucket
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            await store.get_info(name)  # a round trip each time: no sleep needed between tries
        except nats.js.errors.NotFoundError:
            return
    pytest.fail(f"the upload {name} is still in {MEDIA_BUCKET}")


async def test_usage_event_published(
    gateway: Gateway, tiny: dict[str, Any], nc: bus.Connection, speech: Speech
) -> None:
    audio = speech.joined([4])
    reply = await post_audio(gateway, to_wav(audio))
    assert reply.status == 200
    event = await usage_event(nc, "asr", TINY, reply.headers["x-request-id"])
    assert (event.kind, event.model, event.version, event.outcome) == ("asr", TINY, VERSION, "ok")
    assert event.audio_seconds_in == pytest.approx(len(audio) / RATE, abs=0.01)
    assert event.key_id and event.tenant_id is not None and event.worker_id == tiny["worker_id"]
    assert event.finished_at >= event.started_at


# ---- translation and the multilingual model -------------------------------------------------


async def test_translation_needs_multilingual_model(gateway: Gateway, tiny: dict[str, Any], speech: Speech) -> None:
    reply = await post_audio(gateway, to_wav(speech.sentences[0]), endpoint="translations")
    assert reply.status == 400
    assert reply.error["code"] == "invalid_request"
    assert "English-only" in reply.error["message"] and BASE in reply.error["message"]
    french = await post_audio(gateway, to_wav(speech.sentences[0]), language="fr")
    assert french.status == 400 and "language must be 'en'" in french.error["message"]


async def test_whisper_1_without_base_keeps_tiny_en(gateway: Gateway, tiny: dict[str, Any], speech: Speech) -> None:
    """No multilingual worker yet: whisper-1 is tiny.en, and another language is the English-only model's 400."""
    wav = to_wav(speech.sentences[0])
    reply = await post_audio(gateway, wav, model="whisper-1", response_format="verbose_json")
    assert reply.status == 200 and reply.headers["x-inferbus-model"] == TINY
    german = await post_audio(gateway, wav, model="whisper-1", language="de")
    assert german.status == 400 and "language must be 'en'" in german.error["message"]


async def test_base_detects_language_and_translates(gateway: Gateway, base: dict[str, Any], speech: Speech) -> None:
    assert base["multilingual"] is True
    wav = to_wav(speech.joined([0, 1]))
    detected = (await post_audio(gateway, wav, model=BASE, response_format="verbose_json")).json()
    assert detected["language"] == "english"
    assert wer(speech.text([0, 1]), detected["text"]) <= 0.2
    reply = await post_audio(gateway, wav, endpoint="translations", model=BASE, response_format="verbose_json")
    assert reply.status == 200, reply.body
    assert reply.headers["x-request-id"].startswith("transl-")
    assert reply.json()["task"] == "translate"
    assert wer(speech.text([0, 1]), reply.json()["text"]) <= 0.2  # English to English
    unknown = await post_audio(gateway, wav, endpoint="translations", model=BASE, language="en")
    assert unknown.status == 400 and "language" in unknown.error["message"]


# ---- whisper-1 across languages: identified first, English to tiny.en, the rest to whisper-base -----------

# espeak-ng voices and the words a transcript of each must hold most of (lower case, accents kept).
# Whisper-base identifies espeak-ng's robotic voices reliably from ~6 s of speech, not from one short sentence.
FOREIGN = {
    "de": ("Guten Morgen. Heute ist das Wetter sehr schön, und wir gehen in den Park. Am Abend kochen wir zusammen.",
           ["guten", "morgen", "heute", "wir", "gehen", "park"], "german"),
    "es": ("Buenos días. Hoy hace muy buen tiempo y vamos al parque. Por la tarde cocinamos juntos en casa.",
           ["buenos", "días", "hoy", "tiempo", "parque", "casa"], "spanish"),
}


def espeak(language: str, text: str) -> bytes:
    assert shutil.which("espeak-ng"), "espeak-ng is needed for the voices (apt-get install espeak-ng)"
    return subprocess.run(["espeak-ng", "-v", language, "--stdout", text], check=True, capture_output=True).stdout


def heard(expected: list[str], text: str) -> int:
    said = set(re.findall(r"\w+", text.lower()))
    return sum(word in said for word in expected)


async def test_whisper_1_identifies_the_language(
    gateway: Gateway, tiny: dict[str, Any], base: dict[str, Any], speech: Speech, nc: bus.Connection
) -> None:
    for language, (sentence, expected, name) in FOREIGN.items():
        reply = await post_audio(gateway, espeak(language, sentence), model="whisper-1",
                                 response_format="verbose_json")
        assert reply.status == 200, reply.body
        assert reply.headers["x-inferbus-model"] == BASE
        body = reply.json()
        assert body["language"] == name, body
        assert heard(expected, body["text"]) >= len(expected) - 2, body["text"]
        event = await usage_event(nc, "asr", BASE, reply.headers["x-request-id"])
        assert event.audio_seconds_in == pytest.approx(body["duration"], abs=0.01)  # one request, one bill

    english = speech.joined([0, 1])
    reply = await post_audio(gateway, to_wav(english), model="whisper-1", response_format="verbose_json")
    assert reply.status == 200, reply.body
    assert reply.headers["x-inferbus-model"] == TINY  # identified by base, transcribed by tiny.en
    assert reply.json()["language"] == "english" and wer(speech.text([0, 1]), reply.json()["text"]) <= 0.2
    rid = reply.headers["x-request-id"]
    billed = await usage_event(nc, "asr", TINY, rid)
    assert billed.attempt == 1 and billed.audio_seconds_in == pytest.approx(len(english) / RATE, abs=0.01)
    identified = await usage_event(nc, "asr", BASE, rid)
    assert identified.attempt == 0 and identified.audio_seconds_in == 0  # the language-id pass bills no audio

    # A named language skips identification; English streams from tiny.en as before.
    sentence, expected, _ = FOREIGN["de"]
    named = await post_audio(gateway, espeak("de", sentence), model="whisper-1", language="de")
    assert named.status == 200 and named.headers["x-inferbus-model"] == BASE
    assert heard(expected, named.json()["text"]) >= len(expected) - 2
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    stream = await client.audio.transcriptions.create(model="whisper-1", file=("speech.wav", to_wav(english)),
                                                      stream=True)
    events = [event async for event in stream]
    assert events[-1].type == "transcript.text.done" and wer(speech.text([0, 1]), events[-1].text) <= 0.2
    stream = await client.audio.transcriptions.create(
        model="whisper-1", file=("speech.wav", espeak("es", FOREIGN["es"][0])), stream=True)
    events = [event async for event in stream]
    assert events[-1].type == "transcript.text.done" and heard(FOREIGN["es"][1], events[-1].text) >= 3
    await client.close()
    explicit = await post_audio(gateway, to_wav(speech.sentences[0]), model=TINY, language="de")
    assert explicit.status == 400  # a model named outright is not rerouted

    # Through the media store: base reads (and deletes) the upload, the gateway stores it again (under a name
    # of its own) for tiny.en, which deletes that.
    indices = [0, 1, 2, 3, 4]
    large = to_wav(speech.joined(indices))
    assert len(large) > INLINE_MAX
    reply = await post_audio(gateway, large, model="whisper-1")
    assert reply.status == 200 and reply.headers["x-inferbus-model"] == TINY, reply.body
    assert wer(speech.text(indices), reply.json()["text"]) <= 0.2
    rid = reply.headers["x-request-id"]
    await deleted(nc, rid)
    await deleted(nc, f"{rid}-1")


async def test_a_named_language_is_not_identified(
    gateway: Gateway, tiny: dict[str, Any], base: dict[str, Any], speech: Speech, nc: bus.Connection
) -> None:
    """Named, the language is taken as said: whisper-base decodes in it without its detection pass, and whisper-1
    sends the audio where that language goes without an identification pass first."""
    wav = to_wav(speech.joined([0, 1]))  # English
    found = await post_audio(gateway, wav, model=BASE, response_format="verbose_json")
    assert found.status == 200 and found.json()["language"] == "english"
    told = await post_audio(gateway, wav, model=BASE, language="de", response_format="verbose_json")
    assert told.status == 200 and told.json()["language"] == "german"  # detection would have said english
    # whisper-1 and German: straight to whisper-base. An identification pass would have found English and
    # handed the audio to tiny.en.
    german = await post_audio(gateway, wav, model="whisper-1", language="de", response_format="verbose_json")
    assert german.status == 200 and german.headers["x-inferbus-model"] == BASE
    assert german.json()["language"] == "german"
    # whisper-1 and English: straight to tiny.en, its first attempt; identified first, it is tiny.en's second.
    named = await post_audio(gateway, wav, model="whisper-1", language="en")
    assert named.status == 200 and named.headers["x-inferbus-model"] == TINY
    assert (await usage_event(nc, "asr", TINY, named.headers["x-request-id"])).attempt == 0
    unnamed = await post_audio(gateway, wav, model="whisper-1")
    assert unnamed.status == 200 and unnamed.headers["x-inferbus-model"] == TINY
    assert (await usage_event(nc, "asr", TINY, unnamed.headers["x-request-id"])).attempt == 1
    assert wer(speech.text([0, 1]), named.json()["text"]) <= 0.2


def noisy(clean: Wave, snr_db: float, seed: int) -> Wave:
    rms = float(np.sqrt(np.mean(clean**2)))
    white = np.random.default_rng(seed).standard_normal(clean.size).astype(np.float32)
    return (clean + white * rms / 10 ** (snr_db / 20)).astype(np.float32)


async def test_beam_size_sets_the_decoders_search(gateway: Gateway, tiny: dict[str, Any], speech: Speech) -> None:
    """beam_size=1 is greedy decoding: on noisy speech it settles for other, lower-scoring hypotheses than the
    beam of 5 that is the worker's default (an unset beam_size)."""

    async def segments(wav: bytes, **fields: Any) -> list[tuple[str, float]]:
        reply = await post_audio(gateway, wav, response_format="verbose_json", **fields)
        assert reply.status == 200, reply.body
        return [(s["text"], s["avg_logprob"]) for s in reply.json()["segments"]]

    clips = [to_wav(noisy(speech.sentences[i], snr, seed=i)) for i, snr in ((1, 0), (2, 0), (3, 5))]
    greedy = [await segments(wav, beam_size=1) for wav in clips]
    beam = [await segments(wav, beam_size=5) for wav in clips]
    default = [await segments(wav) for wav in clips]
    assert beam == default
    assert sum(g != b for g, b in zip(greedy, beam, strict=True)) >= 2, (greedy, beam)

    def score(result: list[list[tuple[str, float]]]) -> float:
        return float(np.mean([logprob for clip in result for _, logprob in clip]))

    assert score(beam) > score(greedy)  # what a wider search is for
    for bad in ("0", "11", "wide"):
        reply = await post_audio(gateway, clips[0], beam_size=bad)
        assert (reply.status, reply.error["param"]) == (400, "beam_size"), reply.body


# ---- bad input: clear errors, and the worker keeps serving ----------------------------------


async def test_garbage_and_unsupported_audio(gateway: Gateway, tiny: dict[str, Any], nc: bus.Connection) -> None:
    garbage = await post_audio(gateway, b"this is not audio at all " * 40, filename="notes.mp3")
    assert garbage.status == 400 and garbage.error["code"] == "invalid_request"
    assert "Could not decode 'notes.mp3' as audio" in garbage.error["message"]
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + b"\x00" * 200
    image = await post_audio(gateway, png, filename="cat.png")
    assert image.status == 400 and "no audio stream" in image.error["message"]
    empty = await post_audio(gateway, b"", filename="empty.wav")
    assert empty.status == 400 and "empty" in empty.error["message"]
    silence = await post_audio(gateway, to_wav(np.zeros(RATE, np.float32)))
    assert silence.status == 200
    stats = await asr_stats(nc, tiny["pid"])
    assert stats["ready"] and stats["failed"] >= 3


async def test_over_duration(gateway: Gateway, tiny: dict[str, Any], speech: Speech) -> None:
    long = to_wav(np.zeros(int((MAX_SECONDS + 5) * 8000), np.float32), rate=8000)
    reply = await post_audio(gateway, long)
    assert reply.status == 400 and f"longer than {MAX_SECONDS:g} s" in reply.error["message"]
    # An mp3 has no exact duration in its header: the limit holds while decoding too.
    tone = np.tile(speech.sentences[0], int(MAX_SECONDS * RATE / len(speech.sentences[0])) + 2)
    mp3 = encode(tone, "mp3", "libmp3lame")
    reply = await post_audio(gateway, mp3, filename="long.mp3")
    assert reply.status == 400 and f"longer than {MAX_SECONDS:g} s" in reply.error["message"]
    assert (await post_audio(gateway, to_wav(speech.sentences[0]))).status == 200


async def test_over_size(gateway: Gateway, tiny: dict[str, Any]) -> None:
    reply = await post_audio(gateway, b"\x00" * ((25 << 20) + 1))
    assert reply.status == 413
    assert reply.error["code"] == "request_too_large" and "25 MiB" in reply.error["message"]


async def test_form_errors(gateway: Gateway, tiny: dict[str, Any], speech: Speech) -> None:
    wav = to_wav(speech.sentences[0])
    cases: list[tuple[Reply, int, str]] = [
        (await post_audio(gateway, None), 400, "file"),
        (await post_audio(gateway, wav, model=None), 400, "model"),
        (await post_audio(gateway, wav, response_format="docx"), 400, "response_format"),
        (await post_audio(gateway, wav, temperature="hot"), 400, "temperature"),
        (await post_audio(gateway, wav, **{"timestamp_granularities[]": "word"}), 400, "timestamp_granularities"),
        (await post_audio(gateway, wav, colour="blue"), 400, "colour"),
        (await post_audio(gateway, wav, endpoint="translations", language="en"), 400, "language"),
        (await post_audio(gateway, wav, model="no-such-model"), 404, "model"),
    ]
    for reply, status, param in cases:
        assert (reply.status, reply.error["param"]) == (status, param), reply.body
    async with (
        aiohttp.ClientSession(headers=gateway.headers) as http,
        http.post(f"{gateway.url}/v1/audio/transcriptions", json={"model": TINY}) as resp,
    ):
        assert resp.status == 400 and "multipart/form-data" in (await resp.json())["error"]["message"]
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{gateway.url}/v1/audio/transcriptions", data={"model": TINY}) as resp,
    ):
        assert resp.status == 401


# ---- the worker's side of the protocol, straight over NATS ----------------------------------


async def raw_stream(
    nc: bus.Connection, subject: str, payload: bytes, limit: float = 30
) -> list[tuple[float, AsrChunk]]:
    """Every chunk of one stream, with the time it reached this connection: stamped in the read loop, so the
    chunks of streams read together keep the order they arrived in (a stamp taken when this task next ran
    could put a chunk that came second first)."""
    inbox = nc.new_inbox()
    arrived: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
    sub = await direct.subscribe(nc, inbox, lambda msg: arrived.put_nowait((time.monotonic(), msg.data)))
    await nc.publish(subject, payload, reply=inbox)
    out: list[tuple[float, AsrChunk]] = []
    try:
        while not out or not isinstance(out[-1][1], Transcript | ErrorChunk):
            at, data = await asyncio.wait_for(arrived.get(), limit)
            out.append((at, asr_chunk_decoder.decode(data)))
    finally:
        await sub.unsubscribe()
    return out


async def test_stream_shape_and_heartbeats(nc: bus.Connection, tiny: dict[str, Any], speech: Speech) -> None:
    indices = [0, 1, 2, 3, 4, 0, 1, 2]
    mp3 = encode(speech.joined(indices), "mp3", "libmp3lame")
    assert len(mp3) <= INLINE_MAX
    request = TranscribeRequest(request_id="asr-shape-1", model=TINY, audio=mp3)
    timed = await raw_stream(nc, subjects.infer("asr", TINY, VERSION, tiny["worker_id"]), asr_encoder.encode(request))
    chunks = [c for _, c in timed]
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert isinstance(chunks[0], Accepted) and chunks[0].worker_id == tiny["worker_id"]
    assert isinstance(chunks[-1], Transcript) and chunks[-1].version == VERSION
    segments = [c for c in chunks if isinstance(c, Segment)]
    assert [s.id for s in segments] == list(range(len(segments))) and len(segments) >= len(indices) // 2
    assert chunks[-1].text == "".join(s.text for s in segments).strip()
    assert wer(speech.text(indices), chunks[-1].text) <= 0.2
    assert any(isinstance(c, Heartbeat) for c in chunks)  # a 30 s window takes longer than heartbeat_s
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(timed)]
    assert max(gaps) < 1.5  # the gateway's idle timeout never trips


async def test_undecodable_request(nc: bus.Connection, tiny: dict[str, Any], speech: Speech) -> None:
    chunks = [c for _, c in await raw_stream(nc, subjects.infer("asr", TINY, VERSION), b"\xc1garbage")]
    assert len(chunks) == 1 and isinstance(chunks[0], ErrorChunk) and chunks[0].code == "invalid_request"
    both = TranscribeRequest(request_id="asr-both", model=TINY, audio=b"x", object_name="y")
    chunks = [c for _, c in await raw_stream(nc, subjects.infer("asr", TINY, VERSION), asr_encoder.encode(both))]
    assert isinstance(chunks[-1], ErrorChunk) and "exactly one" in chunks[-1].message
    missing = TranscribeRequest(request_id="asr-missing", model=TINY, object_name="never-stored")
    chunks = [c for _, c in await raw_stream(nc, subjects.infer("asr", TINY, VERSION), asr_encoder.encode(missing))]
    assert isinstance(chunks[-1], ErrorChunk) and chunks[-1].code == "invalid_request"


async def test_client_disconnect_cancels(
    gateway: Gateway, tiny: dict[str, Any], nc: bus.Connection, speech: Speech
) -> None:
    before = await asr_stats(nc, tiny["pid"])
    audio = speech.joined([0, 1, 2, 3, 4] * 3)
    assert len(audio) / RATE < MAX_SECONDS
    upload = asyncio.create_task(post_audio(gateway, to_wav(audio)))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (await asr_stats(nc, tiny["pid"]))["in_flight"] == 0:
        assert not upload.done()
    upload.cancel()  # the client goes away mid-transcription
    with pytest.raises(asyncio.CancelledError):
        await upload
    while time.monotonic() < deadline:
        stats = await asr_stats(nc, tiny["pid"])
        if stats["cancelled"] > before["cancelled"] and stats["in_flight"] == 0:
            break
    else:
        pytest.fail(f"the transcription was not cancelled: {stats}")
    assert stats["served"] == before["served"] + 1
    assert (await post_audio(gateway, to_wav(speech.sentences[0]))).status == 200


# ---- admission: decode only once admitted, bill by audio length -----------------------------


async def test_audio_is_decoded_only_once_admitted(nc: bus.Connection, tiny: dict[str, Any], speech: Speech) -> None:
    subject = subjects.infer("asr", TINY, VERSION, tiny["worker_id"])
    tag = secrets.token_hex(4)
    long = encode(speech.joined([0, 1, 2, 3, 4] * 3), "ogg", "libopus")  # ~50 s: seconds on the only slot
    assert len(long) <= INLINE_MAX
    requests = {
        "busy": TranscribeRequest(request_id=f"asr-busy-{tag}", model=TINY, audio=long, filename="long.ogg"),
        "queued": TranscribeRequest(request_id=f"asr-queued-{tag}", model=TINY, audio=to_wav(speech.joined([0, 1]))),
        "garbage": TranscribeRequest(request_id=f"asr-garbage-{tag}", model=TINY, audio=b"not audio " * 500,
                                     filename="notes.mp3"),
    }
    streams = {"busy": asyncio.create_task(raw_stream(nc, subject, asr_encoder.encode(requests["busy"])))}
    deadline = time.monotonic() + 20
    while (await asr_stats(nc, tiny["pid"]))["in_flight"] < 1:
        assert time.monotonic() < deadline and not streams["busy"].done()
    for name in ("queued", "garbage"):
        streams[name] = asyncio.create_task(raw_stream(nc, subject, asr_encoder.encode(requests[name])))
    while (await asr_stats(nc, tiny["pid"]))["queued"] < 1:
        assert time.monotonic() < deadline and not streams["busy"].done()
    await nc.publish(subjects.cancel(requests["queued"].request_id), b"")  # leaves while queued
    busy, queued, garbage = [await streams[name] for name in ("busy", "queued", "garbage")]
    assert isinstance(busy[-1][1], Transcript) and busy[-1][1].duration > 40
    assert isinstance(queued[-1][1], ErrorChunk) and queued[-1][1].code == "cancelled"
    assert isinstance(garbage[-1][1], ErrorChunk) and garbage[-1][1].code == "invalid_request"
    assert garbage[-1][0] > busy[-1][0]  # its upload was first read once the busy one freed the slot
    event = await usage_event(nc, "asr", TINY, requests["queued"].request_id)
    assert event.outcome == "cancelled" and event.audio_seconds_in == 0  # nothing was decoded, nothing billed


async def test_transcriptions_are_budgeted_by_audio_length(
    infra: EmbeddedStack, gateway: Gateway, tiny: dict[str, Any], nc: bus.Connection, speech: Speech
) -> None:
    created = await admin(nc, "keys.create", name="asr-budget", budget={"tokens_per_day": 100})
    key = created["key"]
    short = to_wav(speech.sentences[0])
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("file", short, filename="short.wav", content_type="application/octet-stream")
    form.add_field("model", TINY)
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http,
        http.post(f"{gateway.url}/v1/audio/transcriptions", data=form) as resp,
    ):
        assert resp.status == 200, await resp.text()
        seconds = (await resp.json())["usage"]["seconds"]
    expected = math.ceil(seconds * 10)  # 10 tokens per second of audio, settled to the decoded length
    client = aioredis.Redis.from_url(infra.redis_url)
    try:
        deadline = time.monotonic() + 5
        while True:  # the settle runs just after the response
            counters = [k async for k in client.scan_iter(f"ib:bud:key:{created['info']['id']}:tokens:d*")]
            counted = int(await client.get(counters[0]) or 0) if counters else 0
            if counted == expected or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
    finally:
        await client.aclose()
    assert counted == expected
    # ~15 s of audio (150 tokens) does not fit in what is left of 100.
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("file", to_wav(speech.joined([0, 1, 2, 3, 4])), filename="long.wav",
                   content_type="application/octet-stream")
    form.add_field("model", TINY)
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http,
        http.post(f"{gateway.url}/v1/audio/transcriptions", data=form) as resp,
    ):
        assert resp.status == 429
        error = (await resp.json())["error"]
    assert error["code"] == "insufficient_quota" and "daily tokens budget of this API key" in error["message"]
