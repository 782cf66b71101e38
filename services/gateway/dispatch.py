"""Send a request where the routing picks, stream it back, report the outcome; copy generations to a shadow.

`open` is the one path for every kind (LLM, ASR, TTS): worker choice, retries, presence, outcomes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import msgspec

from contracts.errors import InferBusError
from contracts.llm import Accepted, Chunk, Delta, Final, GenerateRequest, chunk_decoder, request_encoder
from contracts.registry import Outcome
from services.gateway.catalogue import Catalogue
from services.runtime import logging as log
from services.runtime import shadow
from services.runtime.outcomes import OutcomeBatcher
from services.runtime.routing import Route
from services.runtime.streaming import Pace, StreamClient

RETRY_CODES = frozenset({"stream_broken", "worker_timeout", "overloaded"})


@dataclass
class Ended:
    """How a dispatched stream ended, for whoever needs more than its chunks (the shadow comparison)."""

    code: str | None = "cancelled"  # None: completed; "cancelled" until it ends one way or the other
    latency_ms: float = 0.0
    version: str = ""


def as_attempt(payload: bytes, attempt: int) -> bytes:
    """An encoded request (any kind's: a msgpack map with an `attempt` field) as attempt `attempt` (0: the first)."""
    fields = msgspec.msgpack.decode(payload)
    fields["attempt"] = attempt
    return msgspec.msgpack.encode(fields)


class Dispatcher:
    def __init__(self, client: StreamClient, catalogue: Catalogue, *, retries: int = 1) -> None:
        self.client = client
        self.catalogue = catalogue
        self.outcomes = OutcomeBatcher(client.nc)
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
        pace: Pace | None = None,
    ) -> AsyncGenerator[Chunk, None]:
        """An LLM generation where the routing picks; a sampled copy goes to the shadow version."""
        route = self.catalogue.route(
            request.model, kind, key_id=key_id, user=request.user, affinity=affinity or request.user
        )
        deadline = time.time() + timeout_s
        copy = None
        if route.shadow is not None:
            copy = asyncio.create_task(
                shadow.run_copy(self.client, kind, shadow.shadow_copy(request), route.shadow, deadline)
            )
        parts: list[str] = []
        ended = Ended()
        chunks = self.open(
            kind, request.model, route, request_encoder.encode(request), request.request_id,
            decoder=chunk_decoder, terminal=(Final,), progress=(Delta,), retries=self.retries,
            deadline=deadline, headers=headers, affinity=affinity, ended=ended, pace=pace,
        )
        try:
            async for chunk in chunks:
                if copy is not None and isinstance(chunk, Delta):
                    parts.append(chunk.text)
                yield chunk
        finally:
            await chunks.aclose()
            if copy is not None:
                assert route.shadow is not None
                served = shadow.Observed(ended.latency_ms, ended.code, "".join(parts))
                self._spawn(self._compare(request, ended.version, served, route.shadow, copy))

    async def open(
        self,
        kind: str,
        model: str,
        route: Route,
        payload: bytes,
        request_id: str,
        *,
        decoder: msgspec.msgpack.Decoder[Any],
        terminal: tuple[type, ...],
        progress: tuple[type, ...],
        retries: int,
        deadline: float,
        headers: dict[str, str] | None = None,
        affinity: str | None = None,
        ended: Ended | None = None,
        pace: Pace | None = None,
    ) -> AsyncGenerator[Any, None]:
        """Any kind's request on `route`: its chunks (one Accepted), then the outcome to the registry.

        A per-worker subject with no responders means that worker is gone: it leaves routing at once and
        the request goes to another worker (or the version's queue group) without using up a retry.
        Other retryable failures are retried up to `retries` times while no `progress` chunk (a token,
        a piece of audio) has reached the caller. Time to the first `progress` chunk is the outcome's TTFT.
        Every send after the first is a new attempt under the same request id (the request's `attempt`
        field), so each attempt's usage is its own in the ledger.
        """
        presence = self.catalogue.presence
        ended = ended or Ended()
        started = time.perf_counter()
        ttft: float | None = None
        accepted = False
        excluded: set[str] = set()
        retried = 0
        sent = 0
        try:
            while True:
                ended.code = "cancelled"  # until this attempt ends one way or the other
                worker = route.worker_id
                if worker:
                    presence.acquire(worker)
                body = payload if sent == 0 else as_attempt(payload, sent)
                sent += 1
                chunks = self.client.open(
                    route.subject, body, request_id, decoder=decoder, terminal=terminal, what=repr(model),
                    deadline=deadline, extra_headers=headers, pace=pace,
                )
                try:
                    async for chunk in chunks:
                        if isinstance(chunk, Accepted):
                            if accepted:  # a retry's: the caller has the version already
                                continue
                            accepted = True
                            log.bind(worker_id=chunk.worker_id)
                        elif isinstance(chunk, progress) and ttft is None:
                            ttft = (time.perf_counter() - started) * 1000
                        elif isinstance(chunk, terminal):
                            ended.code = None
                        yield chunk
                    return
                except InferBusError as exc:
                    ended.code = exc.code
                    if exc.code == "no_worker" and worker:
                        presence.forget(worker)  # gone: out of routing now, not in 3 s
                    elif ttft is not None or retried >= retries or exc.code not in RETRY_CODES:
                        raise
                    else:
                        retried += 1
                        self.logger.warning("stream_retry", kind=kind, error=exc.code, attempt=sent)
                    if worker:
                        excluded.add(worker)
                    route = self.catalogue.route(
                        model, kind, version=route.version, affinity=affinity, exclude=frozenset(excluded)
                    )._replace(shadow=route.shadow)
                finally:
                    await chunks.aclose()
                    if worker:
                        presence.release(worker)
        finally:
            ended.latency_ms = (time.perf_counter() - started) * 1000
            ended.version = route.version
            code = ended.code
            if code != "cancelled" and not self.client.nc.is_closed:  # fed to canary analysis
                outcome = Outcome(model, route.version, code is None, code or "ok", ended.latency_ms, ttft)
                self.outcomes.add(kind, outcome)

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
            record = await shadow.compare(request, version, served, shadow_version, await copy)
            await shadow.publish(self.client.nc, record)
        except Exception as exc:  # a comparison is best effort; the client was served already
            self.logger.warning("shadow_compare_failed", error=repr(exc))
