"""OpenAI-compatible speech to text: /v1/audio/transcriptions and /v1/audio/translations.

The upload is read as a stream (the app's body limit is for JSON; audio has its own, max_audio_bytes).
Audio up to INLINE_MAX bytes rides in the request message; a larger file goes to the media object
store first and the worker fetches (and deletes) it. Segments stream back as the worker decodes them.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncGenerator
from typing import Any, Literal

import msgspec
from aiohttp import BodyPartReader, web

from contracts.errors import InferBusError, invalid
from contracts.llm import Accepted
from contracts.speech import (
    INLINE_MAX,
    MEDIA_BUCKET,
    Segment,
    TranscribeRequest,
    Transcript,
    asr_chunk_decoder,
    asr_encoder,
)
from services.gateway import transcripts
from services.gateway.auth import KeyRecord
from services.gateway.errors import json_response
from services.gateway.formats import sse
from services.gateway.governance import upload_seconds_bound
from services.gateway.openai_routes import VERSION_HEADER
from services.gateway.openai_routes import _timeout as request_timeout
from services.gateway.state import GATEWAY, Gateway
from services.runtime import bus
from services.runtime import logging as log
from services.runtime.bus import ObjectStore, ObjectStoreConfig
from services.runtime.routing import Route

routes = web.RouteTableDef()

Task = Literal["transcribe", "translate"]
FIELD_MAX = 64 * 1024  # any form field but the file
READ_CHUNK = 256 * 1024
MEDIA_TTL_S = 3600.0  # an upload nobody fetched (worker gone mid-request) expires from the store
_COMMON = frozenset({"file", "model", "prompt", "temperature", "response_format"})
_FIELDS: dict[Task, frozenset[str]] = {
    "transcribe": _COMMON | {"language", "timestamp_granularities[]", "timestamp_granularities", "stream"},
    "translate": _COMMON,
}


class Form(msgspec.Struct, kw_only=True):
    audio: bytes
    filename: str
    model: str
    language: str | None = None
    prompt: str | None = None
    temperature: float = 0.0
    response_format: str = "json"
    granularities: list[str] = []
    stream: bool = False


@routes.post("/v1/audio/transcriptions")
async def transcriptions(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "transcribe", "transcr-")


@routes.post("/v1/audio/translations")
async def translations(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "translate", "transl-")


async def _handle(request: web.Request, task: Task, prefix: str) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    key = await gw.authorize(request)
    timeout = request_timeout(request, gw)
    form = await _read_form(request, gw.settings.max_audio_bytes, task)
    model = gw.settings.model_aliases.get(form.model, form.model)
    rid = prefix + secrets.token_hex(12)
    seconds = upload_seconds_bound(form.audio, gw.settings.max_audio_seconds)
    grant = await gw.admit_request(key, request.path, "asr", model, rid, seconds)
    try:
        return await _transcribe(request, gw, key, form, task, model, rid, timeout, grant.headers if grant else {})
    finally:
        gw.release(key, grant, model)


async def _transcribe(
    request: web.Request, gw: Gateway, key: KeyRecord, form: Form, task: Task, model: str, rid: str, timeout_s: float,
    limit_headers: dict[str, str],
) -> web.StreamResponse:
    with log.bound(request_id=rid, model=model):
        transcribe = TranscribeRequest(
            request_id=rid,
            model=model,
            task=task,
            filename=form.filename,
            language=form.language,
            prompt=form.prompt,
            temperature=form.temperature,
            word_timestamps="word" in form.granularities,
        )
        route = gw.catalogue.route(model, "asr", key_id=key.id)
        store = None
        if len(form.audio) > INLINE_MAX:
            try:
                store = await _media_store(gw)
                await store.put(rid, form.audio)
            except (bus.errors.Error, TimeoutError) as exc:
                log.get("gateway").warning("media_store_failed", error=repr(exc))
                raise InferBusError("internal_error", "Could not store the upload for the worker; retry") from None
            transcribe = msgspec.structs.replace(transcribe, object_name=rid)
        else:
            transcribe = msgspec.structs.replace(transcribe, audio=form.audio)
        form.audio = b""
        chunks = _stream(gw, route, asr_encoder.encode(transcribe), transcribe, time.time() + timeout_s, request, key)
        accepted = False
        try:
            first = await anext(chunks)  # errors before the first byte keep their HTTP status
            assert isinstance(first, Accepted)
            accepted = True
            headers = {VERSION_HEADER: first.version, "x-request-id": rid, **limit_headers}
            if form.stream:
                return await _stream_events(request, chunks, headers)
            segments: list[Segment] = []
            async for chunk in chunks:
                if isinstance(chunk, Segment):
                    segments.append(chunk)
                elif isinstance(chunk, Transcript):
                    return _respond(form, task, chunk, segments, headers)
            raise InferBusError("stream_broken", "the stream ended without a transcript")
        finally:
            await chunks.aclose()
            if store is not None and not accepted:  # no worker took it: nobody else will delete it
                await _discard(store, rid)


def _stream(
    gw: Gateway,
    route: Route,
    payload: bytes,
    request: TranscribeRequest,
    deadline: float,
    http: web.Request,
    key: KeyRecord,
) -> AsyncGenerator[Any, None]:
    """The worker's chunks; a per-worker subject without responders is forgotten and the queue group tried."""
    return gw.metered_audio(request.request_id, gw.dispatcher.open(
        "asr", request.model, route, payload, request.request_id, decoder=asr_chunk_decoder,
        terminal=(Transcript,), progress=(Segment,), retries=0, deadline=deadline,
        headers=gw.bus_headers(http, key),
    ))


def _respond(
    form: Form, task: Task, done: Transcript, segments: list[Segment], headers: dict[str, str]
) -> web.Response:
    fmt = form.response_format
    if fmt == "json":
        return json_response(200, transcripts.as_json(done), headers)
    if fmt == "verbose_json":
        body = transcripts.as_verbose_json(done, segments, task, form.temperature, form.granularities)
        return json_response(200, body, headers)
    if fmt == "text":
        text = transcripts.as_text(done)
    elif fmt == "srt":
        text = transcripts.as_srt(segments)
    else:
        text = transcripts.as_vtt(segments)
    content_type = "text/vtt" if fmt == "vtt" else "text/plain"
    return web.Response(status=200, text=text, content_type=content_type, headers=headers)


async def _stream_events(request: web.Request, chunks: Any, headers: dict[str, str]) -> web.StreamResponse:
    """OpenAI's transcription stream: a transcript.text.delta event per segment, then transcript.text.done."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers}
    )
    await response.prepare(request)
    first = True
    try:
        async for chunk in chunks:
            if isinstance(chunk, Segment):
                delta = chunk.text.lstrip() if first else chunk.text
                first = False
                await response.write(sse({"type": "transcript.text.delta", "delta": delta}))
            elif isinstance(chunk, Transcript):
                await response.write(sse({"type": "transcript.text.done", "text": chunk.text}))
    except InferBusError as exc:
        # Mid-stream failure: a terminal error event, never a clean end.
        log.get("gateway").warning("stream_failed", code=exc.code, error=exc.message)
        await response.write(sse(exc.openai_body()))
    return response


# ---- the upload -------------------------------------------------------------------------------


async def _read_form(request: web.Request, max_bytes: int, task: Task) -> Form:
    if not request.content_type.startswith("multipart/form-data"):
        raise invalid("Send the audio as multipart/form-data with a 'file' field and a 'model' field")
    fields: dict[str, str] = {}
    granularities: list[str] = []
    audio: bytes | None = None
    filename = "audio"
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise invalid("Nested multipart bodies are not supported")
            name = part.name or ""
            if name not in _FIELDS[task]:
                raise invalid(f"Unrecognized request argument supplied: {name}", name)
            if name == "file":
                audio = await _read_limited(part, max_bytes, "file")
                filename = part.filename or filename
                continue
            value = (await _read_limited(part, FIELD_MAX, name)).decode("utf-8", errors="replace")
            if name.startswith("timestamp_granularities"):
                granularities.append(value)
            else:
                fields[name] = value
    except (ValueError, AssertionError, RuntimeError) as exc:  # aiohttp's multipart parser on a broken body
        raise invalid(f"Malformed multipart/form-data body: {exc}") from None
    if audio is None:
        raise invalid("You must provide a 'file' field with the audio", "file")
    return _form(audio, filename, fields, granularities)


async def _read_limited(part: BodyPartReader, limit: int, name: str) -> bytes:
    buf = bytearray()
    while chunk := await part.read_chunk(READ_CHUNK):
        buf += chunk
        if len(buf) > limit:
            if name == "file":
                raise InferBusError(
                    "request_too_large",
                    f"The audio file is larger than the limit of {limit} bytes ({limit / (1 << 20):g} MiB): "
                    "split or compress it",
                    param="file",
                )
            raise invalid(f"The field '{name}' is longer than {limit} bytes", name)
    return bytes(buf)


def _form(audio: bytes, filename: str, fields: dict[str, str], granularities: list[str]) -> Form:
    model = fields.get("model", "").strip()
    if not model:
        raise invalid("You must provide a model parameter", "model")
    fmt = fields.get("response_format", "json").strip() or "json"
    if fmt not in transcripts.FORMATS:
        choices = ", ".join(transcripts.FORMATS)
        raise invalid(f"response_format must be one of {choices}; got '{fmt}'", "response_format")
    temperature = 0.0
    if fields.get("temperature", "").strip():
        try:
            temperature = float(fields["temperature"])
        except ValueError:
            raise invalid("temperature must be a number between 0 and 1", "temperature") from None
        if not 0.0 <= temperature <= 1.0:
            raise invalid("temperature must be between 0 and 1", "temperature")
    for value in granularities:
        if value not in transcripts.GRANULARITIES:
            raise invalid("timestamp_granularities[] values must be 'segment' or 'word'", "timestamp_granularities")
    if granularities and fmt != "verbose_json":
        raise invalid("timestamp_granularities requires response_format 'verbose_json'", "timestamp_granularities")
    stream = fields.get("stream", "false").strip().lower()
    if stream not in ("true", "false"):
        raise invalid("stream must be true or false", "stream")
    if stream == "true" and fmt not in ("json", "text"):
        raise invalid("stream=true needs response_format 'json' or 'text'", "stream")
    return Form(
        audio=audio,
        filename=filename,
        model=model,
        language=fields.get("language", "").strip() or None,
        prompt=fields.get("prompt") or None,
        temperature=temperature,
        response_format=fmt,
        granularities=granularities,
        stream=stream == "true",
    )


# ---- the media object store -------------------------------------------------------------------


async def _media_store(gw: Gateway) -> ObjectStore:
    js = gw.service.bus.jetstream()
    try:
        return await js.object_store(MEDIA_BUCKET)
    except bus.js_errors.BucketNotFoundError:
        try:
            config = ObjectStoreConfig(description="InferBus media too large to send inline", ttl=MEDIA_TTL_S)
            return await js.create_object_store(MEDIA_BUCKET, config)
        except bus.js_errors.BadRequestError:  # created meanwhile by another gateway
            return await js.object_store(MEDIA_BUCKET)


async def _discard(store: ObjectStore, name: str) -> None:
    try:
        await store.delete(name)
    except bus.js_errors.NotFoundError:
        pass
    except Exception as exc:  # the bucket's TTL removes it later
        log.get("gateway").warning("media_delete_failed", object=name, error=repr(exc))
