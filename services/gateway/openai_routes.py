"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import secrets
import time
from typing import Any

import msgspec
from aiohttp import web

from contracts.errors import InferBusError, invalid
from contracts.llm import (
    Accepted,
    ChatCompletionRequest,
    CompletionRequest,
    Delta,
    Final,
    GenerateRequest,
    Usage,
    chat_to_generate,
    completion_to_generate,
)
from services.gateway.auth import KeyRecord
from services.gateway.dispatch import Served
from services.gateway.errors import from_validation, json_response
from services.gateway.formats import DONE, ChatFormat, CompletionFormat, sse
from services.gateway.state import GATEWAY, Gateway
from services.runtime import logging as log
from services.runtime.streaming import Pace

VERSION_HEADER = "x-inferbus-model-version"
MODEL_HEADER = "x-inferbus-model"  # the model that served (another one's name after a fallback)
PROVIDER_HEADER = "x-inferbus-provider"  # the engine that served: llamacpp, openai, anthropic, gemini, ...
FALLBACKS_HEADER = "x-inferbus-fallbacks"  # routes given up on before it: model:version=error_code, ...
# Same value, same worker while it stays healthy (a conversation id, say); the `user` field otherwise.
AFFINITY_HEADER = "x-inferbus-affinity"
TIMEOUT_HEADER = "x-inferbus-timeout"

routes = web.RouteTableDef()
ADMITTED = web.RequestKey("admitted", float)  # monotonic time the request was authorized
BODY = web.RequestKey("body", bytes)


async def _decode(request: web.Request, cls: type[Any]) -> Any:
    body = await request.read()
    request[BODY] = body
    if not body:
        raise invalid("The request body is empty: send a JSON object")
    try:
        return msgspec.json.decode(body, type=cls)
    except msgspec.MsgspecError as exc:
        raise from_validation(exc) from None


def _timeout(request: web.Request, gw: Gateway) -> float:
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return gw.settings.request_timeout_s
    try:
        value = float(raw)
    except ValueError:
        raise invalid(f"{TIMEOUT_HEADER} must be a number of seconds", TIMEOUT_HEADER) from None
    if not 0 < value <= gw.settings.max_request_timeout_s:
        raise invalid(f"{TIMEOUT_HEADER} must be in (0, {gw.settings.max_request_timeout_s}]", TIMEOUT_HEADER)
    return value


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    key = await gw.authorize(request)
    request[ADMITTED] = time.monotonic()
    req = await _decode(request, ChatCompletionRequest)
    rid = "chatcmpl-" + secrets.token_hex(12)
    gen = chat_to_generate(req, rid, gw.settings.default_max_tokens)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    fmt = ChatFormat(rid, req.model, int(time.time()), include_usage)
    return await _respond(request, gw, gen, fmt, bool(req.stream), key)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    key = await gw.authorize(request)
    request[ADMITTED] = time.monotonic()
    req = await _decode(request, CompletionRequest)
    rid = "cmpl-" + secrets.token_hex(12)
    gen = completion_to_generate(req, rid, gw.settings.default_max_tokens)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    fmt = CompletionFormat(rid, req.model, int(time.time()), include_usage)
    return await _respond(request, gw, gen, fmt, bool(req.stream), key)


async def _respond(
    request: web.Request,
    gw: Gateway,
    gen: GenerateRequest,
    fmt: ChatFormat | CompletionFormat,
    stream: bool,
    key: KeyRecord,
) -> web.StreamResponse:
    with log.bound(request_id=gen.request_id, model=gen.model):
        timeout = _timeout(request, gw)
        try:
            grant = await gw.admit(key, request.path, gen)
        except InferBusError as exc:  # refused by limits, budgets or scopes: logged too
            gw.log_request(key, request_id=gen.request_id, kind="llm", model=gen.model,
                           admitted=request.get(ADMITTED, time.monotonic()), served=Served(), error=exc,
                           http_status=exc.http_status, usage=None, streamed=stream, request_body=request.get(BODY))
            raise
        pace = Pace()
        served = Served()
        chunks = gw.dispatcher.generate(
            gen,
            kind="llm",
            timeout_s=timeout,
            headers=gw.bus_headers(request, key),
            key_id=key.id,
            affinity=request.headers.get(AFFINITY_HEADER),
            pace=pace,
            served=served,
        )
        limit_headers: dict[str, str] = {}
        if grant is not None:
            assert gw.governor is not None
            chunks = gw.governor.governed(key.id, grant, chunks, gen.model)
            limit_headers = grant.headers
        outcome = Outcome()
        try:
            try:
                first = await anext(chunks)  # errors before the first byte keep their HTTP status
            except InferBusError as exc:
                raise exc.with_headers({**limit_headers, **exc.headers}) from None
            assert isinstance(first, Accepted)
            headers = {VERSION_HEADER: first.version, "x-request-id": gen.request_id, **served_headers(served),
                       **limit_headers}
            fmt.served(served.model or gen.model, served.provider, first.version)
            if stream:
                return await _stream(request, chunks, fmt, headers, pace, outcome)
            async for chunk in chunks:
                if isinstance(chunk, Delta):
                    outcome.parts.append(chunk.text)
                elif isinstance(chunk, Final):
                    outcome.usage = chunk.usage
                    whole = fmt.whole("".join(outcome.parts), chunk.finish_reason, chunk.usage)
                    return json_response(200, whole, headers)
            raise InferBusError("stream_broken", "the stream ended without a final chunk")
        except InferBusError as exc:
            outcome.error = exc
            raise
        except BaseException:  # the client went away (cancelled): logged as such
            outcome.error = InferBusError("cancelled", "the client closed the connection")
            raise
        finally:
            await chunks.aclose()
            error = outcome.error
            gw.log_request(
                key, request_id=gen.request_id, kind="llm", model=gen.model,
                admitted=request.get(ADMITTED, time.monotonic()), served=served, error=error,
                http_status=error.http_status if error is not None and not outcome.started else 200,
                usage=outcome.usage, streamed=stream, request_body=request.get(BODY),
                response_text="".join(outcome.parts),
            )


def served_headers(served: Served) -> dict[str, str]:
    out = {MODEL_HEADER: served.model}
    if served.provider:
        out[PROVIDER_HEADER] = served.provider
    if served.fallbacks:
        out[FALLBACKS_HEADER] = ", ".join(served.fallbacks)
    return out


class Outcome:
    """How a response went, for the request log."""

    __slots__ = ("error", "parts", "started", "usage")

    def __init__(self) -> None:
        self.started = False  # the 200 and its headers went out (a stream's later error is an event)
        self.error: InferBusError | None = None
        self.usage: Usage | None = None
        self.parts: list[str] = []


async def _stream(
    request: web.Request, chunks: Any, fmt: ChatFormat | CompletionFormat, headers: dict[str, str], pace: Pace,
    outcome: Outcome,
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers}
    )
    await response.prepare(request)
    outcome.started = True
    start = fmt.start()
    if start:
        await response.write(start)
    out: list[bytes] = []  # events that arrived in one bus message go out in one write
    try:
        async for chunk in chunks:
            if isinstance(chunk, Delta):
                if chunk.text:
                    out.append(fmt.delta(chunk.text))
                    outcome.parts.append(chunk.text)
            elif isinstance(chunk, Final):
                outcome.usage = chunk.usage
                tail = fmt.finish(chunk.finish_reason)
                if fmt.include_usage:
                    tail += fmt.usage(chunk.usage)
                out.append(tail + DONE)
            if out and not pace.more:
                await response.write(b"".join(out))
                out.clear()
    except InferBusError as exc:
        # Mid-stream failure: a terminal error event, never a clean [DONE].
        log.get("gateway").warning("stream_failed", code=exc.code, error=exc.message)
        outcome.error = exc
        out.append(sse(exc.openai_body()))
    if out:
        await response.write(b"".join(out))
    return response


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    await gw.authorize(request)
    data = [gw.catalogue.describe(item) for item in gw.catalogue.listing()]
    return json_response(200, {"object": "list", "data": data})


@routes.get("/v1/models/{model}")
async def get_model(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    await gw.authorize(request)
    name = request.match_info["model"]
    for item in gw.catalogue.listing():
        if item.name == name:
            return json_response(200, gw.catalogue.describe(item))
    raise InferBusError("model_not_found", f"The model '{name}' does not exist", param="model")


@routes.get("/healthz")
async def healthz(_: web.Request) -> web.Response:
    return json_response(200, {"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    problems = await request.app[GATEWAY].readiness()
    return json_response(503 if problems else 200, {"status": "not_ready" if problems else "ready",
                                                    "problems": problems})
