"""Shadow traffic: run a copy of a request on the shadow version and compare it with what was served."""

from __future__ import annotations

import difflib
import time
from typing import NamedTuple

import msgspec

from contracts import subjects
from contracts.errors import InferBusError
from contracts.llm import Delta, GenerateRequest
from contracts.registry import ShadowRecord
from services.runtime.bus import Connection
from services.runtime.streaming import StreamClient

SIMILARITY_MAX_CHARS = 4000  # difflib is quadratic: compare long outputs by their first few thousand chars


class Observed(NamedTuple):
    latency_ms: float
    error: str | None
    text: str


def shadow_copy(request: GenerateRequest) -> GenerateRequest:
    return msgspec.structs.replace(request, request_id=f"{request.request_id}-shadow", shadow=True)


async def run_copy(
    client: StreamClient, kind: str, request: GenerateRequest, version: str, deadline: float
) -> Observed:
    """Stream the shadow copy on its version's queue group to the end; its output goes nowhere else."""
    started = time.perf_counter()
    parts: list[str] = []
    error = None
    try:
        async for chunk in client.stream(subjects.infer(kind, request.model, version), request, deadline=deadline):
            if isinstance(chunk, Delta):
                parts.append(chunk.text)
    except InferBusError as exc:
        error = exc.code
    return Observed((time.perf_counter() - started) * 1000, error, "".join(parts))


def similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a[:SIMILARITY_MAX_CHARS], b[:SIMILARITY_MAX_CHARS], autojunk=False).ratio()


def compare(
    request: GenerateRequest, version: str, served: Observed, shadow_version: str, shadow: Observed
) -> ShadowRecord:
    both_ok = served.error is None and shadow.error is None
    return ShadowRecord(
        model=request.model,
        request_id=request.request_id,
        version=version,
        shadow_version=shadow_version,
        latency_ms=round(served.latency_ms, 3),
        shadow_latency_ms=round(shadow.latency_ms, 3),
        error=served.error,
        shadow_error=shadow.error,
        output_chars=len(served.text),
        shadow_output_chars=len(shadow.text),
        similarity=round(similarity(served.text, shadow.text), 4) if both_ok else None,
    )


async def publish(nc: Connection, record: ShadowRecord) -> None:
    await nc.publish(subjects.SHADOW_RECORD, msgspec.msgpack.encode(record))
