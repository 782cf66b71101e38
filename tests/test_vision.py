"""Vision end to end: gateway -> NATS -> vision workers (EfficientNet-Lite0, PP-OCRv4, Open-NSFW), real models.

Images are drawn in the test with Pillow; the classification ones were checked to be what ImageNet calls
them (an analog clock face, a crossword grid). Bad images are refused cleanly and the worker keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import io
import math
import random
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
from aiohttp import web
from PIL import Image, ImageDraw, ImageFont

from contracts.speech import INLINE_MAX
from services.runtime import bus
from services.runtime.embedded import free_port
from services.runtime.local import EmbeddedStack, ServiceProcess, settings_env
from tests.conftest import ADMIN_KEY, DEFAULT_MODEL, Gateway, running_gateway, usage_event

CLASSIFY, OCR, NSFW = "efficientnet-lite0", "ppocr-v4", "open-nsfw"
Reply = tuple[int, dict[str, str], Any]


# ---- images -----------------------------------------------------------------------------------


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def analog_clock() -> Image.Image:
    image = Image.new("RGB", (224, 224), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((12, 12, 212, 212), outline="black", width=8)
    for hour in range(12):
        a = hour / 12 * 2 * math.pi
        draw.line((112 + 85 * math.sin(a), 112 - 85 * math.cos(a), 112 + 98 * math.sin(a), 112 - 98 * math.cos(a)),
                  fill="black", width=6)
    draw.line((112, 112, 112 + 50 * math.sin(2), 112 - 50 * math.cos(2)), fill="black", width=8)
    draw.line((112, 112, 112 + 80 * math.sin(4.5), 112 - 80 * math.cos(4.5)), fill="black", width=5)
    return image


def crossword() -> Image.Image:
    image = Image.new("RGB", (225, 225), "white")
    draw = ImageDraw.Draw(image)
    rnd = random.Random(1)
    for row in range(15):
        for col in range(15):
            box = (col * 15, row * 15, col * 15 + 15, row * 15 + 15)
            if rnd.random() < 0.25:
                draw.rectangle(box, fill="black")
            else:
                draw.rectangle(box, outline="black")
    return image


LINES = ["Order #4471 shipped", "Tracking: ZX-99-0031"]


def text_image() -> Image.Image:
    image = Image.new("RGB", (800, 220), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=40)
    draw.text((20, 20), LINES[0], fill="black", font=font)
    draw.text((20, 110), LINES[1], fill="black", font=font)
    return image


def bomb() -> bytes:
    """A valid PNG header claiming 20000x20000 pixels (400 M) in a few hundred bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    rows = zlib.compress(b"\x00" * (1 + 20000 // 8) * 64)  # a few rows of a 1-bit image; the rest is missing
    header = (20000).to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


# ---- workers and gateway ----------------------------------------------------------------------


async def vision_stats(nc: bus.Connection, pid: int) -> dict[str, Any]:
    for data in await bus.service_stats(nc, "inferbus-vision", wait=0.2):
        if data.get("pid") == pid:
            return data
    raise LookupError(pid)


async def wait_vision(nc: bus.Connection, gateway: Gateway, procs: dict[str, ServiceProcess]) -> None:
    deadline = time.monotonic() + 120
    waiting = dict(procs)
    while waiting and time.monotonic() < deadline:
        for proc in waiting.values():
            proc.check_alive()
        ready = {d.get("pid") for d in await bus.service_stats(nc, "inferbus-vision", wait=0.2) if d.get("ready")}
        waiting = {m: p for m, p in waiting.items() if p.pid not in ready}
    if waiting:
        raise TimeoutError("vision workers not ready:\n" + "\n".join(p.log()[-2000:] for p in procs.values()))
    for model in procs:
        await routable(gateway, model)


@pytest.fixture(scope="module")
async def workers(
    infra: EmbeddedStack, nc: bus.Connection, gateway: Gateway
) -> AsyncIterator[dict[str, ServiceProcess]]:
    procs = {
        model: ServiceProcess(f"vision-{model}", "services.vision",
                              infra.env(**settings_env(model=model, version="v1", engine_options={"threads": 1})),
                              infra.root)
        for model in (CLASSIFY, OCR, NSFW)
    }
    try:
        await wait_vision(nc, gateway, procs)
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()
    for proc in procs.values():
        assert proc.popen.returncode == 0, proc.log()[-3000:]  # drained and exited cleanly on SIGTERM


async def routable(gateway: Gateway, model: str, limit_s: float = 10) -> None:
    """The gateway lists a live worker for `model` (it heard a heartbeat)."""
    deadline = time.monotonic() + limit_s
    async with aiohttp.ClientSession(headers=gateway.headers) as http:
        while time.monotonic() < deadline:
            async with http.get(f"{gateway.url}/v1/models/{model}") as resp:
                if resp.status == 200 and (await resp.json())["workers"] >= 1:
                    return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{gateway.url} has no worker for {model}")


async def post_json(gateway: Gateway, path: str, body: dict[str, Any]) -> Reply:
    async with aiohttp.ClientSession(headers=gateway.headers) as http, \
            http.post(gateway.url + path, data=msgspec.json.encode(body),
                      headers={"Content-Type": "application/json"}) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.json()


async def upload(gateway: Gateway, path: str, data: bytes, filename: str = "image.png", **fields: str) -> Reply:
    form = aiohttp.FormData()
    form.add_field("file", data, filename=filename, content_type="application/octet-stream")
    for name, value in fields.items():
        form.add_field(name, value)
    async with aiohttp.ClientSession(headers=gateway.headers) as http, http.post(gateway.url + path, data=form) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.json()


# ---- classification, OCR, moderation ----------------------------------------------------------


async def test_classify_upload_and_data_url(workers: dict[str, ServiceProcess], gateway: Gateway) -> None:
    status, headers, body = await upload(gateway, "/v1/vision/classify", png(analog_clock()), top_k="3")
    assert status == 200, body
    assert body["object"] == "vision.classification" and body["model"] == CLASSIFY
    assert headers["x-inferbus-model-version"] == "v1"
    labels = body["data"]
    assert len(labels) == 3 and labels[0]["label"] == "analog clock" and labels[0]["index"] == 409
    assert labels[0]["score"] > 0.5 and [x["score"] for x in labels] == sorted((x["score"] for x in labels),
                                                                               reverse=True)
    assert body["image"] == {"width": 224, "height": 224} and body["usage"] == {"images": 1}
    status, _, body = await post_json(gateway, "/v1/vision/classify",
                                      {"model": CLASSIFY, "image": data_url(jpeg(crossword()), "jpeg")})
    assert status == 200, body
    assert body["data"][0]["label"] == "crossword" and len(body["data"]) == 5


async def test_ocr_reads_rendered_text(workers: dict[str, ServiceProcess], gateway: Gateway) -> None:
    status, _, body = await post_json(gateway, "/v1/vision/ocr", {"image": {"url": data_url(png(text_image()))}})
    assert status == 200, body
    assert body["object"] == "vision.ocr" and body["model"] == OCR
    assert [line["text"] for line in body["lines"]] == LINES and body["text"] == "\n".join(LINES)
    first = body["lines"][0]
    assert first["confidence"] > 0.8 and len(first["box"]) == 4
    xs, ys = [p[0] for p in first["box"]], [p[1] for p in first["box"]]
    assert 10 <= min(xs) < max(xs) <= 800 and 10 <= min(ys) < max(ys) <= 100  # the first line's place


async def test_moderation_benign_image_openai_shape(workers: dict[str, ServiceProcess], gateway: Gateway) -> None:
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    result = await client.moderations.create(
        model="omni-moderation-latest",
        input=[{"type": "image_url", "image_url": {"url": data_url(png(analog_clock()))}}],
    )
    assert result.model == NSFW and len(result.results) == 1
    raw = result.results[0].model_dump(exclude_none=True)
    assert raw["flagged"] is False
    assert raw["categories"] == {"sexual": False}  # only what the model judges; no invented scores
    assert set(raw["category_scores"]) == {"sexual"} and raw["category_scores"]["sexual"] < 0.2
    assert raw["category_applied_input_types"] == {"sexual": ["image"]}
    status, _, body = await post_json(gateway, "/v1/moderations", {"input": "Is this text fine?"})
    assert status == 400 and body["error"]["param"] == "input" and "images only" in body["error"]["message"]


async def test_wrong_task_for_the_model(workers: dict[str, ServiceProcess], gateway: Gateway) -> None:
    status, _, body = await upload(gateway, "/v1/vision/classify", png(analog_clock()), model=OCR)
    assert status == 400 and body["error"]["param"] == "model" and CLASSIFY in body["error"]["message"]


# ---- bad images, limits, remote URLs --------------------------------------------------------


async def test_bad_images_refused_and_the_worker_keeps_serving(
    workers: dict[str, ServiceProcess], nc: bus.Connection, gateway: Gateway
) -> None:
    whole = jpeg(crossword())
    bad = {
        "not a png": (b"\x89PNG\r\n\x1a\n" + b"this is not a PNG at all" * 20, "not an image"),
        "text named .png": (b"hello, I am a text file" * 10, "not an image"),
        "truncated jpeg": (whole[: len(whole) // 2], "truncated or corrupt"),
        "decompression bomb": (bomb(), "the limit is 25,000,000"),
        "1x1": (png(Image.new("RGB", (1, 1), "red")), "at least 16"),
    }
    proc = workers[CLASSIFY]
    before = await vision_stats(nc, proc.pid)
    for name, (data, reason) in bad.items():
        status, _, body = await upload(gateway, "/v1/vision/classify", data)
        assert status == 400, (name, body)
        assert body["error"]["code"] == "invalid_request" and body["error"]["param"] == "image", name
        assert reason in body["error"]["message"], (name, body["error"]["message"])
    after = await vision_stats(nc, proc.pid)
    assert after["refused"] - before["refused"] == len(bad) and after["images"] == before["images"]
    status, _, body = await upload(gateway, "/v1/vision/classify", png(analog_clock()))
    assert status == 200 and body["data"][0]["label"] == "analog clock"
    proc.check_alive()


async def test_size_limit_is_413(workers: dict[str, ServiceProcess], gateway: Gateway) -> None:
    too_big = b"\x89PNG" + bytes(20 << 20)
    status, _, body = await upload(gateway, "/v1/vision/classify", too_big)
    assert status == 413 and body["error"]["code"] == "request_too_large" and body["error"]["param"] == "file"
    status, _, body = await post_json(gateway, "/v1/vision/ocr", {"image": data_url(too_big)})
    assert status == 413 and body["error"]["code"] == "request_too_large"


async def test_large_image_goes_through_the_media_store(
    workers: dict[str, ServiceProcess], nc: bus.Connection, gateway: Gateway
) -> None:
    rnd = random.Random(7)
    noise = Image.frombytes("RGB", (700, 700), bytes(rnd.getrandbits(8) for _ in range(700 * 700 * 3)))
    data = png(noise)
    assert len(data) > INLINE_MAX
    status, headers, body = await upload(gateway, "/v1/vision/classify", data)
    assert status == 200 and body["image"] == {"width": 700, "height": 700}
    event = await usage_event(nc, "vision", CLASSIFY, headers["x-request-id"])
    assert event.kind == "vision" and event.images == 1 and event.outcome == "ok" and event.key_id is not None


async def test_remote_urls_only_from_the_allowlist(
    workers: dict[str, ServiceProcess], infra: EmbeddedStack, gateway: Gateway
) -> None:
    hits: list[str] = []
    image = png(analog_clock())

    async def serve(request: web.Request) -> web.StreamResponse:
        hits.append(request.path)
        if request.path == "/hop.png":
            raise web.HTTPFound("/clock.png")
        return web.Response(body=image, content_type="image/png")

    app = web.Application()
    app.router.add_get("/{name}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        url = f"http://127.0.0.1:{port}/clock.png"
        status, _, body = await post_json(gateway, "/v1/vision/classify", {"image": url})  # no allowlist: no fetch
        assert status == 400 and "not allowed" in body["error"]["message"] and hits == []
        async with running_gateway(infra, image_url_allowlist=["127.0.0.1"]) as allowing:
            await routable(allowing, CLASSIFY)
            status, _, body = await post_json(allowing, "/v1/vision/classify", {"image": url})
            assert status == 200 and body["data"][0]["label"] == "analog clock"
            status, _, body = await post_json(allowing, "/v1/vision/classify",
                                              {"image": f"http://127.0.0.1:{port}/hop.png"})
            assert status == 400 and "redirects are not followed" in body["error"]["message"]
            status, _, body = await post_json(allowing, "/v1/vision/classify", {"image": "http://localhost:1/x.png"})
            assert status == 400 and "not allowed" in body["error"]["message"]
        assert hits == ["/clock.png", "/hop.png"]
    finally:
        await runner.cleanup()


async def test_chat_with_an_image_to_a_text_model_is_400(gateway: Gateway) -> None:
    status, _, body = await post_json(gateway, "/v1/chat/completions", {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image_url", "image_url": {"url": data_url(png(analog_clock()))}},
        ]}],
    })
    assert status == 400 and body["error"]["param"] == "messages[0].content"
    assert "text content only" in body["error"]["message"]


