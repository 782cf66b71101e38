"""Vision: POST /v1/vision/classify, POST /v1/vision/ocr, and POST /v1/moderations for images (OpenAI's shape).

Images arrive as a multipart upload (`file`) or in JSON as a `data:` URL; an http(s) URL is fetched only
when its host is on the operator's allowlist (INFERBUS_IMAGE_URL_ALLOWLIST; empty by default, so no
request can make the gateway fetch from the network), without redirects, within the size limit. The
worker checks the pixels (format, canvas size, truncation) before decoding; images over INLINE_MAX
bytes reach it through the media object store, as audio does.
"""

from __future__ import annotations

import base64
import binascii
import functools
import secrets
import time
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import msgspec
from aiohttp import BodyPartReader, web

from contracts.errors import InferBusError, invalid
from contracts.llm import Accepted
from contracts.speech import INLINE_MAX
from contracts.vision import (
    MAX_TOP_K,
    Classification,
    Moderation,
    Ocr,
    Task,
    VisionDone,
    VisionRequest,
    vision_chunk_decoder,
    vision_encoder,
)
from services.gateway.audio_routes import _discard, put_media
from services.gateway.auth import KeyRecord
from services.gateway.dispatch import Served
from services.gateway.errors import from_validation, json_response
from services.gateway.openai_routes import VERSION_HEADER, _timeout
from services.gateway.state import GATEWAY, Gateway
from services.runtime import settings

routes = web.RouteTableDef()

DEFAULT_MODELS: Final[dict[Task, str]] = {"classify": "efficientnet-lite0", "ocr": "ppocr-v4", "moderate": "open-nsfw"}
# OpenAI's moderation model names: images are judged by ours.
MODERATION_ALIASES: Final = {"omni-moderation-latest": "open-nsfw", "omni-moderation-2024-09-26": "open-nsfw",
                             "text-moderation-latest": "open-nsfw", "text-moderation-stable": "open-nsfw"}
MAX_MODERATION_IMAGES: Final = 8
FIELD_MAX: Final = 4096
READ_CHUNK: Final = 256 * 1024


class ImageSettings(msgspec.Struct, kw_only=True):
    """The gateway's image intake (TOML table [images], or INFERBUS_<FIELD>)."""

    image_url_allowlist: list[str] = []  # hosts whose http(s) image URLs the gateway may fetch
    max_image_bytes: int = 20 << 20
    image_fetch_timeout_s: float = 10.0


@functools.cache
def image_settings() -> ImageSettings:
    return settings.load(ImageSettings, "images")


class ImageBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    image: str | dict[str, Any]  # a data: or http(s) URL, or OpenAI's {"url": ...}
    model: str | None = None
    top_k: int = 5


class ModerationBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    input: str | list[Any]
    model: str | None = None


# ---- routes -----------------------------------------------------------------------------------


@routes.post("/v1/vision/classify")
async def classify(request: web.Request) -> web.Response:
    return await _single(request, "classify")


@routes.post("/v1/vision/ocr")
async def ocr(request: web.Request) -> web.Response:
    return await _single(request, "ocr")


async def _single(request: web.Request, task: Task) -> web.Response:
    gw = request.app[GATEWAY]
    key = await gw.authorize(request)
    cfg = image_settings()
    if request.content_type.startswith("multipart/form-data"):
        data, fields = await _read_form(request, cfg.max_image_bytes, {"model", "top_k"})
        model = fields.get("model") or DEFAULT_MODELS[task]
        top_k = _top_k(fields.get("top_k", "5"))
    else:
        body = await _read_json(request, ImageBody, cfg.max_image_bytes)
        model = body.model or DEFAULT_MODELS[task]
        top_k = _top_k(body.top_k)
        data = await load_image(body.image, cfg, "image")
    rid = ("vcls-" if task == "classify" else "vocr-") + secrets.token_hex(12)
    done = await analyse(gw, key, model, task, data, rid, top_k, endpoint=request.path,
                         timeout_s=_timeout(request, gw), headers=gw.bus_headers(request, key))
    headers = {VERSION_HEADER: done.version, "x-request-id": rid}
    image = {"width": done.width, "height": done.height}
    if isinstance(done.result, Classification):
        labels = [{"label": x.label, "index": x.index, "score": x.score} for x in done.result.labels]
        return json_response(200, {"object": "vision.classification", "model": model, "data": labels,
                                   "image": image, "usage": {"images": 1}}, headers)
    if isinstance(done.result, Ocr):
        lines = [{"text": x.text, "confidence": x.confidence, "box": x.box} for x in done.result.lines]
        return json_response(200, {"object": "vision.ocr", "model": model, "text": "\n".join(x.text for x in
                                   done.result.lines), "lines": lines, "image": image, "usage": {"images": 1}},
                             headers)
    raise InferBusError("stream_broken", f"the worker answered a {task} request with another task's result")


@routes.post("/v1/moderations")
async def moderations(request: web.Request) -> web.Response:
    """One result per image, with only the categories the model judges (category_applied_input_types says which)."""
    gw = request.app[GATEWAY]
    key = await gw.authorize(request)
    body = await _read_json(request, ModerationBody, image_settings().max_image_bytes)
    rid = "modr-" + secrets.token_hex(12)
    result, version = await moderate(gw, key, body, rid, endpoint=request.path, timeout_s=_timeout(request, gw),
                                     headers=gw.bus_headers(request, key))
    return json_response(200, result, {VERSION_HEADER: version, "x-request-id": rid})


def moderation_model(model: str | None) -> str:
    """The model that judges the images (OpenAI's moderation model names are ours)."""
    return MODERATION_ALIASES.get(model or "omni-moderation-latest", model or "")


def check_moderation(body: ModerationBody, cfg: ImageSettings) -> str:
    """What can be checked without the images' bytes from the network (a batch line is checked so at creation):
    the input's shape, each data: URL, each http(s) URL's host on the allowlist. The model that judges them."""
    for i, source in enumerate(_moderation_images(body.input)):
        image_source(source, cfg, f"input[{i}].image_url.url")
    return moderation_model(body.model)


async def moderate(
    gw: Gateway, key: KeyRecord, body: ModerationBody, rid: str, *, endpoint: str, timeout_s: float,
    headers: dict[str, str], attempt: int = 0, served: Served | None = None, batch: bool = False,
) -> tuple[dict[str, Any], str]:
    """POST /v1/moderations for a decoded body (the route's and a batch line's): the response body, and the
    version that judged. One worker request per image: `rid`, or `rid-<i>` when there are several."""
    cfg = image_settings()
    model = moderation_model(body.model)
    urls = _moderation_images(body.input)
    datas = [await load_image(url, cfg, f"input[{i}].image_url.url") for i, url in enumerate(urls)]
    results = []
    version = ""
    for i, data in enumerate(datas):
        done = await analyse(gw, key, model, "moderate", data, f"{rid}-{i}" if len(datas) > 1 else rid,
                             endpoint=endpoint, timeout_s=timeout_s, headers=headers, attempt=attempt,
                             served=served, batch=batch)
        if not isinstance(done.result, Moderation):
            raise InferBusError("stream_broken", "the worker answered a moderation request with another result")
        version = done.version
        scores = done.result.scores
        results.append({
            "flagged": any(done.result.flagged.values()),
            "categories": done.result.flagged,
            "category_scores": scores,
            "category_applied_input_types": {name: ["image"] for name in scores},
        })
    return {"id": rid, "model": model, "results": results}, version


def _moderation_images(raw: str | list[Any]) -> list[str | dict[str, Any]]:
    text_refused = invalid(
        "This deployment moderates images only (Open-NSFW judges sexual content); send image_url parts", "input"
    )
    if isinstance(raw, str):
        raise text_refused
    if not raw:
        raise invalid("input must not be empty", "input")
    if len(raw) > MAX_MODERATION_IMAGES:
        raise invalid(f"input holds {len(raw)} items; the limit is {MAX_MODERATION_IMAGES} images", "input")
    urls: list[str | dict[str, Any]] = []
    for i, part in enumerate(raw):
        if isinstance(part, str) or (isinstance(part, dict) and part.get("type") == "text"):
            raise text_refused
        if not isinstance(part, dict) or part.get("type") != "image_url" or "image_url" not in part:
            raise invalid(f"input[{i}] must be {{\"type\": \"image_url\", \"image_url\": {{\"url\": ...}}}}",
                          f"input[{i}]")
        urls.append(part["image_url"])
    return urls


def _top_k(raw: int | str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise invalid(f"top_k must be an integer from 1 to {MAX_TOP_K}", "top_k") from None
    if not 1 <= value <= MAX_TOP_K:
        raise invalid(f"top_k must be an integer from 1 to {MAX_TOP_K}", "top_k")
    return value


# ---- one image to a worker ----------------------------------------------------------------------


async def analyse(
    gw: Gateway, key: KeyRecord, model: str, task: Task, data: bytes, rid: str, top_k: int = 5, *, endpoint: str,
    timeout_s: float, headers: dict[str, str], attempt: int = 0, served: Served | None = None, batch: bool = False,
) -> VisionDone:
    """Send one image to a worker of `model` (inline, or through the media store) and wait for its result
    (`headers` go on the bus request; `attempt`: a batch line's run, see contracts.llm.GenerateRequest; `batch`:
    admitted at the batch discount)."""
    grant = await gw.admit_request(key, endpoint, "vision", model, rid, batch=batch, images=1)
    store = None
    accepted = judged = False
    try:
        route = gw.catalogue.route(model, "vision", key_id=key.id)
        vision = VisionRequest(request_id=rid, model=model, task=task, top_k=top_k, attempt=attempt)
        if len(data) > INLINE_MAX:
            store = await put_media(gw, rid, data, "image")
            vision = msgspec.structs.replace(vision, object_name=rid)
        else:
            vision = msgspec.structs.replace(vision, image=data)
        chunks = gw.dispatcher.open(
            "vision", model, route, vision_encoder.encode(vision), rid, decoder=vision_chunk_decoder,
            terminal=(VisionDone,), progress=(), retries=0, deadline=time.time() + timeout_s, headers=headers,
        )
        try:
            async for chunk in chunks:
                if isinstance(chunk, Accepted):
                    accepted = True
                    if served is not None:
                        served.model, served.version, served.worker_id = model, chunk.version, chunk.worker_id
                        served.attempts += 1
                elif isinstance(chunk, VisionDone):
                    judged = True
                    return chunk
        finally:
            await chunks.aclose()
        raise InferBusError("stream_broken", "the stream ended without a result")
    except InferBusError as exc:
        if exc.param is None and exc.code == "invalid_request":
            # ErrorChunk carries no param: the worker refuses the image, or a model that does another task.
            exc.param = "model" if "use a model such as" in exc.message else "image"
        raise exc.with_headers({**(grant.headers if grant else {}), **exc.headers}) from None
    finally:
        # The budget pays for an image judged (the ledger's row); one refused or failed costs nothing.
        gw.release(key, grant if grant is None or judged else grant._replace(images=0), model)
        if store is not None and not accepted:  # no worker took it: nobody else will delete it
            await _discard(store, rid)


# ---- reading images -------------------------------------------------------------------------------


async def load_image(source: str | dict[str, Any], cfg: ImageSettings, param: str) -> bytes:
    """The bytes of a data: URL, or of an allowlisted http(s) URL; never a fetch from anywhere else."""
    checked = image_source(source, cfg, param)
    return checked if isinstance(checked, bytes) else await _fetch(checked, cfg, param)


def image_source(source: str | dict[str, Any], cfg: ImageSettings, param: str) -> bytes | str:
    """A data: URL's bytes, or an http(s) URL whose host is on the allowlist (to fetch); anything else refused."""
    url = source.get("url") if isinstance(source, dict) else source
    if not isinstance(url, str) or not url:
        raise invalid("Give the image as a data: URL, an allowed https URL, or upload it as a file", param)
    if url.startswith("data:"):
        return _data_url(url, cfg.max_image_bytes, param)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise invalid("The image URL must be a data: URL or an http(s) URL", param)
    if parts.hostname.lower() not in {h.lower() for h in cfg.image_url_allowlist}:
        raise invalid(
            f"Fetching images from '{parts.hostname}' is not allowed: send a data: URL or upload the file "
            "(operators allow hosts with INFERBUS_IMAGE_URL_ALLOWLIST)", param,
        )
    return url


def _data_url(url: str, limit: int, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64") or not header[5:].startswith("image/"):
        raise invalid("A data URL must look like data:image/<type>;base64,<data>", param)
    if len(payload) > (limit // 3 + 2) * 4:
        raise _too_large(limit, param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("The data URL's base64 is not valid", param) from None


async def _fetch(url: str, cfg: ImageSettings, param: str) -> bytes:
    timeout = aiohttp.ClientTimeout(total=cfg.image_fetch_timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http, http.get(url, allow_redirects=False) as resp:
            if resp.status != 200:
                raise invalid(f"Fetching the image URL answered HTTP {resp.status} (redirects are not followed)",
                              param)
            if resp.content_length is not None and resp.content_length > cfg.max_image_bytes:
                raise _too_large(cfg.max_image_bytes, param)
            buf = bytearray()
            async for chunk in resp.content.iter_chunked(READ_CHUNK):
                buf += chunk
                if len(buf) > cfg.max_image_bytes:
                    raise _too_large(cfg.max_image_bytes, param)
            return bytes(buf)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise invalid(f"Could not fetch the image URL: {type(exc).__name__}", param) from None


def _too_large(limit: int, param: str) -> InferBusError:
    return InferBusError("request_too_large", f"The image is larger than the limit of {limit} bytes "
                         f"({limit / (1 << 20):g} MiB)", param=param)


async def _read_json(request: web.Request, cls: type[Any], max_image_bytes: int) -> Any:
    """The JSON body, read with room for base64 images (the app's 1 MiB body limit is for text requests)."""
    limit = (max_image_bytes // 3 + 2) * 4 + 64 * 1024
    if request.content_length is not None and request.content_length > limit:
        raise InferBusError("request_too_large", f"The request body is larger than {limit} bytes")
    buf = bytearray()
    async for chunk in request.content.iter_chunked(READ_CHUNK):
        buf += chunk
        if len(buf) > limit:
            raise InferBusError("request_too_large", f"The request body is larger than {limit} bytes")
    if not buf:
        raise invalid("The request body is empty: send a JSON object, or multipart/form-data with a 'file'")
    try:
        return msgspec.json.decode(bytes(buf), type=cls)
    except msgspec.MsgspecError as exc:
        raise from_validation(exc) from None


async def _read_form(request: web.Request, max_bytes: int, allowed: set[str]) -> tuple[bytes, dict[str, str]]:
    fields: dict[str, str] = {}
    data: bytes | None = None
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise invalid("Nested multipart bodies are not supported")
            name = part.name or ""
            if name == "file":
                data = await _read_part(part, max_bytes, name)
            elif name in allowed:
                fields[name] = (await _read_part(part, FIELD_MAX, name)).decode("utf-8", "replace").strip()
            else:
                raise invalid(f"Unrecognized request argument supplied: {name}", name)
    except (ValueError, AssertionError, RuntimeError) as exc:  # aiohttp's multipart parser on a broken body
        raise invalid(f"Malformed multipart/form-data body: {exc}") from None
    if data is None:
        raise invalid("You must provide a 'file' field with the image", "file")
    return data, fields


async def _read_part(part: BodyPartReader, limit: int, name: str) -> bytes:
    buf = bytearray()
    while chunk := await part.read_chunk(READ_CHUNK):
        buf += chunk
        if len(buf) > limit:
            if name == "file":
                raise _too_large(limit, "file")
            raise invalid(f"The field '{name}' is longer than {limit} bytes", name)
    return bytes(buf)
