"""/v1/ws: many concurrent generations per socket, keyed by client id, with cancel.

A socket authenticates once (header or `auth` event; a few failed attempts close it). When its key is
revoked or expires, the socket gets an error event and is closed (policy violation), whatever it runs.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal, NamedTuple

import msgspec
from aiohttp import WSCloseCode, WSMsgType, web

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
from services.gateway import traced
from services.gateway.auth import KeyRecord, bearer
from services.gateway.dispatch import Served
from services.gateway.errors import from_validation
from services.gateway.formats import Outcome, chat_logprobs, completion_logprobs, merged, usage_body
from services.gateway.openai_routes import CHAT_PARAMS, engine_params
from services.gateway.state import GATEWAY, Gateway
from services.runtime import logging as log
from services.runtime import tracing

routes = web.RouteTableDef()


Endpoint = Literal["chat.completions", "completions"]


class ClientEvent(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["request", "cancel", "auth"]
    id: str | None = None
    endpoint: Endpoint = "chat.completions"
    body: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    api_key: str | None = None
    traceparent: str | None = None  # W3C trace context of this request (else the socket's upgrade request's)


_event_decoder = msgspec.json.Decoder(ClientEvent)
_encode = msgspec.json.encode
MAX_AUTH_FAILURES = 3
TOO_DEEP = "We could not parse the JSON body of your request: it is nested too deeply"


class Close(NamedTuple):
    code: int
    reason: str


def _error(exc: InferBusError, rid: str | None) -> dict[str, Any]:
    return {"type": "error", "id": rid, **exc.openai_body()}


class DeltaFields:
    """A delta event's fields beyond its text, as the endpoint's OpenAI chunks carry them: tool calls, logprobs.

    Present when the bus delta has them, so that joining them rebuilds the non-streamed response.
    """

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.chat = endpoint == "chat.completions"
        self.offset = 0  # a completion's logprobs' text_offset, counted in tokens as the whole response does

    def of(self, chunk: Delta) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if chunk.tool_calls is not None:
            out["tool_calls"] = merged(chunk.tool_calls)
        if chunk.logprobs is not None:
            if self.chat:
                out["logprobs"] = chat_logprobs(chunk.logprobs)
            else:
                out["logprobs"] = completion_logprobs(chunk.logprobs, self.offset)
                self.offset += sum(len(t.token) for t in chunk.logprobs)
        return out

    def params(self) -> AbstractContextManager[None]:
        """An engine's error names the field as this endpoint's request does (tools[0].function.parameters...)."""
        return engine_params(*CHAT_PARAMS) if self.chat else nullcontext()


class Socket:
    def __init__(self, gw: Gateway, ws: web.WebSocketResponse, key: KeyRecord | None,
                 traceparent: str | None = None) -> None:
        self.gw = gw
        self.ws = ws
        self.traceparent = traceparent  # the upgrade request's: the parent of requests that name none
        self.key: KeyRecord | None = None
        self.auth_failures = 0
        self.ending = False  # an error was sent and the close is on its way: nothing more is read
        self.outbox: asyncio.Queue[str | Close | None] = asyncio.Queue()
        self.running: dict[str, asyncio.Task[None]] = {}
        if key is not None:
            self._use(key)

    def send(self, event: dict[str, Any]) -> None:
        self.outbox.put_nowait(_encode(event).decode())

    def end(self, exc: InferBusError, code: int = WSCloseCode.POLICY_VIOLATION) -> None:
        """An error event, then the close: the writer sends both in order."""
        self.ending = True
        self.send(_error(exc, None))
        self.outbox.put_nowait(Close(code, exc.code))

    def revoked(self) -> None:
        self.end(InferBusError("invalid_api_key", "This API key has been revoked or has expired"))

    def _use(self, key: KeyRecord) -> None:
        if self.key is not None:
            self.gw.sockets.discard(self.key, self)
        self.key = key
        self.gw.sockets.add(key, self)

    async def writer(self) -> None:
        try:
            while (item := await self.outbox.get()) is not None:
                if isinstance(item, Close):
                    await self.ws.close(code=item.code, message=item.reason.encode())
                    return
                await self.ws.send_str(item)
        except ConnectionError:  # the client is gone: nothing more to tell it
            return

    async def handle(self, raw: str | bytes) -> None:
        if self.ending:
            return
        try:
            event = _event_decoder.decode(raw)
        except msgspec.MsgspecError as exc:
            self.send(_error(from_validation(exc), None))
            return
        except RecursionError:
            self.send(_error(invalid(TOO_DEEP), None))
            return
        if event.type == "auth":
            await self._auth(event)
        elif event.type == "cancel":
            task = self.running.get(event.id or "")
            if task is None:
                self.send(_error(InferBusError("not_found", f"no running request with id {event.id!r}"), event.id))
            else:
                task.cancel()
        else:
            self._start(event)

    async def _auth(self, event: ClientEvent) -> None:
        try:
            assert self.gw.keys is not None
            self._use(await self.gw.keys.authenticate(event.api_key or ""))
            self.send({"type": "authenticated"})
        except InferBusError as exc:
            self.auth_failures += 1
            if self.auth_failures >= MAX_AUTH_FAILURES:
                self.end(InferBusError(exc.code, f"{exc.message}; too many failed attempts, closing the socket"))
            else:
                self.send(_error(exc, None))

    def _start(self, event: ClientEvent) -> None:
        rid = event.id
        try:
            if self.key is None:
                raise InferBusError("invalid_api_key", "authenticate first: send {'type': 'auth', 'api_key': ...}")
            if not rid:
                raise invalid("request events need an id", "id")
            if rid in self.running:
                raise invalid(f"id {rid!r} is already running on this socket", "id")
            if len(self.running) >= self.gw.settings.ws_max_in_flight:
                raise InferBusError("rate_limited", "too many requests in flight on this socket")
            if not event.body:
                raise invalid("request events need a body", "body")
            gen = self._generate_request(event)
        except InferBusError as exc:
            self.send(_error(exc, rid))
            return
        assert rid is not None
        parent = event.traceparent or self.traceparent
        task = asyncio.create_task(self._run(rid, gen, DeltaFields(event.endpoint), parent, bytes(event.body)))
        self.running[rid] = task
        task.add_done_callback(lambda _: self.running.pop(rid, None))

    def _generate_request(self, event: ClientEvent) -> GenerateRequest:
        cfg = self.gw.settings
        try:
            if event.endpoint == "completions":
                creq = msgspec.json.decode(event.body, type=CompletionRequest)
                return completion_to_generate(creq, "cmpl-" + secrets.token_hex(12), cfg.default_max_tokens)
            req = msgspec.json.decode(event.body, type=ChatCompletionRequest)
            return chat_to_generate(req, "chatcmpl-" + secrets.token_hex(12), cfg.default_max_tokens)
        except msgspec.MsgspecError as exc:
            raise from_validation(exc) from None
        except RecursionError:
            raise invalid(TOO_DEEP, "body") from None

    async def _run(self, rid: str, gen: GenerateRequest, fields: DeltaFields, parent: str | None,
                   body: bytes) -> None:
        """One request of the socket, in its own task: its span (when tracing is on) and request-log record as
        an HTTP request has them; errors are the request's error event, never the socket's end."""
        span = traced.socket_span(f"WS /v1/ws {fields.endpoint}", parent, {
            "http.route": "/v1/ws", tracing.OPERATION: "chat" if fields.chat else "text_completion",
            traced.TRANSPORT: "websocket", "inferbus.ws.request_id": rid,
        })
        admitted = time.monotonic()
        key = self.key
        assert key is not None
        served, outcome = Served(), Outcome()
        try:
            await self._answer(rid, gen, fields, key, served, outcome)
        finally:
            error = outcome.error
            self.gw.log_request(key, request_id=gen.request_id, kind="llm", model=gen.model, admitted=admitted,
                                served=served, error=error, http_status=error.http_status if error else 200,
                                usage=outcome.usage, streamed=True, request_body=body, response_text=outcome.text)
            if span is not None:
                span.end(error.code if error else None)

    async def _answer(self, rid: str, gen: GenerateRequest, fields: DeltaFields, key: KeyRecord, served: Served,
                      outcome: Outcome) -> None:
        seq = 0
        try:
            grant = await self.gw.admit(key, "/v1/ws", gen)
        except InferBusError as exc:
            outcome.error = exc
            self.send(_error(exc, rid))
            return
        chunks = self.gw.dispatcher.generate(
            gen,
            kind="llm",
            timeout_s=self.gw.settings.request_timeout_s,
            headers=self.gw.bus_headers(None, key),
            key_id=key.id,
            served=served,
        )
        if grant is not None:
            assert self.gw.governor is not None
            chunks = self.gw.governor.governed(key.id, grant, chunks, gen.model)
        try:
            with fields.params():
                async for chunk in chunks:
                    if isinstance(chunk, Accepted):
                        outcome.started = True
                        self.send({"type": "accepted", "id": rid, "request_id": gen.request_id,
                                   "version": chunk.version})
                    elif isinstance(chunk, Delta):
                        outcome.add(chunk)
                        extra = fields.of(chunk)
                        if chunk.text or extra:  # a token that shows nothing (a call's markup) is no event
                            self.send({"type": "delta", "id": rid, "seq": seq, "text": chunk.text, **extra})
                            seq += 1
                    elif isinstance(chunk, Final):
                        outcome.usage = chunk.usage
                        self.send({"type": "done", "id": rid, "finish_reason": chunk.finish_reason,
                                   "usage": usage_body(chunk.usage), "version": chunk.version})
        except InferBusError as exc:
            outcome.error = exc
            self.send(_error(exc, rid))
        except asyncio.CancelledError:
            outcome.error = InferBusError("cancelled", "cancelled by the client")
            self.send(_error(outcome.error, rid))
        except Exception:
            log.get("gateway").exception("ws_request_failed", id=rid)
            outcome.error = InferBusError("internal_error", "The server had an error processing your request")
            self.send(_error(outcome.error, rid))
        finally:
            await chunks.aclose()

    async def close(self) -> None:
        if self.key is not None:
            self.gw.sockets.discard(self.key, self)
        for task in list(self.running.values()):
            task.cancel()
        await asyncio.gather(*self.running.values(), return_exceptions=True)
        self.outbox.put_nowait(None)


@routes.get("/v1/ws")
async def websocket(request: web.Request) -> web.WebSocketResponse:
    gw = request.app[GATEWAY]
    key: KeyRecord | None = None
    if "Authorization" in request.headers:
        assert gw.keys is not None
        key = await gw.keys.authenticate(bearer(request.headers["Authorization"]))
    ws = web.WebSocketResponse(heartbeat=20, max_msg_size=gw.settings.max_body_bytes)
    await ws.prepare(request)
    sock = Socket(gw, ws, key, request.headers.get("traceparent"))
    writer = asyncio.create_task(sock.writer())
    try:
        async for msg in ws:
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                await sock.handle(msg.data)
            elif msg.type == WSMsgType.ERROR:
                log.get("gateway").warning("ws_error", error=str(ws.exception()))
    finally:
        await sock.close()
        try:
            await asyncio.wait_for(writer, timeout=2)
        except (TimeoutError, ConnectionError):
            writer.cancel()
    return ws
