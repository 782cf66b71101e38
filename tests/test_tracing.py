"""OpenTelemetry tracing end to end: gateway, router and workers export their spans to an OTLP/HTTP receiver
inside the test, under the client's trace id, each span the child of the one that sent it the request.

The gateway applies the registry's policy itself and skips the router hop (ARCHITECTURE.md), so one trace
holds two requests: an HTTP chat through the gateway (client -> gateway -> worker) and a plain NATS publish
on the model's alias (client -> router -> worker). A remote provider's upstream gets the worker's span as its
`traceparent`. With tracing off (the platform other tests use) nothing loads the SDK and the client's
`traceparent` still reaches the worker as it came.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from contracts import headers as h
from contracts import subjects
from contracts.batch import ExecLine, ExecResult, exec_encoder, exec_reply_decoder
from contracts.control import Reply
from contracts.llm import (
    Accepted,
    Delta,
    Final,
    GenerateRequest,
    Usage,
    chunk_encoder,
)
from contracts.tenancy import CreateKey
from services.runtime import bus
from services.runtime.embedded import free_port
from services.runtime.local import EmbeddedStack, ServiceProcess, settings_env, wait_http, wait_service, wait_worker
from tests.conftest import ADMIN_KEY, GHOST_MODEL, Gateway
from tests.fakes.providers import FakeProvider
from tests.test_registry import admin, nats_generate, until_gateway

MODEL = "traced-chat"
REMOTE_MODEL = "traced-remote"
SERVER = 2  # opentelemetry.proto Span.SpanKind.SPAN_KIND_SERVER


@dataclass
class ReceivedSpan:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    status_code: int


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return tuple(_value(x) for x in v.array_value.values)
    return getattr(v, which) if which else None


class Receiver:
    """An OTLP/HTTP trace receiver (POST /v1/traces, protobuf): every span it was sent."""

    def __init__(self) -> None:
        self.port = free_port()
        self.spans: list[ReceivedSpan] = []
        self.posts = 0
        self._runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _traces(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        export = ExportTraceServiceRequest.FromString(await request.read())
        self.posts += 1
        for rs in export.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for scope in rs.scope_spans:
                for span in scope.spans:
                    self.spans.append(ReceivedSpan(
                        service=resource.get("service.name", ""), name=span.name, kind=span.kind,
                        trace_id=span.trace_id.hex(), span_id=span.span_id.hex(), parent_id=span.parent_span_id.hex(),
                        attributes={a.key: _value(a.value) for a in span.attributes}, status_code=span.status.code,
                    ))
        answer = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=answer, content_type="application/x-protobuf")

    def of_trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]

    async def until(self, what: str, found: Callable[[], bool], limit_s: float = 15) -> None:
        """Poll until `found()` (the processors export every OTEL_BSP_SCHEDULE_DELAY ms), at most `limit_s`."""
        deadline = time.monotonic() + limit_s
        while not found():
            if time.monotonic() > deadline:
                seen = [(s.service, s.name, s.trace_id, s.span_id, s.parent_id) for s in self.spans]
                raise TimeoutError(f"no {what} after {limit_s} s; spans received: {seen}")
            await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    await rec.start()
    yield rec
    await rec.stop()


def traced_env(infra: EmbeddedStack, receiver: Receiver, **extra: str) -> dict[str, str]:
    env = infra.env(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_BSP_SCHEDULE_DELAY="50", **extra)
    for name in ("OTEL_SERVICE_NAME", "OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_TRACES_SAMPLER"):
        env.pop(name, None)  # each service names itself; export to the receiver, everything sampled
    return env


@pytest.fixture(scope="module")
async def platform(
    infra: EmbeddedStack, nc: bus.Connection, registry: ServiceProcess, receiver: Receiver, fake: FakeProvider
) -> AsyncIterator[Gateway]:
    """A traced router, gateway and two workers (benchmark; OpenAI-compatible remote on the fake), beside the
    module's registry."""
    await admin(nc, "register", model=MODEL, version="v1", engine="benchmark")
    view = await admin(nc, "deploy", model=MODEL, version="v1")
    port = free_port()
    procs = [
        ServiceProcess("traced-router", "services.router", traced_env(infra, receiver), infra.root),
        ServiceProcess("traced-worker", "services.llm", traced_env(
            infra, receiver, **settings_env(model=MODEL, version="v1", engine="benchmark")), infra.root),
        ServiceProcess("traced-remote", "services.llm", traced_env(infra, receiver, **settings_env(
            model=REMOTE_MODEL, version="v1", engine="openai",
            engine_options={"base_url": fake.base_url, "model": "fake-model"})), infra.root),
        ServiceProcess("traced-gateway", "services.gateway", traced_env(
            infra, receiver, INFERBUS_PORT=str(port), INFERBUS_ADMIN_KEY=ADMIN_KEY), infra.root),
    ]
    router, worker, remote, gateway_proc = procs
    gw = Gateway(gateway_proc, f"http://127.0.0.1:{port}")
    try:
        await wait_service(nc, "inferbus-router", router)
        await wait_worker(nc, MODEL, worker)
        await wait_worker(nc, REMOTE_MODEL, remote)
        await wait_http(gw.url, gateway_proc)
        async with aiohttp.ClientSession() as http:
            await until_gateway(http, gw, MODEL, view["revision"], workers=1)
            await until_gateway(http, gw, REMOTE_MODEL, 0, workers=1)
        await until_routed(nc, MODEL)
        yield gw
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider("openai") as provider:
        yield provider


async def alias_generate(
    nc: bus.Connection, model: str, request_id: str, headers: dict[str, str] | None = None
) -> list[Any]:
    """A plain NATS publisher on the model's alias (the router's subject): the chunks until the terminal one."""
    request = GenerateRequest(request_id=request_id, model=model, max_tokens=3, prompt="one two three")
    return await nats_generate(nc, subjects.infer("llm", model), request, headers)


async def until_routed(nc: bus.Connection, model: str, limit_s: float = 15) -> None:
    """Until the router has the model's routing table (it watches the registry's KV bucket)."""
    deadline = time.monotonic() + limit_s
    while True:
        chunks = await alias_generate(nc, model, "probe-" + secrets.token_hex(4))
        if isinstance(chunks[-1], Final):
            return
        assert chunks[-1].code == "model_not_found", chunks
        if time.monotonic() > deadline:
            raise TimeoutError(f"the router never routed {model}")
        await asyncio.sleep(0.05)


def traceparent(trace_id: str, span_id: str) -> str:
    return f"00-{trace_id}-{span_id}-01"


async def traced_chat(platform: Gateway, model: str, content: str, max_tokens: int, parent: str) -> Any:
    """A chat completion (cache off) sent with the client's `traceparent`; its answer."""
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    async with aiohttp.ClientSession() as http, http.post(
        f"{platform.url}/v1/chat/completions", json=body,
        headers={**platform.headers, "traceparent": parent, "x-inferbus-cache": "off"},
    ) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


def one(spans: list[ReceivedSpan], **match: Any) -> ReceivedSpan:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]
    assert len(found) == 1, (match, spans)
    return found[0]


async def test_one_trace_across_gateway_router_and_worker(
    platform: Gateway, nc: bus.Connection, receiver: Receiver
) -> None:
    trace_id, client_http, client_nats = secrets.token_hex(16), secrets.token_hex(8), secrets.token_hex(8)
    answer = await traced_chat(platform, MODEL, "trace me please", 5, traceparent(trace_id, client_http))
    usage = answer["usage"]
    assert usage["completion_tokens"] == 5 and usage["prompt_tokens"] > 0

    chunks = await alias_generate(nc, MODEL, "traced-alias-1", {h.TRACEPARENT: traceparent(trace_id, client_nats)})
    assert isinstance(chunks[0], Accepted) and isinstance(chunks[-1], Final), chunks
    via_router = chunks[-1].usage

    def complete() -> bool:
        return len([s for s in receiver.of_trace(trace_id) if s.service == "inferbus-llm"]) >= 2 and any(
            s.service == "inferbus-gateway" for s in receiver.of_trace(trace_id)) and any(
            s.service == "inferbus-router" for s in receiver.of_trace(trace_id))

    await receiver.until(f"spans of trace {trace_id} from gateway, router and two worker requests", complete)
    spans = receiver.of_trace(trace_id)

    # client -> gateway -> worker
    gateway = one(spans, service="inferbus-gateway")
    assert (gateway.parent_id, gateway.kind, gateway.name) == (client_http, SERVER, "POST /v1/chat/completions")
    worker = one(spans, service="inferbus-llm", parent_id=gateway.span_id)
    assert worker.kind == SERVER and worker.name == f"chat {MODEL}"
    a = gateway.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["http.response.status_code"] == 200
    assert a["gen_ai.request.model"] == a["gen_ai.response.model"] == MODEL
    assert a["gen_ai.request.max_tokens"] == 5 and a["inferbus.model.version"] == "v1"
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (
        usage["prompt_tokens"], usage["completion_tokens"])
    w = worker.attributes
    assert w["gen_ai.request.model"] == w["gen_ai.response.model"] == MODEL
    assert (w["gen_ai.usage.input_tokens"], w["gen_ai.usage.output_tokens"]) == (
        usage["prompt_tokens"], usage["completion_tokens"])
    assert w["gen_ai.response.finish_reasons"] == ("length",) and w["gen_ai.request.max_tokens"] == 5
    assert w["gen_ai.provider.name"] == "benchmark" and w["inferbus.model.version"] == "v1"
    assert w["inferbus.request.id"] == answer["id"]

    # client -> router -> worker
    router = one(spans, service="inferbus-router")
    assert router.parent_id == client_nats and router.kind == SERVER
    assert router.attributes["gen_ai.request.model"] == MODEL and router.attributes["inferbus.model.version"] == "v1"
    routed = one(spans, service="inferbus-llm", parent_id=router.span_id)
    assert routed.attributes["inferbus.request.id"] == "traced-alias-1"
    assert routed.attributes["gen_ai.operation.name"] == "text_completion"
    assert (routed.attributes["gen_ai.usage.input_tokens"], routed.attributes["gen_ai.usage.output_tokens"]) == (
        via_router.prompt_tokens, via_router.completion_tokens)
    assert all(s.status_code != 2 for s in spans)  # none failed (STATUS_CODE_ERROR)


async def test_a_remote_provider_gets_the_workers_span_as_traceparent(
    platform: Gateway, receiver: Receiver, fake: FakeProvider
) -> None:
    trace_id, client = secrets.token_hex(16), secrets.token_hex(8)
    await traced_chat(platform, REMOTE_MODEL, "hi", 4, traceparent(trace_id, client))
    upstream = fake.stats.last_headers.get("traceparent", "")
    _, upstream_trace, upstream_parent, _ = upstream.split("-")
    assert upstream_trace == trace_id

    def worker_span() -> list[ReceivedSpan]:
        return [s for s in receiver.of_trace(trace_id) if s.service == "inferbus-llm"]

    await receiver.until("the remote worker's span", lambda: bool(worker_span()))
    worker = worker_span()[0]
    gateway = one(receiver.of_trace(trace_id), service="inferbus-gateway")
    assert worker.parent_id == gateway.span_id and gateway.parent_id == client
    assert upstream_parent == worker.span_id  # the upstream's request is the worker's child
    assert worker.attributes["gen_ai.provider.name"] == "openai"
    assert worker.attributes["gen_ai.response.model"] == REMOTE_MODEL


async def test_a_batch_lines_spans_name_its_batch(platform: Gateway, nc: bus.Connection, receiver: Receiver) -> None:
    """A line as the batch service hands it to a gateway (`batch.exec`): the gateway's span of the line and the
    worker's carry the batch id."""
    msg = await nc.request(subjects.ADMIN_KEYS_CREATE, msgspec.json.encode(CreateKey(name="traced-batch")), timeout=5)
    key_id = msgspec.json.decode(msg.data, type=Reply).result["info"]["id"]
    trace_id, client = secrets.token_hex(16), secrets.token_hex(8)
    body = msgspec.json.encode({"model": MODEL, "messages": [{"role": "user", "content": "a line"}], "max_tokens": 2})
    deadline = time.monotonic() + 15
    for n in itertools.count():  # until this module's gateway takes a line (it joins the queue group after ~3 s)
        line = ExecLine(request_id=f"batch_traced-{n}", batch_id="batch_traced", key_id=key_id,
                        endpoint="/v1/chat/completions", body=body)
        with contextlib.suppress(bus.errors.NoRespondersError):
            reply = await nc.request(subjects.BATCH_EXEC, exec_encoder.encode(line), timeout=10,
                                     headers={h.TRACEPARENT: traceparent(trace_id, client)})
            result = exec_reply_decoder.decode(reply.data)
            assert isinstance(result, ExecResult) and result.status_code == 200, result
            if receiver.of_trace(trace_id) or await traced_soon(receiver, trace_id):
                break
        assert time.monotonic() < deadline, "no traced gateway ran the line"
        await asyncio.sleep(0.2)
    await receiver.until("the worker's span of the line",
                         lambda: any(s.service == "inferbus-llm" for s in receiver.of_trace(trace_id)))
    spans = receiver.of_trace(trace_id)
    gateway = one(spans, service="inferbus-gateway")
    worker = one(spans, service="inferbus-llm")
    assert gateway.parent_id == client and worker.parent_id == gateway.span_id
    assert gateway.name == "batch /v1/chat/completions" and gateway.attributes["gen_ai.usage.output_tokens"] == 2
    assert gateway.attributes["inferbus.batch.id"] == worker.attributes["inferbus.batch.id"] == "batch_traced"


async def test_websocket_requests_have_gateway_spans(platform: Gateway, receiver: Receiver) -> None:
    """/v1/ws: each request its own SERVER span, the child of the event's `traceparent` (else the upgrade
    request's), the worker's span its child; usage as in the `done` event."""
    socket_trace, socket_client = secrets.token_hex(16), secrets.token_hex(8)
    event_trace, event_client = secrets.token_hex(16), secrets.token_hex(8)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "over the socket"}], "max_tokens": 3}
    done: dict[str, Any] = {}
    async with aiohttp.ClientSession() as http, http.ws_connect(
        f"{platform.url.replace('http', 'ws', 1)}/v1/ws",
        headers={**platform.headers, "traceparent": traceparent(socket_trace, socket_client)},
    ) as ws:
        await ws.send_json({"type": "request", "id": "a", "body": body})
        await ws.send_json({"type": "request", "id": "b", "body": body,
                            "traceparent": traceparent(event_trace, event_client)})
        while len(done) < 2:
            event = await ws.receive_json(timeout=30)
            assert event["type"] != "error", event
            if event["type"] == "done":
                done[event["id"]] = event
    for trace_id, client, rid in ((socket_trace, socket_client, "a"), (event_trace, event_client, "b")):
        await receiver.until(f"gateway and worker spans of ws request {rid}", lambda t=trace_id: {
            s.service for s in receiver.of_trace(t)} >= {"inferbus-gateway", "inferbus-llm"})
        spans = receiver.of_trace(trace_id)
        gateway = one(spans, service="inferbus-gateway")
        worker = one(spans, service="inferbus-llm")
        assert (gateway.name, gateway.kind, gateway.parent_id) == ("WS /v1/ws chat.completions", SERVER, client)
        assert worker.parent_id == gateway.span_id and worker.kind == SERVER
        a = gateway.attributes
        assert a["inferbus.transport"] == "websocket" and a["inferbus.ws.request_id"] == rid
        assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.response.model"] == MODEL
        usage = done[rid]["usage"]
        assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (
            usage["prompt_tokens"], usage["completion_tokens"]) and usage["completion_tokens"] == 3
        assert gateway.status_code != 2


async def test_a_realtime_response_has_a_gateway_span(platform: Gateway, receiver: Receiver) -> None:
    """/v1/realtime: a response's span is the child of the upgrade request's `traceparent` and the parent of the
    LLM worker's span; its usage is the `response.done` event's."""
    trace_id, client = secrets.token_hex(16), secrets.token_hex(8)
    async with aiohttp.ClientSession() as http, http.ws_connect(
        f"{platform.url.replace('http', 'ws', 1)}/v1/realtime?model={MODEL}",
        headers={**platform.headers, "traceparent": traceparent(trace_id, client)},
    ) as ws:
        for event in ({"type": "session.update", "session": {"type": "realtime", "output_modalities": ["text"],
                                                             "max_output_tokens": 4}},
                      {"type": "conversation.item.create", "item": {
                          "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}},
                      {"type": "response.create"}):
            await ws.send_json(event)
        while (event := await ws.receive_json(timeout=30))["type"] != "response.done":
            assert event["type"] != "error", event
    response = event["response"]
    assert response["status"] == "completed", response
    await receiver.until("the realtime response's gateway and worker spans", lambda: {
        s.service for s in receiver.of_trace(trace_id)} >= {"inferbus-gateway", "inferbus-llm"})
    spans = receiver.of_trace(trace_id)
    gateway = one(spans, service="inferbus-gateway")
    worker = one(spans, service="inferbus-llm")
    assert (gateway.name, gateway.kind, gateway.parent_id) == (f"realtime response {MODEL}", SERVER, client)
    assert worker.parent_id == gateway.span_id
    a = gateway.attributes
    assert a["inferbus.transport"] == "realtime" and a["inferbus.realtime.response_id"] == response["id"]
    assert a["gen_ai.request.model"] == MODEL and a["inferbus.realtime.status"] == "completed"
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (
        response["usage"]["input_tokens"], response["usage"]["output_tokens"])
    assert response["usage"]["output_tokens"] > 0


async def traced_soon(receiver: Receiver, trace_id: str) -> bool:
    """Whether spans of `trace_id` arrive within a second (no: an untraced gateway ran it)."""
    try:
        await receiver.until(f"spans of {trace_id}", lambda: bool(receiver.of_trace(trace_id)), limit_s=1)
    except TimeoutError:
        return False
    return True


async def test_tracing_off_exports_nothing_and_passes_the_clients_traceparent_through(
    gateway: Gateway, nc: bus.Connection, receiver: Receiver
) -> None:
    """The default platform: no OTLP endpoint, so no SDK and no spans; the worker hears the client's header."""
    trace_id, client = secrets.token_hex(16), secrets.token_hex(8)
    heard: list[dict[str, str]] = []

    async def fake_worker(msg: Any) -> None:  # the ghost model's version subject: no real worker serves it
        heard.append(dict(msg.headers or {}))
        for chunk in (Accepted(0, "fake", "v1"), Delta(1, "hi", 1), Final(2, "stop", Usage(1, 1), "v1")):
            await nc.publish(msg.reply, chunk_encoder.encode(chunk))

    sub = await nc.subscribe(subjects.infer("llm", GHOST_MODEL, "v1"), cb=fake_worker)
    try:
        async with aiohttp.ClientSession() as http, http.post(
            f"{gateway.url}/v1/chat/completions", json={"model": GHOST_MODEL, "messages": [
                {"role": "user", "content": "untraced " + trace_id}]},
            headers={**gateway.headers, "traceparent": traceparent(trace_id, client), "x-inferbus-cache": "off"},
        ) as resp:
            assert resp.status == 200, await resp.text()
    finally:
        await sub.unsubscribe()
    assert len(heard) == 1 and heard[0][h.TRACEPARENT] == traceparent(trace_id, client)  # as the client sent it
    assert "tracing_on" not in gateway.proc.log()
    assert receiver.of_trace(trace_id) == []


def test_tracing_is_off_without_an_endpoint_and_never_loads_the_sdk() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    probe = (
        "import sys\n"
        "from services.runtime import tracing\n"
        "assert not tracing.configure('inferbus-test') and tracing.tracer is None\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", "import json\n" + probe], env=env, capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout) == []
    from services.runtime import tracing

    assert not tracing.wanted({})
    assert not tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_SDK_DISABLED": "true"})
    assert not tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_TRACES_EXPORTER": "none"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x:4318/v1/traces"})
