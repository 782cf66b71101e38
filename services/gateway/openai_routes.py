"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from contracts.errors import InferBusError, invalid
from contracts.llm import (
    MAX_CHOICES,
    Accepted,
    ChatCompletionRequest,
    CompletionRequest,
    Delta,
    Final,
    GenerateRequest,
    chat_to_generate,
    completion_to_generate,
)
from services.gateway.auth import KeyRecord
from services.gateway.choices import choice_requests, fanned
from services.gateway.dispatch import Served
from services.gateway.errors import from_validation, json_response
from services.gateway.formats import ChatFormat, ChoiceEnd, CompletionFormat, Format, OpenAIFormat, Outcome
from services.gateway.state import CACHE_HEADER, GATEWAY, Gateway
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
    gen = chat_to_generate(req, rid, gw.settings.default_max_tokens, MAX_CHOICES)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    n = req.n or 1
    fmt = ChatFormat(rid, req.model, int(time.time()), include_usage, n)
    with engine_params(*CHAT_PARAMS):
        return await respond(request, gw, gen, fmt, bool(req.stream), key, affinity=req.prompt_cache_key, n=n)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    key = await gw.authorize(request)
    request[ADMITTED] = time.monotonic()
    req = await _decode(request, CompletionRequest)
    rid = "cmpl-" + secrets.token_hex(12)
    gen = completion_to_generate(req, rid, gw.settings.default_max_tokens, MAX_CHOICES)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    n = req.n or 1
    fmt = CompletionFormat(rid, req.model, int(time.time()), include_usage, n)
    return await respond(request, gw, gen, fmt, bool(req.stream), key, n=n)


_CHAT_TOOLS = re.compile(r"^tools\[(\d+)\]\.")
_CHAT_FORMAT = re.compile(r"^response_format\.schema")
# How an engine's names for a bus request's fields read in the chat API (a batch line's errors use them too).
CHAT_PARAMS = ((_CHAT_TOOLS, r"tools[\1].function."), (_CHAT_FORMAT, "response_format.json_schema.schema"))


class engine_params:  # used as a function: `with engine_params(...)`
    """An engine names a field of the bus request (tools[0].parameters...): as this API's request names it.
    A class, not a contextlib generator: entered once per chat request."""

    __slots__ = ("rules",)

    def __init__(self, *rules: tuple[re.Pattern[str], str]) -> None:
        self.rules = rules

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if not isinstance(exc, InferBusError) or exc.param is None:
            return
        for pattern, replacement in self.rules:
            if pattern.match(exc.param):
                new = pattern.sub(replacement, exc.param)
                exc.message, exc.param = exc.message.replace(exc.param, new), new
                break


# Called with the finished outcome before the last event (or the whole body) goes out: the Responses API
# stores its response there, so that a client chaining on it at once finds it.
Finished = Callable[[Outcome, Final], Awaitable[None]]


async def respond(
    request: web.Request,
    gw: Gateway,
    gen: GenerateRequest,
    fmt: Format,
    stream: bool,
    key: KeyRecord,
    *,
    affinity: str | None = None,
    finished: Finished | None = None,
    n: int = 1,
) -> web.StreamResponse:
    """Admit, dispatch and answer one generation in `fmt`'s shape, whole or streamed; log it either way.
    `n` > 1: that many choices, each a generation of its own (see `choices`; `fmt` an OpenAI one)."""
    with log.bound(request_id=gen.request_id, model=gen.model):
        timeout = _timeout(request, gw)
        try:
            grant = await gw.admit(key, request.path, gen, choices=n)
        except InferBusError as exc:  # refused by limits, budgets or scopes: logged too
            gw.log_request(key, request_id=gen.request_id, kind="llm", model=gen.model,
                           admitted=request.get(ADMITTED, time.monotonic()), served=Served(), error=exc,
                           http_status=exc.http_status, usage=None, streamed=stream, request_body=request.get(BODY))
            raise
        pace = Pace()
        served = Served()
        if n == 1:
            chunks = gw.dispatcher.generate(
                gen,
                kind="llm",
                timeout_s=timeout,
                headers=gw.bus_headers(request, key),
                key_id=key.id,
                affinity=request.headers.get(AFFINITY_HEADER) or affinity,
                pace=pace,
                served=served,
                cache=gw.cache_use(request.headers, key, gen),
            )
        else:  # one worker for all of them where it can (on llama.cpp they share its batch); no cache
            assert isinstance(fmt, OpenAIFormat)
            headers = gw.bus_headers(request, key)
            together = request.headers.get(AFFINITY_HEADER) or affinity or gen.request_id
            chunks = fanned([
                gw.dispatcher.generate(one, kind="llm", timeout_s=timeout, headers=dict(headers), key_id=key.id,
                                       affinity=together, served=served if i == 0 else Served())
                for i, one in enumerate(choice_requests(gen, n))
            ], pace)
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
                return await _stream(request, chunks, fmt, headers, pace, outcome, finished)
            async for chunk in chunks:
                if isinstance(chunk, Delta):
                    outcome.add(chunk)
                elif isinstance(chunk, ChoiceEnd):
                    outcome.finishes[chunk.index] = chunk.finish_reason
                elif isinstance(chunk, Final):
                    outcome.usage = chunk.usage
                    if finished is not None:
                        await finished(outcome, chunk)
                    return json_response(200, fmt.whole(outcome, chunk), headers)
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
                response_text=outcome.text,
            )


def served_headers(served: Served) -> dict[str, str]:
    out = {MODEL_HEADER: served.model}
    if served.provider:
        out[PROVIDER_HEADER] = served.provider
    if served.fallbacks:
        out[FALLBACKS_HEADER] = ", ".join(f"{f.target}={f.code}" for f in served.fallbacks)
    if served.cache is not None:  # hit, miss, or "semantic; similarity=0.93"
        out[CACHE_HEADER] = served.cache if served.cache != "semantic" else f"semantic; similarity={served.similarity}"
    return out


async def _stream(
    request: web.Request, chunks: Any, fmt: Format, headers: dict[str, str], pace: Pace, outcome: Outcome,
    finished: Finished | None,
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
                data = fmt.delta(chunk)
                if data:
                    out.append(data)
                outcome.add(chunk)
            elif isinstance(chunk, ChoiceEnd):
                assert isinstance(fmt, OpenAIFormat)
                outcome.finishes[chunk.index] = chunk.finish_reason
                out.append(fmt.finish(chunk.finish_reason, chunk.index))
            elif isinstance(chunk, Final):
                outcome.usage = chunk.usage
                if finished is not None:
                    await finished(outcome, chunk)
                out.append(fmt.end(chunk))
            if out and not pace.more:
                await response.write(b"".join(out))
                out.clear()
    except InferBusError as exc:
        # Mid-stream failure: a terminal error event, never a clean end.
        log.get("gateway").warning("stream_failed", code=exc.code, error=exc.message)
        outcome.error = exc
        out.append(fmt.error(exc))
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
