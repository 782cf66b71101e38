"""POST /v1/audio/speech: OpenAI-compatible text to speech, streamed to the client as the worker speaks.

The response starts once the first sentence's audio arrives, so any failure before that (bad input,
no worker, unknown voice) is an OpenAI-style JSON error with its status. After that a failure cuts
the connection (stream_format "audio": a truncated body, never a clean end) or ends the event stream
with an error event (stream_format "sse", as the chat stream does). A client that leaves cancels the
synthesis.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import AsyncGenerator
from typing import Annotated, Any, Final, Literal, Protocol

import msgspec
from aiohttp import web

from contracts.errors import InferBusError, invalid
from contracts.llm import Accepted
from contracts.speech import AudioChunk, SpeechDone, SpeechRequest, asr_encoder, tts_chunk_decoder
from services.gateway.auth import KeyRecord
from services.gateway.formats import sse
from services.gateway.governance import audio_tokens, speech_seconds_bound
from services.gateway.openai_routes import MODEL_HEADER, VERSION_HEADER, _decode, _timeout
from services.gateway.speech_formats import AudioEncoder, Format, content_type, encoder_for
from services.gateway.state import GATEWAY, Gateway
from services.runtime import bus
from services.runtime import logging as log

# OpenAI's voice names: each is spoken by the model's default voice.
OPENAI_VOICES: Final = frozenset(
    "alloy ash ballad coral echo fable nova onyx sage shimmer verse marin cedar".split()
)
DEFAULT_RATE: Final = 24_000  # only for an answer with no audio at all (nothing speakable in the input)
SAMPLE_RATE_HEADER: Final = "x-inferbus-sample-rate"

routes = web.RouteTableDef()


class SpeechBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    input: str
    voice: str
    response_format: Format = "mp3"
    speed: Annotated[float, msgspec.Meta(ge=0.25, le=4.0)] = 1.0
    instructions: str | None = None
    stream_format: Literal["audio", "sse"] = "audio"


class SpeechUsage(msgspec.Struct):
    """What a synthesis used. OpenAI counts text tokens in and audio tokens out; hibari has no text
    tokenizer, so `input_tokens` are the characters synthesized (as the usage ledger bills them) and
    `output_tokens` the audio at 10 tokens a second (what a key's token budget is charged for it)."""

    input_tokens: int
    output_tokens: int
    total_tokens: int


class SpeechAudioDelta(msgspec.Struct, tag_field="type", tag="speech.audio.delta"):
    """stream_format "sse": the next piece of the audio, base64, in the response_format asked for."""

    audio: str


class SpeechAudioDone(msgspec.Struct, tag_field="type", tag="speech.audio.done"):
    """stream_format "sse": the last event of a synthesis that ended well."""

    usage: SpeechUsage


def speech_usage(done: SpeechDone) -> SpeechUsage:
    audio = audio_tokens(done.audio_seconds)
    return SpeechUsage(input_tokens=done.characters, output_tokens=audio, total_tokens=done.characters + audio)


def _speech_request(body: SpeechBody, model: str, request_id: str, max_chars: int) -> SpeechRequest:
    if not body.input.strip():
        raise invalid("input must not be empty", "input")
    if len(body.input) > max_chars:
        raise invalid(f"input is {len(body.input)} characters; the limit is {max_chars}", "input")
    if body.instructions is not None and len(body.instructions) > max_chars:
        raise invalid(f"instructions are {len(body.instructions)} characters; the limit is {max_chars}",
                      "instructions")
    return SpeechRequest(request_id=request_id, model=model, input=body.input, voice=engine_voice(body.voice),
                         speed=body.speed, instructions=body.instructions or None)


def engine_voice(voice: str | None) -> str | None:
    """The voice to ask the engine for: None (its default) for OpenAI's names."""
    return None if voice is None or voice.lower() in OPENAI_VOICES else voice


@routes.get("/v1/audio/voices")
async def voices(request: web.Request) -> web.Response:
    """Every voice a live TTS worker offers, with its language and sample rate; OpenAI's names map to each
    model's default voice."""
    gw = request.app[GATEWAY]
    key = await gw.authorize(request)
    data: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for stats in await bus.service_stats(gw.service.bus, "inferbus-tts", wait=0.3):
        model, voice_info = stats.get("model"), stats.get("voice_info") or {}
        if not stats.get("ready") or not isinstance(model, str) or not key.allows("tts", model):
            continue
        for name in stats.get("voices", []):
            if (model, name) in seen:
                continue
            seen.add((model, name))
            data.append({"id": name, "object": "audio.voice", "model": model, **voice_info.get(name, {}),
                         "sample_rate": stats.get("sample_rate"), "default": name == stats.get("default_voice"),
                         "aliases": sorted(OPENAI_VOICES) if name == stats.get("default_voice") else []})
    data.sort(key=lambda v: (v["model"], v["id"]))
    return web.json_response({"object": "list", "data": data})


def text_language(text: str) -> str | None:
    """"ja" for text with kana or kanji in it, else None (hibari's English serves it)."""
    for ch in text:
        if "\u3040" <= ch <= "\u30ff" or "\u4e00" <= ch <= "\u9fff":
            return "ja"
    return None


def speech_model(gw: Gateway, key: KeyRecord, body: SpeechBody) -> str:
    """The model that speaks `body`: its alias's, or (settings.tts_languages) a live voice model of the input's
    language when the voice is one of OpenAI's names (or none), so `tts-1` reads Japanese with a Japanese voice."""
    model = gw.settings.model_aliases.get(body.model, body.model)
    by_language = gw.settings.tts_languages.get(body.model)
    if by_language and engine_voice(body.voice) is None:
        other = by_language.get(text_language(body.input) or "")
        if (other is not None and other != model and key.allows("tts", other)
                and any(w.ready for w in gw.catalogue.presence.live("tts", other))):
            return other
    return model


@routes.post("/v1/audio/speech")
async def speech(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    key = await gw.authorize(request)
    body: SpeechBody = await _decode(request, SpeechBody)
    model = speech_model(gw, key, body)
    rid = "speech-" + secrets.token_hex(12)
    speech_request = _speech_request(body, model, rid, gw.settings.max_speech_chars)
    seconds = speech_seconds_bound(len(body.input), body.speed)
    grant = await gw.admit_request(key, request.path, "tts", model, rid, seconds)
    try:
        return await _speak(request, gw, key, body, speech_request, grant.headers if grant else {})
    finally:
        gw.release(key, grant, model)


async def _speak(
    request: web.Request, gw: Gateway, key: KeyRecord, body: SpeechBody, speech_request: SpeechRequest,
    limit_headers: dict[str, str],
) -> web.StreamResponse:
    rid, model = speech_request.request_id, speech_request.model
    deadline = time.time() + _timeout(request, gw)
    with log.bound(request_id=rid, model=model):
        chunks = _synthesize(gw, request, key, speech_request, deadline)
        try:
            accepted = await anext(chunks)  # errors until the first audio keep their HTTP status
            assert isinstance(accepted, Accepted)
            first = await anext(chunks)
            assert isinstance(first, AudioChunk | SpeechDone)
            rate = first.sample_rate if isinstance(first, AudioChunk) else DEFAULT_RATE
            encoder = encoder_for(body.response_format, rate)
            events = body.stream_format == "sse"
            response = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream" if events else content_type(body.response_format),
                    "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no",
                    VERSION_HEADER: accepted.version,
                    MODEL_HEADER: model,
                    SAMPLE_RATE_HEADER: str(rate),
                    "x-request-id": rid,
                    **limit_headers,
                }
            )
            await response.prepare(request)
            out = EventStream(response) if events else AudioBody(request, response)
            await _stream(out, encoder, first, chunks)
            return response
        finally:
            await chunks.aclose()  # at once: a client that left cancels the synthesis


class Output(Protocol):
    """Where the encoded audio goes once the headers are out: the body itself, or OpenAI's events."""

    async def audio(self, data: bytes) -> None: ...

    async def done(self, done: SpeechDone) -> None: ...

    async def failed(self, exc: InferBusError) -> None: ...


class AudioBody:
    """stream_format "audio": the bytes as they are encoded; a failure cuts the connection."""

    def __init__(self, request: web.Request, response: web.StreamResponse) -> None:
        self.request, self.response = request, response

    async def audio(self, data: bytes) -> None:
        if data:
            await self.response.write(data)

    async def done(self, done: SpeechDone) -> None:
        await self.response.write_eof()

    async def failed(self, exc: InferBusError) -> None:
        # No final chunk: the client sees a cut connection, never a clean end of a short file.
        if self.request.transport is not None:
            self.request.transport.abort()


class EventStream:
    """stream_format "sse": speech.audio.delta events, then speech.audio.done; a failure is an error event."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response

    async def audio(self, data: bytes) -> None:
        if data:
            await self.response.write(sse(SpeechAudioDelta(base64.b64encode(data).decode())))

    async def done(self, done: SpeechDone) -> None:
        await self.response.write(sse(SpeechAudioDone(speech_usage(done))))
        await self.response.write_eof()

    async def failed(self, exc: InferBusError) -> None:
        await self.response.write(sse(exc.openai_body()))  # the chat stream's terminal error event


async def _stream(out: Output, encoder: AudioEncoder, first: Any, chunks: Any) -> None:
    try:
        await _pump(out, encoder, first, chunks)
    except ConnectionResetError:  # the client left; the caller's aclose() cancels the synthesis
        log.get("gateway").info("speech_client_left")


async def _pump(out: Output, encoder: AudioEncoder, first: Any, chunks: Any) -> None:
    chunk = first
    try:
        while True:
            if isinstance(chunk, AudioChunk):
                await out.audio(await _encode(encoder, encoder.feed, chunk.pcm))
            elif isinstance(chunk, SpeechDone):
                await out.audio(await _encode(encoder, encoder.finish))
                await out.done(chunk)
                return
            chunk = await anext(chunks)
    except StopAsyncIteration:
        exc = InferBusError("stream_broken", "the speech stream ended before its audio did")
    except InferBusError as failure:
        exc = failure
    log.get("gateway").warning("speech_stream_failed", code=exc.code, error=exc.message)
    await out.failed(exc)


async def _encode(encoder: AudioEncoder, step: Any, *args: Any) -> bytes:
    data: bytes = await asyncio.to_thread(step, *args) if encoder.blocking else step(*args)
    return data


def _synthesize(
    gw: Gateway, request: web.Request, key: KeyRecord, speech: SpeechRequest, deadline: float
) -> AsyncGenerator[Any, None]:
    """The worker's chunks (Accepted, AudioChunk..., SpeechDone), heartbeats left out.

    A retryable failure before any audio is retried once (the dispatcher's rules, as for generations).
    """
    route = gw.catalogue.route(speech.model, "tts", key_id=key.id)
    return gw.metered_audio(speech.request_id, gw.dispatcher.open(
        "tts", speech.model, route, asr_encoder.encode(speech), speech.request_id, decoder=tts_chunk_decoder,
        terminal=(SpeechDone,), progress=(AudioChunk,), retries=1, deadline=deadline,
        headers=gw.bus_headers(request, key),
    ))
