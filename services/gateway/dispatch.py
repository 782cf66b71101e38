"""Send a request where the routing picks, stream it back, report the outcome; copy generations to a shadow.

`open` is the one path for every kind (LLM, ASR, TTS): worker choice, retries, presence, outcomes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

from contracts.errors import InferBusError
from contracts.llm import Accepted, Chunk, Delta, Final, GenerateRequest, chunk_decoder, request_encoder
from contracts.registry import Breaker, Outcome
from contracts.requestlog import Fallback
from services.gateway.cache import CachedFinal, Entry, Mode, ResponseCache
from services.gateway.catalogue import Catalogue
from services.runtime import logging as log
from services.runtime import shadow, tracing
from services.runtime.breakers import Breakers
from services.runtime.outcomes import OutcomeBatcher
from services.runtime.routing import Route
from services.runtime.streaming import Pace, StreamClient

RETRY_CODES = frozenset({"stream_broken", "worker_timeout", "overloaded", "deferred"})
UNREPORTED = frozenset({"cancelled", "deferred"})  # not the version's doing: no outcome for canary analysis
DEFAULT_BREAKER = Breaker()


@dataclass
class Ended:
    """How a dispatched stream ended, for whoever needs more than its chunks (the shadow comparison)."""

    code: str | None = "cancelled"  # None: completed; "cancelled" until it ends one way or the other
    latency_ms: float = 0.0
    version: str = ""
    sent: int = 0  # attempts sent so far under the request id (the next one's `attempt` number)
    worker_id: str | None = None


@dataclass
class Served:
    """Who finally served a request (after any fallbacks), for headers, the final chunk and the request log."""

    model: str = ""
    version: str = ""
    provider: str | None = None  # the engine: llamacpp, openai, anthropic, ...
    worker_id: str | None = None
    attempts: int = 0
    fallbacks: list[Fallback] = field(default_factory=list)  # each route given up on, and why
    ttft_ms: float | None = None
    cache: str | None = None  # "hit", "semantic" (answered from the cache) or "miss"; None: not used
    similarity: float | None = None


@dataclass(frozen=True)
class CacheUse:
    """A request's use of the response cache: which cache, whose entries, exact or semantic, and the key's TTL."""

    cache: ResponseCache
    tenant: str
    mode: Mode
    ttl_s: float | None = None  # the key's: shorter-lived entries, older ones missed (None: the model's TTL)


def as_attempt(payload: bytes, attempt: int) -> bytes:
    """An encoded request (any kind's: a msgpack map with an `attempt` field) as attempt `attempt` (0: the first)."""
    fields = msgspec.msgpack.decode(payload)
    fields["attempt"] = attempt
    return msgspec.msgpack.encode(fields)


class Dispatcher:
    def __init__(
        self, client: StreamClient, catalogue: Catalogue, *, retries: int = 1, breakers: Breakers | None = None
    ) -> None:
        self.client = client
        self.catalogue = catalogue
        self.breakers = breakers or Breakers("local")
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
        served: Served | None = None,
        cache: CacheUse | None = None,
    ) -> AsyncGenerator[Chunk, None]:
        """An LLM generation where the routing picks, falling back per the model's policy; a sampled copy of
        the first choice goes to the shadow version.

        Routes are tried in order (the policy's pick, the pool's other versions, then each fallback model)
        while nothing but the Accepted chunk reached the caller, the error is in the policy's `fallback_on`,
        and `max_attempts` and `budget_s` allow; a route whose breaker is open is skipped without a send.
        When a fallback is possible the Accepted chunk is held until the first token (or the end), so what
        the caller sees (headers included) is the route that finally served.
        """
        t0 = time.perf_counter()
        if tracing.tracer is not None:
            tracing.annotate({tracing.REQUEST_MODEL: request.model, tracing.MAX_TOKENS: request.max_tokens})
        served = served if served is not None else Served()
        route = self.catalogue.route(
            request.model, kind, key_id=key_id, user=request.user, affinity=affinity or request.user
        )
        if cache is not None and cache.mode != "off":
            hit = await cache.cache.get(cache.tenant, request, cache.mode, self.catalogue.served_versions(
                kind, request.model), max_age_s=cache.ttl_s)
            if hit is not None:  # replayed as a stream of its own: nothing generated, nothing billed
                entry = hit.entry
                served.model, served.version, served.provider = request.model, entry.version, entry.provider
                served.worker_id, served.cache, served.similarity = "cache", hit.kind, hit.similarity
                served.ttft_ms = (time.perf_counter() - t0) * 1000
                yield Accepted(0, "cache", entry.version)
                yield Delta(1, entry.text, entry.usage.completion_tokens)
                yield CachedFinal(2, entry.finish_reason, entry.usage, entry.version)
                return
            served.cache = "miss"
        keep = cache is not None and cache.mode != "off"  # collect the answer to store it
        table = self.catalogue.tables.get(kind, request.model)
        routing = table.policy.routing if table is not None else None
        chain = routing is not None and (len(routing.pool) > 1 or bool(routing.fallbacks))
        deadline = time.time() + timeout_s
        budget_end = time.monotonic() + (routing.budget_s if routing is not None else timeout_s)
        copy = None
        if route.shadow is not None:
            copy = asyncio.create_task(
                shadow.run_copy(self.client, kind, shadow.shadow_copy(request), route.shadow, deadline)
            )
        parts: list[str] = []
        ended = Ended()
        try:
            last: InferBusError | None = None
            for model, target in self._targets(request, kind, route, key_id, affinity):
                verdict = self.breakers.verdict(kind, model, target.version)  # "closed": a dict lookup
                if verdict != "closed" and not (
                    verdict == "probe" and await self.breakers.claim_probe(kind, model, target.version)
                ):
                    # Skipped without a send (any model: a failing canary's requests go to its stable
                    # version); counted as the version's failure, so canary analysis still sees it.
                    wait = self.breakers.retry_after(kind, model, target.version)
                    last = InferBusError(
                        "circuit_open", f"'{model}' version '{target.version}' is failing; its circuit is open"
                    ).retry_in(wait)
                    served.fallbacks.append(Fallback(target=f"{model}:{target.version}", code="circuit_open"))
                    self.outcomes.add(kind, Outcome(model, target.version, False, "circuit_open", 0.0, None))
                    continue
                if served.attempts and routing is not None and (
                    served.attempts >= routing.max_attempts or time.monotonic() > budget_end
                ):
                    break
                served.attempts += 1
                body = request if model == request.model else msgspec.structs.replace(request, model=model)
                chunks = self.open(
                    kind, model, target, request_encoder.encode(body), request.request_id,
                    decoder=chunk_decoder, terminal=(Final,), progress=(Delta,), retries=self.retries,
                    deadline=deadline, headers=headers, affinity=affinity, ended=ended, pace=pace,
                )
                held: Accepted | None = None
                committed = False
                try:
                    async for chunk in chunks:
                        if isinstance(chunk, Accepted):
                            served.model, served.version, served.worker_id = model, chunk.version, chunk.worker_id
                            served.provider = self.catalogue.engine_of(kind, model, chunk.version, chunk.worker_id)
                            if chain and not committed:
                                held = chunk
                                continue
                        elif not committed:
                            committed = True
                            if held is not None:
                                yield held
                        if isinstance(chunk, Delta):
                            if served.ttft_ms is None:
                                served.ttft_ms = (time.perf_counter() - t0) * 1000
                            if copy is not None or keep:
                                parts.append(chunk.text)
                        elif keep and isinstance(chunk, Final) and cache is not None:
                            cache.cache.put(cache.tenant, request, cache.mode, Entry(
                                "".join(parts), chunk.finish_reason, chunk.usage, chunk.version, served.provider,
                                time.time()), ttl_s=cache.ttl_s)
                        yield chunk
                    return
                except InferBusError as exc:
                    if committed or not chain or routing is None or exc.code not in routing.fallback_on:
                        raise
                    last = exc
                    served.fallbacks.append(Fallback(target=f"{model}:{target.version}", code=exc.code))
                    self.logger.warning("fallback", model=model, version=target.version, error=exc.code)
                finally:
                    await chunks.aclose()
            raise last or InferBusError("no_worker", f"no route could serve '{request.model}'")
        finally:
            if copy is not None:
                assert route.shadow is not None
                observed = shadow.Observed(ended.latency_ms, ended.code, "".join(parts))
                self._spawn(self._compare(request, ended.version, observed, route.shadow, copy))

    def _targets(
        self,
        request: GenerateRequest,
        kind: str,
        first: Route,
        key_id: str | None,
        affinity: str | None,
    ) -> Iterator[tuple[str, Route]]:
        """The policy's pick; then (a canary's stable version,) the pool's other versions best first, then each
        fallback model's pick. Computed only as far as the request gets."""
        yield request.model, first
        for model, version in self.catalogue.alternatives(request.model, kind, first.version):
            try:
                if version is None:
                    route = self.catalogue.route(model, kind, key_id=key_id, user=request.user, affinity=affinity)
                else:
                    route = self.catalogue.router.to_worker(kind, model, version, affinity)
            except InferBusError as exc:
                self.logger.warning("fallback_unroutable", model=model, error=exc.code)
                continue
            yield model, route._replace(shadow=None)

    def _breaker(self, kind: str, model: str) -> Breaker:
        table = self.catalogue.tables.get(kind, model)
        return table.policy.routing.breaker if table is not None else DEFAULT_BREAKER

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
        progressed = 0
        try:
            while True:
                ended.code = "cancelled"  # until this attempt ends one way or the other
                worker = route.worker_id
                if worker:
                    presence.acquire(worker)
                body = payload if ended.sent == 0 else as_attempt(payload, ended.sent)
                ended.sent += 1
                sent = ended.sent
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
                        elif isinstance(chunk, progress):
                            progressed += 1
                            if ttft is None:
                                ttft = (time.perf_counter() - started) * 1000
                        elif isinstance(chunk, terminal):
                            ended.code = None
                            self.breakers.success(kind, model, route.version)
                        yield chunk
                    return
                except InferBusError as exc:
                    ended.code = exc.code
                    self.breakers.failure(kind, model, route.version, exc.code, self._breaker(kind, model))
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
            if code not in UNREPORTED and not self.client.nc.is_closed:  # fed to canary analysis
                outcome = Outcome(model, route.version, code is None, code or "ok", ended.latency_ms, ttft)
                self.outcomes.add(kind, outcome)
            if code is None and ttft is not None:  # the latency strategy's moving averages
                itl = (ended.latency_ms - ttft) / max(1, progressed - 1)
                self.catalogue.router.signals.latency.observe(kind, model, route.version, ttft, itl)

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
