"""OpenTelemetry tracing: spans over OTLP/HTTP when the OTEL_* variables ask for it, and nothing at all otherwise.

Off (no OTLP endpoint configured, the default), `tracer` stays None, the SDK is never imported, and the
request path pays one `tracing.tracer is not None` check: call sites test it before they build anything.
On, every span goes through a BatchSpanProcessor to the OTLP/HTTP protobuf exporter, which reads the
standard variables itself (endpoint, headers, timeout, compression, certificates; OTEL_BSP_* for batching,
OTEL_TRACES_SAMPLER for sampling). Context crosses processes as a W3C `traceparent` header: HTTP in and
out (remote providers), and the bus headers between gateway, router and worker.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from contracts.llm import Usage
from services.runtime import logging as log

tracer: trace.Tracer | None = None  # None: tracing is off (the one check on the request path)
_provider: Any = None
_propagator = TraceContextTextMapPropagator()

# OpenTelemetry GenAI semantic conventions (gen_ai.*), and InferBus's own (inferbus.*).
OPERATION = "gen_ai.operation.name"
REQUEST_MODEL = "gen_ai.request.model"
RESPONSE_MODEL = "gen_ai.response.model"
MAX_TOKENS = "gen_ai.request.max_tokens"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
FINISH_REASONS = "gen_ai.response.finish_reasons"
PROVIDER = "gen_ai.provider.name"
VERSION = "inferbus.model.version"
BATCH_ID = "inferbus.batch.id"


def wanted(env: Mapping[str, str]) -> bool:
    """Whether `env` asks for trace export: an OTLP endpoint, and neither the SDK nor trace export switched off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if "otlp" not in {e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",")}:
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def configure(service_name: str) -> bool:
    """Start exporting this process's spans, as `service_name` unless OTEL_SERVICE_NAME says otherwise, when the
    environment asks for it (see `wanted`); once per process. Whether tracing is on."""
    global tracer, _provider
    if tracer is not None:
        return True
    env = os.environ
    if not wanted(env):
        return False
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
    if protocol not in ("", "http/protobuf"):
        log.get("tracing").warning("tracing_off", reason=f"OTLP protocol {protocol!r}: only http/protobuf is built in")
        return False
    # The SDK is imported only here: a process that does not trace never loads it.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Resource.create lets OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES override the name given here.
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _provider = provider
    tracer = provider.get_tracer("inferbus")
    log.get("tracing").info("tracing_on", service=service_name, endpoint=log.redact(
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")))
    return True


def shutdown() -> None:
    """Export what is still queued and stop (a service's close)."""
    global tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    tracer = _provider = None


class Active:
    """A span made the current one from its start to `end` (which must run in the same task): what the code
    below it (bus headers, a remote provider's request) reads as its parent."""

    __slots__ = ("_token", "span")

    def __init__(self, span: Span) -> None:
        self.span = span
        self._token = otel_context.attach(trace.set_span_in_context(span))

    def headers(self, headers: Mapping[str, str] | None) -> dict[str, str]:
        """`headers` with this span as the `traceparent` (a copy: the caller's are left alone)."""
        out = dict(headers or {})
        _propagator.inject(out, trace.set_span_in_context(self.span))
        return out

    def end(self, error: str | None = None, attributes: Mapping[str, Any] | None = None) -> None:
        """`error`: the error code the request ended with (None or "ok": it succeeded)."""
        span = self.span
        if attributes:
            span.set_attributes(attributes)
        if error is not None and error != "ok":
            span.set_attribute("error.type", error)
            span.set_status(StatusCode.ERROR, error)
        otel_context.detach(self._token)
        span.end()


def start(
    name: str, carrier: Mapping[str, str] | None, attributes: Mapping[str, Any], kind: SpanKind = SpanKind.SERVER
) -> Active:
    """A span for one request handled here, child of the `traceparent` in `carrier` (a root without one)."""
    assert tracer is not None, "tracing is off: check tracing.tracer first"
    parent = _propagator.extract(carrier) if carrier else otel_context.Context()
    return Active(tracer.start_span(name, context=parent, kind=kind, attributes=attributes))


def inject(headers: MutableMapping[str, str]) -> None:
    """Put the current span's `traceparent` into `headers` (nothing when no span is current)."""
    _propagator.inject(headers)


def annotate(attributes: Mapping[str, Any]) -> None:
    """Add `attributes` to the current span (the request's, where one is being traced)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(attributes)


def served(
    model: str, served_model: str, version: str, provider: str | None, usage: Usage | None, error: str | None
) -> None:
    """The current span's request as it ended (the gateway's request log record, as GenAI attributes)."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    attributes: dict[str, Any] = {REQUEST_MODEL: model, RESPONSE_MODEL: served_model or model}
    if version:
        attributes[VERSION] = version
    if provider:
        attributes[PROVIDER] = provider
    if usage is not None:
        attributes[INPUT_TOKENS] = usage.prompt_tokens
        attributes[OUTPUT_TOKENS] = usage.completion_tokens
    span.set_attributes(attributes)
    if error is not None:
        failed(error)


def failed(code: str) -> None:
    """Mark the current span as failed with error code `code` (also an error after its answer had started)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("error.type", code)
        span.set_status(StatusCode.ERROR, code)
