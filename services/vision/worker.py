"""Vision worker: admission, then fetch and decode the image (limits first), run the engine, usage per image."""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any, Final

from prometheus_client import Counter, Gauge, Histogram

from contracts.errors import InferBusError, invalid
from contracts.llm import ErrorChunk
from contracts.speech import MEDIA_BUCKET
from contracts.vision import VisionDone, VisionRequest, vision_encoder, vision_request_decoder
from services.runtime import bus, worker
from services.runtime.bus import Connection
from services.runtime.replies import ReplyStream
from services.runtime.usage import UsagePublisher
from services.runtime.worker import Metrics, Worker
from services.vision import images
from services.vision.engines import Engine, Options

REQUESTS = Counter("inferbus_vision_requests_total", "Vision requests by outcome", ["model", "version", "outcome"])
IN_FLIGHT = Gauge("inferbus_vision_in_flight", "Vision requests running or queued", ["model", "version"])
DURATION = Histogram("inferbus_vision_request_seconds", "Request receipt to terminal chunk", ["model", "version"])
ENGINE_SECONDS = Histogram(
    "inferbus_vision_engine_seconds", "Engine time per image", ["model", "version"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
REFUSED = Counter("inferbus_vision_images_refused_total", "Images refused before the engine saw them", ["model"])
TASK_NOUN: Final = {"classify": "classifies images", "ocr": "reads text (OCR)", "moderate": "moderates images"}
TASK_MODEL: Final = {"classify": "efficientnet-lite0", "ocr": "ppocr-v4", "moderate": "open-nsfw"}


class Tally:
    __slots__ = ("fetched", "images")

    def __init__(self) -> None:
        self.images = 0  # images the engine worked on (a refused one is not counted)
        self.fetched = False  # its object in the media store was read (and so deleted)


class WorkerSettings(worker.WorkerSettings, kw_only=True):
    max_image_bytes: int = 20 << 20
    max_image_pixels: int = 25_000_000
    min_image_side: int = 16


class VisionWorker(Worker[VisionRequest, Tally]):
    kind = "vision"
    noun = "image analysis"
    decoder = vision_request_decoder
    encoder = vision_encoder
    terminal = (VisionDone, ErrorChunk)
    metrics = Metrics(REQUESTS, IN_FLIGHT, DURATION)

    engine: Engine
    s: WorkerSettings

    def __init__(
        self, nc: Connection, engine: Engine, settings: WorkerSettings, usage: UsagePublisher | None = None
    ) -> None:
        super().__init__(nc, engine, settings, usage)
        self.images = 0
        self.refused = 0
        self._engine_seconds = ENGINE_SECONDS.labels(*self._labels)

    def ready_fields(self) -> dict[str, Any]:
        return {"task": self.engine.task}

    def _engine_stats(self) -> dict[str, Any]:
        return {"task": self.engine.task}

    def _kind_stats(self) -> dict[str, Any]:
        return {"images": self.images, "refused": self.refused}

    def _new_tally(self) -> Tally:
        return Tally()

    def _usage_fields(self, request: VisionRequest, tally: Tally) -> dict[str, Any]:
        return {"images": tally.images}

    def _finished(self, request: VisionRequest, outcome: str, tally: Tally) -> None:
        if outcome == "invalid_request":
            self.refused += 1
            REFUSED.labels(self.s.model).inc()
        if request.object_name and not tally.fetched:
            self._spawn(self._discard(request.object_name))  # refused before reading: do not leave it

    def _check(self, request: VisionRequest) -> None:
        if (request.image is None) == (request.object_name is None):
            raise invalid("send the image inline or name its object in the media store, exactly one of them")
        task = self.engine.task
        if request.task != task:
            raise InferBusError(
                "invalid_request",
                f"The model '{self.s.model}' {TASK_NOUN[task]}; for this endpoint use a model such as "
                f"'{TASK_MODEL[request.task]}'",
                param="model",
            )
        if request.image is not None and len(request.image) > self.s.max_image_bytes:
            raise InferBusError("request_too_large", f"The image is over {self.s.max_image_bytes} bytes")

    async def _handle(self, request: VisionRequest, out: ReplyStream, received: float, tally: Tally) -> None:
        self._check(request)
        async with self._admitted(out):
            data = request.image
            if data is None:
                assert request.object_name is not None
                data = await self._beating(self._fetch(request.object_name), out)
                tally.fetched = True
            s = self.s
            image = await self._beating(
                asyncio.to_thread(images.decode, data, s.max_image_pixels, s.min_image_side), out
            )
            del data
            started = time.monotonic()
            result = await self._beating(asyncio.to_thread(self.engine.run, image, Options(top_k=request.top_k)), out)
            elapsed = time.monotonic() - started
        tally.images = 1
        self.images += 1
        self._record(1)
        self._engine_seconds.observe(elapsed)
        await out.send(VisionDone, image.width, image.height, result, self.s.version)

    async def _fetch(self, name: str) -> bytes:
        """The image from the media object store; deleted once read (it served its one request)."""
        buf = io.BytesIO()
        try:
            store = await self.nc.jetstream().object_store(MEDIA_BUCKET)
            await store.get(name, writeinto=buf)
        except bus.js_errors.NotFoundError:
            raise invalid(f"The image object '{name}' is not in the media store (expired or never stored)") from None
        finally:
            self._spawn(self._discard(name))
        if buf.tell() > self.s.max_image_bytes:
            raise InferBusError("request_too_large", f"The image is over {self.s.max_image_bytes} bytes")
        return buf.getvalue()

    async def _discard(self, name: str) -> None:
        try:
            store = await self.nc.jetstream().object_store(MEDIA_BUCKET)
            await store.delete(name)
        except bus.js_errors.NotFoundError:
            pass
        except Exception as exc:  # the bucket's TTL removes it later
            self.logger.warning("media_delete_failed", object=name, error=repr(exc))
