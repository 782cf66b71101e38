#!/usr/bin/env python
"""Benchmark vision: latency per image and images/s for classification, OCR and moderation, engine vs gateway.

    python bench/bench_vision.py [--quick]

For each vision model (EfficientNet-Lite0 classification of a 224x224 drawing, PP-OCRv4 OCR of an 800x220
image with two lines of text, Open-NSFW moderation of the 224x224 drawing):

  1. engine only: the worker's engine class in this process, image already decoded;
  2. through the platform: the PNG uploaded (multipart) to a gateway process, a vision worker process over
     NATS (decode and checks, engine, JSON back), one request at a time; then 4 clients for images/s.

Latency is the median of the runs (p90 beside it). Starts its own embedded nats-server, PostgreSQL and Redis
on free ports; every process it starts is stopped at the end. Prints "[bench] ..." progress lines and a
table, and writes section `vision` of bench/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import io
import math
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from bench import harness  # noqa: E402
from bench.bench_spine import CpuMeter, Results, machine, rss_mib  # noqa: E402
from bench.harness import say  # noqa: E402
from bench.results import write_section  # noqa: E402
from services.runtime.embedded import free_port  # noqa: E402
from services.runtime.local import EmbeddedStack, ServiceProcess, settings_env, wait_http  # noqa: E402
from services.vision import images  # noqa: E402
from services.vision.engines import Options, create  # noqa: E402

ADMIN_KEY = "ib-bench-admin-" + secrets.token_hex(16)
RESULTS_PATH = ROOT / "bench" / "RESULTS.md"
FULL = {"runs": 30, "window_s": 10.0}
QUICK = {"runs": 5, "window_s": 3.0}
CLIENTS = 4


def clock() -> Image.Image:
    image = Image.new("RGB", (224, 224), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((12, 12, 212, 212), outline="black", width=8)
    for hour in range(12):
        a = hour / 12 * 2 * math.pi
        draw.line((112 + 85 * math.sin(a), 112 - 85 * math.cos(a), 112 + 98 * math.sin(a), 112 - 98 * math.cos(a)),
                  fill="black", width=6)
    draw.line((112, 112, 137, 89), fill="black", width=8)
    return image


def text() -> Image.Image:
    image = Image.new("RGB", (800, 220), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=40)
    draw.text((20, 20), "Order #4471 shipped", fill="black", font=font)
    draw.text((20, 110), "Tracking: ZX-99-0031", fill="black", font=font)
    return image


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


# model, engine, endpoint, image
CASES = [
    ("efficientnet-lite0", "efficientnet-lite", "/v1/vision/classify", clock),
    ("ppocr-v4", "rapidocr", "/v1/vision/ocr", text),
    ("open-nsfw", "open-nsfw", "/v1/moderations", clock),
]


async def call(http: aiohttp.ClientSession, url: str, path: str, model: str, data: bytes) -> None:
    if path == "/v1/moderations":
        import base64

        body = {"model": model, "input": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(data).decode()}}]}
        async with http.post(url + path, json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(await resp.text())
            await resp.read()
        return
    form = aiohttp.FormData()
    form.add_field("file", data, filename="image.png", content_type="image/png")
    form.add_field("model", model)
    async with http.post(url + path, data=form) as resp:
        if resp.status != 200:
            raise RuntimeError(await resp.text())
        await resp.read()


async def client(http: aiohttp.ClientSession, url: str, path: str, model: str, data: bytes, end: float) -> int:
    done = 0
    while time.perf_counter() < end:
        await call(http, url, path, model, data)
        done += 1
    return done


def stats_ms(walls: list[float]) -> str:
    walls = sorted(walls)
    p90 = walls[min(len(walls) - 1, int(len(walls) * 0.9))]
    return f"{statistics.median(walls) * 1000:.0f} ms (p90 {p90 * 1000:.0f})"


async def bench(cfg: dict[str, Any], infra: EmbeddedStack, procs: list[ServiceProcess], res: Results) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gateway = ServiceProcess("gateway", "services.gateway",
                             infra.env(INFERBUS_PORT=str(port), INFERBUS_ADMIN_KEY=ADMIN_KEY), infra.root)
    procs.append(gateway)
    workers = {}
    for model, _, _, _ in CASES:
        workers[model] = ServiceProcess(f"vision-{model}", "services.vision",
                                        infra.env(**settings_env(model=model, version="v1")), infra.root)
        procs.append(workers[model])
    await wait_http(url, gateway)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as http:
        for model, _, _, _ in CASES:
            deadline = time.monotonic() + 180
            while True:
                workers[model].check_alive()
                async with http.get(f"{url}/v1/models/{model}") as resp:
                    if resp.status == 200 and (await resp.json())["workers"] >= 1:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(model)
                await asyncio.sleep(0.2)
        for model, engine_name, path, draw in CASES:
            data = png(draw())
            say(f"{model}: engine only, then through the gateway, {cfg['runs']} runs each")
            engine = create(engine_name, {})
            started = time.perf_counter()
            await engine.load(lambda step, f: None)
            load_s = time.perf_counter() - started
            image = images.decode(data, 25_000_000, 16)
            local: list[float] = []
            for _ in range(cfg["runs"]):
                t = time.perf_counter()
                await asyncio.to_thread(engine.run, image, Options())
                local.append(time.perf_counter() - t)
            await engine.close()
            await call(http, url, path, model, data)  # warm
            remote: list[float] = []
            meter = CpuMeter({"gateway": gateway.pid, "worker": workers[model].pid, "nats": infra.nats_pid})
            with meter:
                for _ in range(cfg["runs"]):
                    t = time.perf_counter()
                    await call(http, url, path, model, data)
                    remote.append(time.perf_counter() - t)
            t = time.perf_counter()
            counts = await asyncio.gather(*(
                client(http, url, path, model, data, t + cfg["window_s"]) for _ in range(CLIENTS)))
            per_s = sum(counts) / (time.perf_counter() - t)
            res.add("1", f"{model}: engine only, per image", stats_ms(local))
            res.add("2", f"{model}: gateway -> NATS -> worker, per image", stats_ms(remote))
            res.add("2", f"{model}: images/s with {CLIENTS} clients", f"{per_s:.1f}")
            rss, hwm = rss_mib(workers[model].pid)
            res.note(f"{model}: image {len(data) / 1024:.0f} KiB PNG; engine load {load_s:.1f} s in this process; "
                     f"worker RSS {rss:.0f} MiB (peak {hwm:.0f} MiB); {meter.summary()} (sequential runs)")


def write_results(res: Results, quick: bool, outcome: harness.Outcome) -> str:
    about = [
        "Images drawn with Pillow: a 224x224 analog clock (classification, moderation), an 800x220 image with "
        "two lines of text (OCR). Engines at their defaults (torch / ONNX Runtime threads: all cores; RapidOCR's "
        "detector input capped at 960 px on the long side).",
        *harness.noise(CpuMeter.others, outcome),
    ]
    text_ = harness.markdown("InferBus vision benchmark", "bench_vision.py", quick, outcome, about, res.table(),
                             res.notes)
    write_section(RESULTS_PATH, "vision", text_)
    return text_


def main() -> int:
    args = harness.arguments(__doc__, "5 runs per model, 3 s windows (~1 minute)")
    cfg = QUICK if args.quick else FULL
    res = Results()
    outcome = harness.run("vision", lambda infra, procs: bench(cfg, infra, procs, res), quick=args.quick,
                          machine=machine())
    if outcome is None:
        return 1
    write_results(res, args.quick, outcome)
    harness.report("vision", res.table(), outcome, RESULTS_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
