"""The Batch API (`/v1/batches`), and the gateway's side of running batch lines (`batch.exec`).

The batch service asks any gateway (queue group) to run one line: the line goes through this gateway's
own dispatch path (scopes, rate limits and budgets of the batch's key, the registry's routing and
fallbacks, the request log), under the line's platform request id and bus attempt number, marked as
batch work (header Inferbus-Batch). The gateway answers ExecAlive every second while the line runs, then
the response body as the endpoint would have returned it (or its error body).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from aiohttp import web
from prometheus_client import Counter, Gauge

from contracts import subjects
from contracts.batch import (
    ALIVE_S,
    BATCH_HEADER,
    BatchList,
    BatchObject,
    BatchRef,
    CreateBatch,
    ExecAlive,
    ExecLine,
    ExecResult,
    ListBatches,
    MetadataMap,
    exec_encoder,
    exec_line_decoder,
)
from contracts.embed import EmbeddingsBody
from contracts.errors import InferBusError, invalid
from contracts.llm import (
    Accepted,
    ChatCompletionRequest,
    CompletionRequest,
    Delta,
    Final,
    GenerateRequest,
    chat_to_generate,
    completion_to_generate,
)
from contracts.responses import CreateResponse
from services.gateway import responses_routes
from services.gateway.auth import KeyRecord
from services.gateway.dispatch import Dispatcher, Served
from services.gateway.embeddings_routes import embed
from services.gateway.errors import from_validation, json_response
from services.gateway.files_routes import _limit, call, caller_of
from services.gateway.formats import ChatFormat, CompletionFormat, Format, Outcome
from services.gateway.openai_routes import CHAT_PARAMS, Finished, engine_params
from services.gateway.state import GATEWAY, Gateway
from services.gateway.traced import OPERATIONS
from services.gateway.vision_routes import ModerationBody, moderate
from services.runtime import bus, tracing
from services.runtime import logging as log
from services.runtime.routing import PRESENCE_TTL

T = TypeVar("T")
routes = web.RouteTableDef()
EXEC: web.AppKey[BatchExec] = web.AppKey("batch_exec")
LINES = Counter("inferbus_gateway_batch_lines_total", "Batch lines this gateway ran, by result", ["outcome"])
READY = Gauge("inferbus_gateway_batch_exec_ready", "1 once this gateway takes batch lines")


class CreateBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: MetadataMap | None = None
    output_expires_after: dict[str, Any] | None = None  # accepted; output files follow the service's expiry


def register(app: web.Application) -> None:
    app.add_routes(routes)
    app.on_startup.append(_start_exec)
    app.on_cleanup.append(_stop_exec)


@routes.post("/v1/batches")
async def create_batch(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    key = await gw.authorize(request)
    raw = await request.read()
    try:
        body = msgspec.json.decode(raw or b"{}", type=CreateBody)
    except msgspec.MsgspecError as exc:
        raise from_validation(exc) from None
    create = CreateBatch(caller=caller_of(key), input_file_id=body.input_file_id, endpoint=body.endpoint,
                         completion_window=body.completion_window, metadata=body.metadata)
    return json_response(200, await call(gw, "batches.create", create, BatchObject))


@routes.get("/v1/batches")
async def list_batches(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    key = await gw.authorize(request)
    body = ListBatches(caller=caller_of(key), limit=_limit(request.query, 20, 100), after=request.query.get("after"))
    return json_response(200, await call(gw, "batches.list", body, BatchList))


@routes.get("/v1/batches/{batch_id}")
async def get_batch(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    key = await gw.authorize(request)
    body = BatchRef(caller=caller_of(key), batch_id=request.match_info["batch_id"])
    return json_response(200, await call(gw, "batches.get", body, BatchObject))


@routes.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    key = await gw.authorize(request)
    body = BatchRef(caller=caller_of(key), batch_id=request.match_info["batch_id"])
    return json_response(200, await call(gw, "batches.cancel", body, BatchObject))


# ---- running lines --------------------------------------------------------------------------------


async def _start_exec(app: web.Application) -> None:
    runner = BatchExec(app[GATEWAY])
    await runner.start()
    app[EXEC] = runner


async def _stop_exec(app: web.Application) -> None:
    runner = app.get(EXEC)
    if runner is not None:
        await runner.close()


class BatchExec:
    """Runs the batch service's lines on this gateway (any replica: queue group)."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.running: set[asyncio.Task[None]] = set()
        self.sub: Any = None
        self.dispatcher: Dispatcher | None = None
        self._joining: asyncio.Task[None] | None = None
        self.logger = log.get("batch-exec")

    async def start(self) -> None:
        gw = self.gw
        # The gateway's routing, breakers and stream client, without its retry of a stream that failed before
        # its first token: that retry is a new attempt (a second usage row) even when the first one finished on
        # its worker. A batch line is re-run by the batch service instead, under the same attempt when its
        # fate is unknown, so the ledger keeps one row per line.
        self.dispatcher = Dispatcher(gw.dispatcher.client, gw.catalogue, retries=0, breakers=gw.breakers)
        self._joining = asyncio.create_task(self._join())

    async def _join(self) -> None:
        """Take lines once this gateway has heard every live worker (a fresh one knows no model it is not
        configured with: it would answer a valid line `model_not_found`)."""
        await asyncio.sleep(PRESENCE_TTL + 0.5)
        self.sub = await self.gw.service.bus.subscribe(subjects.BATCH_EXEC, queue="inferbus-batch-exec",
                                                       cb=self._on_line)
        READY.set(1)

    async def close(self) -> None:
        if self._joining is not None:
            self._joining.cancel()
        if self.sub is not None:
            try:
                await self.sub.unsubscribe()
            except Exception:  # the connection is closing
                pass
        for task in list(self.running):
            task.cancel()
        await asyncio.gather(*self.running, return_exceptions=True)
        if self.dispatcher is not None:
            await self.dispatcher.outcomes.close()

    async def _on_line(self, msg: bus.Msg) -> None:
        if not msg.reply:
            return
        task = asyncio.create_task(self._serve(msg))  # a task per line: one subscription's callbacks run in turn
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    async def _serve(self, msg: bus.Msg) -> None:
        nc = self.gw.service.bus
        alive = exec_encoder.encode(ExecAlive())

        async def beat() -> None:  # none for a line done within ALIVE_S (most): no gateway is a 503 at once
            while True:
                await asyncio.sleep(ALIVE_S)
                await nc.publish(msg.reply, alive)

        beating = asyncio.create_task(beat())
        try:
            try:
                line = exec_line_decoder.decode(msg.data)
            except msgspec.DecodeError as exc:
                result = _failed(invalid(f"undecodable batch line: {exc}"))
            else:
                with log.bound(request_id=line.request_id, batch_id=line.batch_id):
                    try:
                        result = await (self.run(line) if tracing.tracer is None else self._traced(line, msg))
                    except Exception as exc:  # PostgreSQL away while a response is stored, say: run it later
                        self.logger.exception("batch_line_failed", error=repr(exc))
                        result = _failed(InferBusError("internal_error", "the gateway failed to run the line"))
        finally:
            beating.cancel()
        LINES.labels(result.code or "ok").inc()
        await nc.publish(msg.reply, exec_encoder.encode(result))

    async def _traced(self, line: ExecLine, msg: bus.Msg) -> ExecResult:
        """`run` in a span of its own, which names the line's batch (its worker's span is a child of it)."""
        span = tracing.start(f"batch {line.endpoint}", msg.headers, {
            tracing.BATCH_ID: line.batch_id, "inferbus.request.id": line.request_id, "http.route": line.endpoint,
            tracing.OPERATION: OPERATIONS.get(line.endpoint, "batch")})
        code: str | None = "internal_error"
        status = 500
        try:
            result = await self.run(line)
            code, status = result.code, result.status_code
            return result
        except asyncio.CancelledError:
            code, status = "cancelled", 499
            raise
        finally:
            span.end(code, {"http.response.status_code": status})

    async def run(self, line: ExecLine) -> ExecResult:
        """One line through the code its endpoint's route runs, as the batch's key, marked as batch work."""
        if line.endpoint == "/v1/embeddings":
            return await self._embeddings(line)
        if line.endpoint == "/v1/moderations":
            return await self._moderation(line)
        return await self._generation(line)

    async def _key(self, line: ExecLine) -> tuple[KeyRecord, dict[str, str]]:
        """The batch's key, and the bus headers of its line (the worker's usage event names the batch)."""
        assert self.gw.keys is not None
        key = await self.gw.keys.by_id(line.key_id)
        return key, {**self.gw.bus_headers(None, key), BATCH_HEADER: line.batch_id}

    async def _generation(self, line: ExecLine) -> ExecResult:
        """/v1/chat/completions, /v1/completions and /v1/responses: one generation, answered whole."""
        gw = self.gw
        admitted = time.monotonic()
        served = Served()
        key: KeyRecord | None = None
        gen: GenerateRequest | None = None
        outcome = Outcome()
        error: InferBusError | None = None
        try:
            key, headers = await self._key(line)
            gen, fmt, finished, params = await _request(gw, key, line)
            key.authorize("llm", gen.model)
            grant = await gw.admit(key, line.endpoint, gen, batch=True)
            assert self.dispatcher is not None
            chunks = self.dispatcher.generate(gen, kind="llm", timeout_s=line.timeout_s, headers=headers,
                                              key_id=key.id, affinity=gen.user, served=served)
            if grant is not None:
                assert gw.governor is not None
                chunks = gw.governor.governed(key.id, grant, chunks, gen.model)
            try:
                with engine_params(*params):
                    async for chunk in chunks:
                        if isinstance(chunk, Accepted):
                            fmt.served(served.model or gen.model, served.provider, chunk.version)
                        elif isinstance(chunk, Delta):
                            outcome.add(chunk)
                        elif isinstance(chunk, Final):
                            outcome.usage = usage = chunk.usage
                            if finished is not None:
                                await finished(outcome, chunk)
                            body = fmt.whole(outcome, chunk)
                            return ExecResult(status_code=200, body=msgspec.json.encode(body),
                                              worker_attempts=served.attempts, prompt_tokens=usage.prompt_tokens,
                                              completion_tokens=usage.completion_tokens)
            finally:
                await chunks.aclose()
            raise InferBusError("stream_broken", "the stream ended without a final chunk")
        except InferBusError as exc:
            error = exc
            return _failed(exc, served.attempts if served.worker_id else 0)
        except asyncio.CancelledError:
            error = InferBusError("cancelled", "the gateway stopped")
            raise
        finally:
            if gen is not None:
                gw.log_request(key, request_id=line.request_id, kind="llm", model=gen.model, admitted=admitted,
                               served=served, error=error, http_status=error.http_status if error else 200,
                               usage=outcome.usage, streamed=False, request_body=line.body,
                               response_text=outcome.text)

    async def _embeddings(self, line: ExecLine) -> ExecResult:
        """/v1/embeddings: the route's own code (it logs the request), on this runner's dispatcher."""

        async def call(key: KeyRecord, headers: dict[str, str], served: Served) -> dict[str, Any]:
            result, _ = await embed(self.gw, key, _decode(line.body, EmbeddingsBody), line.request_id,
                                    endpoint=line.endpoint, timeout_s=line.timeout_s, headers=headers,
                                    admitted=time.monotonic(), request_body=line.body, dispatcher=self.dispatcher,
                                    attempt=line.attempt, batch=True, served=served)
            return result

        return await self._answered(line, call, lambda result: result["usage"]["prompt_tokens"])

    async def _moderation(self, line: ExecLine) -> ExecResult:
        """/v1/moderations (images: data: URLs, or allowlisted URLs the route fetches)."""

        async def call(key: KeyRecord, headers: dict[str, str], served: Served) -> dict[str, Any]:
            result, _ = await moderate(self.gw, key, _decode(line.body, ModerationBody), line.request_id,
                                       endpoint=line.endpoint, timeout_s=line.timeout_s, headers=headers,
                                       attempt=line.attempt, served=served, batch=True)
            return result

        return await self._answered(line, call, lambda _: 0)

    async def _answered(
        self,
        line: ExecLine,
        call: Callable[[KeyRecord, dict[str, str], Served], Awaitable[dict[str, Any]]],
        prompt_tokens: Callable[[dict[str, Any]], int],
    ) -> ExecResult:
        """A non-generation line: its route's answer, or its error as the runner reads one."""
        served = Served()
        try:
            key, headers = await self._key(line)
            result = await call(key, headers, served)
        except InferBusError as exc:
            return _failed(exc, served.attempts if served.worker_id else 0)
        return ExecResult(status_code=200, body=msgspec.json.encode(result), worker_attempts=served.attempts,
                          prompt_tokens=prompt_tokens(result))


Params = tuple[tuple[re.Pattern[str], str], ...]


def _decode(raw: bytes, cls: type[T]) -> T:
    """A line's body as its endpoint decodes it (the batch service checked it already; checked again here)."""
    try:
        return msgspec.json.decode(raw, type=cls)
    except msgspec.MsgspecError as exc:
        raise from_validation(exc) from None


async def _request(gw: Gateway, key: KeyRecord, line: ExecLine) -> tuple[GenerateRequest, Format, Finished | None,
                                                                          Params]:
    """A generation line as its route reads it: the generation, its answer's format, what runs when it is
    finished (a stored response), and how an engine's parameter names map to the endpoint's."""
    now = int(time.time())
    default_max_tokens = gw.settings.default_max_tokens
    finished: Finished | None = None
    params: Params = ()
    if line.endpoint == "/v1/chat/completions":
        chat = _decode(line.body, ChatCompletionRequest)
        gen = chat_to_generate(chat, line.request_id, default_max_tokens)
        fmt: Format = ChatFormat(line.request_id, chat.model, now, False)
        params = CHAT_PARAMS
    elif line.endpoint == "/v1/completions":
        text = _decode(line.body, CompletionRequest)
        gen = completion_to_generate(text, line.request_id, default_max_tokens)
        fmt = CompletionFormat(line.request_id, text.model, now, False)
    elif line.endpoint == "/v1/responses":
        req = _decode(line.body, CreateResponse)
        gen, fmt, finished = await responses_routes.prepare(gw, key, req, line.request_id)
        params = (responses_routes.ENGINE_PARAMS,)
    else:
        raise invalid(f"batch lines for {line.endpoint} are not served", "url")
    return msgspec.structs.replace(gen, attempt=line.attempt), fmt, finished, params


def _failed(exc: InferBusError, worker_attempts: int = 0) -> ExecResult:
    retry_after = exc.retry_after
    if retry_after is None and "Retry-After" in exc.headers:
        try:
            retry_after = float(exc.headers["Retry-After"])
        except ValueError:
            retry_after = None
    return ExecResult(status_code=exc.http_status, body=msgspec.json.encode(exc.openai_body()), code=exc.code,
                      retryable=exc.retryable, retry_after=retry_after, worker_attempts=worker_attempts)
