"""Send a generation where the routing picks, stream it back, report the outcome; copy it to a shadow.

A stream that breaks before its first token is retried once on another worker of the same version;
a per-worker subject with no responders means that worker is gone: it leaves routing at once and the
request goes to another worker (or the version's queue group) without using up the retry.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any

from contracts import subjects
from contracts.errors import InferBusError
from contracts.llm import Accepted, Chunk, Delta, Final, GenerateRequest
from contracts.registry import Outcome, outcome_encoder
from services.gateway.catalogue import Catalogue
from services.runtime import logging as log
from services.runtime import shadow
from services.runtime.streaming import StreamClient

RETRY_CODES = frozenset({"stream_broken", "worker_timeout", "overloaded"})


class Dispatcher:
    def __init__(self, client: StreamClient, catalogue: Catalogue, *, retries: int = 1) -> None:
        self.client = client
        self.catalogue = catalogue
        self.retries = retries
        self.logger = log.get("dispatch")
        self._background: set[asyncio.Task[None]] = set()

    async def generate(
        self,
        request: GenerateRequest,
        *,
        kind: str,
        timeout_s: float,
        headers: dict[str, str] | None = None,
        key_id: str | None = None,
        affinity: str | None = None,
    ) -> AsyncGenerator[Chunk, None]:
        presence = self.catalogue.presence
        route = self.catalogue.route(
            request.model, kind, key_id=key_id, user=request.user, affinity=affinity or request.user
        )
        started = time.perf_counter()
        deadline = time.time() + timeout_s
        copy = None
        if route.shadow is not None:
            copy = asyncio.create_task(
                shadow.run_copy(self.client, kind, shadow.shadow_copy(request), route.shadow, deadline)
            )
        parts: list[str] | None = [] if copy is not None else None
        ttft: float | None = None
        excluded: set[str] = set()
        attempt = 0
        code: str | None = "cancelled"  # until the stream ends one way or the other
        try:
            while True:
                delivered = False
                worker = route.worker_id
                if worker:
                    presence.acquire(worker)
                try:
                    async for chunk in self.client.stream(
                        route.subject, request, deadline=deadline, extra_headers=headers
                    ):
                        if isinstance(chunk, Delta):
                            if ttft is None:
                                ttft = (time.perf_counter() - started) * 1000
                            if parts is not None:
                                parts.append(chunk.text)
                            delivered = True
                        elif isinstance(chunk, Accepted):
                            log.bind(worker_id=chunk.worker_id)
                        elif isinstance(chunk, Final):
                            code = None
                        yield chunk
                    return
                except InferBusError as exc:
                    code = exc.code
                    if exc.code == "no_worker" and worker:
                        presence.forget(worker)  # gone: out of routing now, not in 3 s
                    elif delivered or attempt >= self.retries or exc.code not in RETRY_CODES:
                        raise
                    else:
                        attempt += 1
                        self.logger.warning("stream_retry", error=exc.code, attempt=attempt)
                    if worker:
                        excluded.add(worker)
                    route = self.catalogue.route(
                        request.model, kind, version=route.version, affinity=affinity, exclude=frozenset(excluded)
                    )._replace(shadow=route.shadow)
                finally:
                    if worker:
                        presence.release(worker)
        finally:
            latency = (time.perf_counter() - started) * 1000
            if code != "cancelled" and not self.client.nc.is_closed:
                outcome = Outcome(request.model, route.version, code is None, code or "ok", latency, ttft)
                await self.client.nc.publish(subjects.outcome(kind, request.model), outcome_encoder.encode(outcome))
            if copy is not None:
                assert route.shadow is not None and parts is not None
                served = shadow.Observed(latency, code, "".join(parts))
                self._spawn(self._compare(request, route.version, served, route.shadow, copy))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _compare(
        self,
        request: GenerateRequest,
        version: str,
        served: shadow.Observed,
        shadow_version: str,
        copy: asyncio.Task[shadow.Observed],
    ) -> None:
        try:
            record = shadow.compare(request, version, served, shadow_version, await copy)
            await shadow.publish(self.client.nc, record)
        except Exception as exc:  # a comparison is best effort; the client was served already
            self.logger.warning("shadow_compare_failed", error=repr(exc))
