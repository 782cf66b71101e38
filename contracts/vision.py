"""Vision on the bus: one image in, a classification, OCR lines or moderation scores out.

The streaming protocol every kind shares (`infer.vision.<model>.<version>`): Accepted, Heartbeats while
queued or working, then VisionDone or an ErrorChunk. The image is raw bytes in msgpack (never base64 on
the bus): at most contracts.speech.INLINE_MAX bytes inline, larger ones through the media object store
(MEDIA_BUCKET, named by request id; the worker deletes it once read). Each vision model does one task.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta, Struct

from contracts.llm import Accepted, Attempt, Bundle, ErrorChunk, Heartbeat

Task = Literal["classify", "ocr", "moderate"]
MAX_TOP_K: Final = 20
TopK = Annotated[int, Meta(ge=1, le=MAX_TOP_K)]


class VisionRequest(Struct, frozen=True, kw_only=True, omit_defaults=True):
    request_id: str
    model: str
    task: Task
    image: bytes | None = None  # the file itself, when at most INLINE_MAX bytes
    object_name: str | None = None  # else its name in MEDIA_BUCKET
    top_k: TopK = 5  # classify: how many labels
    attempt: Attempt = 0  # see contracts.llm.GenerateRequest


class Label(Struct, frozen=True, array_like=True):
    index: int  # the model's class index (ImageNet-1k for EfficientNet-Lite0)
    label: str
    score: float  # softmax probability


class OcrLine(Struct, frozen=True, array_like=True):
    text: str
    confidence: float
    box: list[list[float]]  # four [x, y] corners in image pixels: top-left, top-right, bottom-right, bottom-left


class Classification(Struct, frozen=True, tag="cls", array_like=True):
    labels: list[Label]


class Ocr(Struct, frozen=True, tag="ocr", array_like=True):
    lines: list[OcrLine]


class Moderation(Struct, frozen=True, tag="mod", array_like=True):
    """Only the categories the model judges: a score (0..1) and whether it is over the model's threshold."""

    scores: dict[str, float]
    flagged: dict[str, bool]


Result = Classification | Ocr | Moderation


class VisionDone(Struct, frozen=True, tag="vd", array_like=True):
    """Terminal: the result, the image's size as decoded; one image is what usage counts."""

    seq: int
    width: int
    height: int
    result: Result
    version: str


VisionChunk = Accepted | Heartbeat | VisionDone | ErrorChunk | Bundle

vision_encoder = msgspec.msgpack.Encoder()
vision_request_decoder = msgspec.msgpack.Decoder(VisionRequest)
vision_chunk_decoder = msgspec.msgpack.Decoder(VisionChunk)
