"""OpenAI-compatible speech to text: /v1/audio/transcriptions and /v1/audio/translations.

The upload is read as a stream (the app's body limit is for JSON; audio has its own, max_audio_bytes).
Audio up to INLINE_MAX bytes rides in the request message; a larger file goes to the media object
store first and the worker fetches (and deletes) it. Segments stream back as the worker decodes them.

Speaker diarization: `response_format=diarized_json` (OpenAI's shape: segments with `speaker`, `start`,
`end`, `text`), or `diarize=true` (InferBus) for `speaker` on verbose_json segments; `chunking_strategy`
("auto", or a server_vad object whose threshold and silence_duration_ms set the speech detector);
`known_speaker_names[]` with `known_speaker_references[]` (data URLs of 2-10 s clips) name the speakers.

Languages (settings.asr_multilingual): while a multilingual model is live, whisper-1 sends it translations and
any `language` but English; with no `language` it asks that worker to identify the language, which transcribes
the rest itself and hands English back, undecoded, for the alias's own model (services/speech/asr/handoff.py).
`x-inferbus-model` names the model that transcribed.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import time
from collections.abc import AsyncGenerator
from typing import Any, Literal, NamedTuple

import msgspec
from aiohttp import BodyPartReader, web

from contracts.errors import InferBusError, invalid
from contracts.llm import Accepted
from contracts.speech import (
    INLINE_MAX,
    MAX_SPEAKERS,
    MEDIA_BUCKET,
    REFERENCES_MAX,
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
from services.gateway.openai_routes import MODEL_HEADER, VERSION_HEADER
from services.gateway.openai_routes import _timeout as request_timeout
from services.gateway.state import GATEWAY, Gateway
from services.runtime import bus
from services.runtime import logging as log
from services.runtime.bus import ObjectStore, ObjectStoreConfig
from services.speech.asr import handoff

routes = web.RouteTableDef()

Task = Literal["transcribe", "translate"]
FIELD_MAX = 64 * 1024  # any form field but the file
READ_CHUNK = 256 * 1024
MEDIA_TTL_S = 3600.0  # an upload nobody fetched (worker gone mid-request) expires from the store
_COMMON = frozenset({"file", "model", "prompt", "temperature", "response_format", "beam_size"})
_SPEAKERS = frozenset({"known_speaker_names[]", "known_speaker_names", "known_speaker_references[]",
                       "known_speaker_references", "chunking_strategy", "diarize"})
_FIELDS: dict[Task, frozenset[str]] = {
    "transcribe": _COMMON | _SPEAKERS | {"language", "timestamp_granularities[]", "timestamp_granularities", "stream"},
    "translate": _COMMON,
}
ENGLISH = "en"
_DATA_URL = re.compile(r"^data:(audio|video|application)/[\w.+-]+(;[\w=.+-]+)*;base64,", re.IGNORECASE)


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
    beam_size: int | None = None  # InferBus: 1 (greedy) to 10; unset, the worker's default
    diarize: bool = False
    speaker_names: list[str] = []
    speaker_references: list[bytes] = []
    vad_threshold: float | None = None
    vad_silence_ms: int | None = None


@routes.post("/v1/audio/transcriptions")
async def transcriptions(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "transcribe", "transcr-")


@routes.post("/v1/audio/translations")
async def translations(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "translate", "transl-")


class Plan(NamedTuple):
    """Where a transcription goes: `model` first; `own` is the alias's own model (today's, English-only), which
    serves it when `model` has no worker after all and, with `identify`, gets the audio `model` found English."""

    model: str
    own: str
    identify: bool = False


async def _handle(request: web.Request, task: Task, prefix: str) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    key = await gw.authorize(request)
    timeout = request_timeout(request, gw)
    form = await _read_form(request, gw.settings.max_audio_bytes, task)
    plan = _plan(gw, key, form, task)
    rid = prefix + secrets.token_hex(12)
    seconds = upload_seconds_bound(form.audio, gw.settings.max_audio_seconds)
    grant = await gw.admit_request(key, request.path, "asr", plan.model, rid, seconds)
    try:
        return await _transcribe(request, gw, key, form, task, plan, rid, timeout, grant.headers if grant else {})
    finally:
        gw.release(key, grant, plan.model)


def _plan(gw: Gateway, key: KeyRecord, form: Form, task: Task) -> Plan:
    """asr_multilingual: whisper-1 reaches whisper-base, while one is live, for what is not English."""
    own = gw.settings.model_aliases.get(form.model, form.model)
    multilingual = gw.settings.asr_multilingual.get(form.model)
    if (multilingual is None or multilingual == own or not key.allows("asr", multilingual)
            or not any(w.ready for w in gw.catalogue.presence.live("asr", multilingual))):
        return Plan(own, own)
    language = (form.language or "").strip().lower()
    if task == "translate" or language not in ("", ENGLISH):
        return Plan(multilingual, own)
    if language or form.diarize:  # a diarized request is served where it lands: no second pass over its audio
        return Plan(own, own)
    return Plan(multilingual, own, identify=True)


async def _transcribe(
    request: web.Request, gw: Gateway, key: KeyRecord, form: Form, task: Task, plan: Plan, rid: str,
    timeout_s: float, limit_headers: dict[str, str],
) -> web.StreamResponse:
    model = plan.model
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
            beam_size=form.beam_size,
            diarize=form.diarize,
            speaker_names=form.speaker_names,
            speaker_references=form.speaker_references,
            vad_threshold=form.vad_threshold,
            vad_silence_ms=form.vad_silence_ms,
        )
        audio, form.audio = form.audio, b""
        deadline = time.time() + timeout_s
        handoff_to = frozenset({ENGLISH}) if plan.identify else frozenset[str]()
        try:
            chunks, accepted = await _open(gw, request, key, transcribe, audio, deadline, handoff_to)
        except InferBusError as exc:
            if model == plan.own or exc.code != "no_worker":
                raise
            # The multilingual worker went away since its last heartbeat: today's model, as if it never ran.
            model, handoff_to = plan.own, frozenset()
            transcribe = msgspec.structs.replace(transcribe, model=model)
            chunks, accepted = await _open(gw, request, key, transcribe, audio, deadline, handoff_to)
        try:
            if handoff_to:
                result = await _first_result(chunks)
                if isinstance(result, Transcript) and result.language in handoff_to and not result.text:
                    # Identified as English: the alias's own model transcribes it (attempt 1 in the ledger).
                    await chunks.aclose()
                    model = plan.own
                    transcribe = msgspec.structs.replace(transcribe, model=model, language=result.language, attempt=1)
                    chunks, accepted = await _open(gw, request, key, transcribe, audio, deadline, frozenset())
                else:
                    chunks = _chain(result, chunks)
            del audio
            headers = {VERSION_HEADER: accepted.version, MODEL_HEADER: model, "x-request-id": rid, **limit_headers}
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


async def _open(
    gw: Gateway, http: web.Request, key: KeyRecord, transcribe: TranscribeRequest, audio: bytes, deadline: float,
    handoff_to: frozenset[str],
) -> tuple[AsyncGenerator[Any, None], Accepted]:
    """The request sent to a worker of its model (the audio inline or through the media store), once accepted."""
    route = gw.catalogue.route(transcribe.model, "asr", key_id=key.id)
    rid = transcribe.request_id
    # A name per attempt: the worker that identified the language may still be deleting the first copy.
    name = rid if transcribe.attempt == 0 else f"{rid}-{transcribe.attempt}"
    store = None
    if len(audio) > INLINE_MAX - sum(len(r) for r in transcribe.speaker_references):
        store = await put_media(gw, name, audio, "upload")
        transcribe = msgspec.structs.replace(transcribe, object_name=name)
    else:
        transcribe = msgspec.structs.replace(transcribe, audio=audio)
    headers = {**gw.bus_headers(http, key), **(handoff.header(handoff_to) if handoff_to else {})}
    chunks = gw.metered_audio(rid, gw.dispatcher.open(
        "asr", transcribe.model, route, asr_encoder.encode(transcribe), rid, decoder=asr_chunk_decoder,
        terminal=(Transcript,), progress=(Segment,), retries=0, deadline=deadline, headers=headers,
    ))
    try:
        first = await anext(chunks)  # errors before the first byte keep their HTTP status
    except BaseException:
        await chunks.aclose()
        if store is not None:  # no worker took it: nobody else will delete it
            await _discard(store, name)
        raise
    assert isinstance(first, Accepted)
    return chunks, first


async def _first_result(chunks: AsyncGenerator[Any, None]) -> Segment | Transcript:
    async for chunk in chunks:
        if isinstance(chunk, Segment | Transcript):
            return chunk
    raise InferBusError("stream_broken", "the stream ended without a transcript")


async def _chain(first: Segment | Transcript, rest: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
    try:
        yield first
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()


def _respond(
    form: Form, task: Task, done: Transcript, segments: list[Segment], headers: dict[str, str]
) -> web.Response:
    fmt = form.response_format
    if fmt == "json":
        return json_response(200, transcripts.as_json(done), headers)
    if fmt == "verbose_json":
        body = transcripts.as_verbose_json(done, segments, task, form.temperature, form.granularities)
        return json_response(200, body, headers)
    if fmt == "diarized_json":
        return json_response(200, transcripts.as_diarized_json(done, segments), headers)
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
    lists: dict[str, list[str]] = {"known_speaker_names": [], "known_speaker_references": []}
    strategy: dict[str, str] = {}
    audio: bytes | None = None
    filename = "audio"
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise invalid("Nested multipart bodies are not supported")
            name = part.name or ""
            nested = re.fullmatch(r"chunking_strategy\[(\w+)\]", name)  # the openai SDK's form of an object
            if nested and task == "transcribe":
                strategy[nested.group(1)] = (await _read_limited(part, FIELD_MAX, name)).decode(errors="replace")
                continue
            if name not in _FIELDS[task]:
                raise invalid(f"Unrecognized request argument supplied: {name}", name)
            if name == "file":
                audio = await _read_limited(part, max_bytes, "file")
                filename = part.filename or filename
                continue
            limit = REFERENCES_MAX * 4 // 3 + 1024 if name.startswith("known_speaker_references") else FIELD_MAX
            value = (await _read_limited(part, limit, name)).decode("utf-8", errors="replace")
            if name.startswith("timestamp_granularities"):
                granularities.append(value)
            elif name.startswith("known_speaker"):
                lists[name.removesuffix("[]")].append(value)
            else:
                fields[name] = value
    except (ValueError, AssertionError, RuntimeError) as exc:  # aiohttp's multipart parser on a broken body
        raise invalid(f"Malformed multipart/form-data body: {exc}") from None
    if audio is None:
        raise invalid("You must provide a 'file' field with the audio", "file")
    if strategy:
        fields["chunking_strategy"] = json.dumps({k: v if k == "type" else _number(v) for k, v in strategy.items()})
    form = _form(audio, filename, fields, granularities)
    _speakers(form, fields, lists)
    return form


def _number(text: str) -> float | int | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def _speakers(form: Form, fields: dict[str, str], lists: dict[str, list[str]]) -> None:
    """Diarization fields onto `form`; the worker checks the rest (lengths, names, clips)."""
    names, urls = lists["known_speaker_names"], lists["known_speaker_references"]
    diarize = fields.get("diarize", "false").strip().lower()
    if diarize not in ("true", "false"):
        raise invalid("diarize must be true or false", "diarize")
    form.diarize = form.response_format == "diarized_json" or diarize == "true"
    if form.diarize and form.response_format not in ("diarized_json", "verbose_json", "json", "text"):
        raise invalid("speaker labels need response_format diarized_json or verbose_json", "response_format")
    if (names or urls) and not form.diarize:
        raise invalid("known_speaker_names[] need response_format 'diarized_json'", "known_speaker_names")
    if len(names) > MAX_SPEAKERS or len(urls) > MAX_SPEAKERS:
        raise invalid(f"at most {MAX_SPEAKERS} known speakers", "known_speaker_names")
    if len(names) != len(urls):
        raise invalid("give one known_speaker_references[] data URL per known_speaker_names[] entry",
                      "known_speaker_references")
    refs = []
    for url in urls:
        head = _DATA_URL.match(url.strip())
        if head is None:
            raise invalid("known_speaker_references[] must be data URLs (data:audio/wav;base64,...)",
                          "known_speaker_references")
        try:
            refs.append(base64.b64decode(url.strip()[head.end() :], validate=True))
        except (binascii.Error, ValueError):
            raise invalid("a known_speaker_references[] data URL is not valid base64", "known_speaker_references") \
                from None
    if sum(len(r) for r in refs) > REFERENCES_MAX:
        raise invalid(f"known_speaker_references[] are over {REFERENCES_MAX // 1024} KiB together: send short "
                      "(2-10 s) or compressed clips", "known_speaker_references")
    form.speaker_names, form.speaker_references = [n.strip() for n in names], refs
    form.vad_threshold, form.vad_silence_ms = _chunking(fields.get("chunking_strategy"))


def _chunking(value: str | None) -> tuple[float | None, int | None]:
    """chunking_strategy: "auto", or a server_vad object (its threshold and silence_duration_ms)."""
    if value is None or value.strip() in ("", "auto", '"auto"'):
        return None, None
    try:
        strategy = json.loads(value)
    except ValueError:
        raise invalid("chunking_strategy must be 'auto' or a server_vad JSON object", "chunking_strategy") from None
    if not isinstance(strategy, dict) or strategy.get("type") != "server_vad":
        raise invalid("chunking_strategy must be 'auto' or {\"type\": \"server_vad\", ...}", "chunking_strategy")
    unknown = set(strategy) - {"type", "threshold", "silence_duration_ms", "prefix_padding_ms"}
    if unknown:
        raise invalid(f"unknown chunking_strategy field {sorted(unknown)[0]!r}", "chunking_strategy")
    threshold, silence = strategy.get("threshold"), strategy.get("silence_duration_ms")
    if threshold is not None and (not isinstance(threshold, int | float) or not 0 <= threshold <= 1):
        raise invalid("chunking_strategy.threshold must be between 0 and 1", "chunking_strategy")
    if silence is not None and (not isinstance(silence, int) or not 0 <= silence <= 10_000):
        raise invalid("chunking_strategy.silence_duration_ms must be 0-10000", "chunking_strategy")
    return (float(threshold) if threshold is not None else None), silence


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
    # As OpenAI: segment (its default) goes with any format and changes nothing outside verbose_json (json is
    # still {text, usage}); word timestamps exist only in verbose_json, so word with another format is refused.
    if "word" in granularities and fmt != "verbose_json":
        raise invalid("timestamp_granularities[] 'word' requires response_format 'verbose_json'",
                      "timestamp_granularities")
    stream = fields.get("stream", "false").strip().lower()
    if stream not in ("true", "false"):
        raise invalid("stream must be true or false", "stream")
    if stream == "true" and fmt not in ("json", "text"):
        raise invalid("stream=true needs response_format 'json' or 'text'", "stream")
    beam_size = None
    if fields.get("beam_size", "").strip():
        try:
            beam_size = int(fields["beam_size"])
        except ValueError:
            raise invalid("beam_size must be a whole number from 1 to 10", "beam_size") from None
        if not 1 <= beam_size <= 10:
            raise invalid("beam_size must be between 1 and 10", "beam_size")
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
        beam_size=beam_size,
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


async def put_media(gw: Gateway, name: str, data: bytes, what: str) -> ObjectStore:
    """`data` in the media object store under `name`, for a worker to read; a 500 to retry when it is away."""
    try:
        store = await _media_store(gw)
        await store.put(name, data)
    except (bus.errors.Error, TimeoutError) as exc:
        log.get("gateway").warning("media_store_failed", error=repr(exc))
        raise InferBusError("internal_error", f"Could not store the {what} for the worker; retry") from None
    return store


async def _discard(store: ObjectStore, name: str) -> None:
    try:
        await store.delete(name)
    except bus.js_errors.NotFoundError:
        pass
    except Exception as exc:  # the bucket's TTL removes it later
        log.get("gateway").warning("media_delete_failed", object=name, error=repr(exc))
