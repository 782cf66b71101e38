"""Shadow traffic: run a copy of a request on the shadow version and compare it with what was served."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import msgspec
from prometheus_client import Counter

from contracts import subjects
from contracts.errors import InferBusError
from contracts.llm import Delta, GenerateRequest
from contracts.registry import ShadowRecord
from services.runtime.bus import Connection
from services.runtime.streaming import StreamClient

# Similarity is 2·LCS/(len(a)+len(b)) over the first SIMILARITY_MAX_CHARS characters of each output.
# The LCS is computed bit-parallel (a few big-integer operations per character: ~5 ms for 8,000 chars
# against difflib's 0.3-35 s) in one thread off the event loop, which it lets have the GIL every
# PAUSE_EVERY characters. At most MAX_PENDING comparisons wait; beyond that a record is published
# without similarity (and counted) rather than letting comparisons pile up in memory.
SIMILARITY_MAX_CHARS = 8000
PAUSE_EVERY = 256
MAX_PENDING = 64

SKIPPED = Counter(
    "inferbus_shadow_similarity_skipped_total", "Shadow comparisons published without similarity (too many pending)"
)
_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shadow-compare")
_pending = 0


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


def lcs_length(a: str, b: str) -> int:
    """Length of the longest common subsequence (Hyyrö's bit-vector algorithm); blocking, CPU only."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    masks: dict[str, int] = {}
    for i, ch in enumerate(b):
        masks[ch] = masks.get(ch, 0) | (1 << i)
    full = (1 << len(b)) - 1
    v = full  # a zero bit marks a position of b matched so far
    for n, ch in enumerate(a, 1):
        m = masks.get(ch)
        if m:
            u = v & m
            v = ((v + u) | (v - u)) & full
        if n % PAUSE_EVERY == 0:
            time.sleep(0)  # hand the GIL to the event loop's thread if it is waiting for it
    return len(b) - v.bit_count()


def similarity(a: str, b: str) -> float:
    """2·LCS/(len(a)+len(b)) of the outputs' first SIMILARITY_MAX_CHARS characters: 1.0 when equal."""
    a, b = a[:SIMILARITY_MAX_CHARS], b[:SIMILARITY_MAX_CHARS]
    if not a and not b:
        return 1.0
    return 2 * lcs_length(a, b) / (len(a) + len(b))


async def similarity_off_loop(a: str, b: str) -> float | None:
    """`similarity` in the comparison thread; None when MAX_PENDING comparisons are waiting already."""
    global _pending
    if _pending >= MAX_PENDING:
        SKIPPED.inc()
        return None
    _pending += 1
    try:
        return await asyncio.get_running_loop().run_in_executor(_executor, similarity, a, b)
    finally:
        _pending -= 1


async def compare(
    request: GenerateRequest, version: str, served: Observed, shadow_version: str, shadow: Observed
) -> ShadowRecord:
    both_ok = served.error is None and shadow.error is None
    score = await similarity_off_loop(served.text, shadow.text) if both_ok else None
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
        similarity=None if score is None else round(score, 4),
    )


async def publish(nc: Connection, record: ShadowRecord) -> None:
    await nc.publish(subjects.SHADOW_RECORD, msgspec.msgpack.encode(record))
