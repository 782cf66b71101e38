"""GET /openapi.json (OpenAPI 3.1, generated from the msgspec contracts and the app's own routes) and /docs.

Every route the app serves is in the document: the ones `OPERATIONS` describes with their request and
response Structs, the rest (a route module may `describe` its own) with their handler's docstring. Schemas
come from `msgspec.json.schema_components`, so they change when the contracts do.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec
from aiohttp import web

from contracts import api, llm, tenancy
from contracts import messages as anthropic_api
from contracts import responses as responses_api
from services.gateway.errors import json_response
from services.gateway.speech_routes import SpeechAudioDelta, SpeechAudioDone, SpeechBody

routes = web.RouteTableDef()
SPEC = web.AppKey("openapi_spec", dict)
REF = "#/components/schemas/{name}"
SSE = "text/event-stream"


@dataclass(frozen=True)
class Op:
    """One operation: its summary and the Structs of its body, its answer and (streamed) its events."""

    summary: str
    request: Any = None  # JSON body
    response: Any = None  # the JSON answer (200 unless `status`)
    events: Any = None  # streamed: the `data:` of each server-sent event (a Struct, or a tuple: one per type)
    form: Any = None  # multipart/form-data fields
    query: Any = None  # query parameters (a Struct: its fields)
    status: int = 200
    content_type: str = "application/json"  # of the answer when it is not JSON (text/html, audio/*)
    tags: tuple[str, ...] = ()
    auth: tuple[str, ...] = ("bearer",)
    error: Any = api.ErrorResponse  # the shape of its errors


class ChatQuery(msgspec.Struct):
    """Query parameters of GET /v1/admin/keys."""

    tenant: str | None = None
    include_revoked: bool = False


class UsageQueryParams(msgspec.Struct):
    since: str = "24h"
    until: str | None = None
    group_by: str | None = None
    model: str | None = None
    format: str = "json"
    tenant_id: str | None = None
    key_id: str | None = None
    include_shadow: bool = False


class TranscriptionForm(msgspec.Struct):
    """multipart/form-data of /v1/audio/transcriptions and /translations."""

    file: bytes
    model: str
    language: str | None = None
    prompt: str | None = None
    response_format: str | None = None
    temperature: float | None = None
    stream: bool | None = None
    # segment with any response_format (json stays {text, usage}); word only with verbose_json
    timestamp_granularities: list[Literal["segment", "word"]] | None = msgspec.field(
        default=None, name="timestamp_granularities[]")


class Transcription(msgspec.Struct):
    text: str


OPERATIONS: dict[tuple[str, str], Op] = {
    ("POST", "/v1/chat/completions"): Op(
        "Create a chat completion (tools, structured outputs; SSE with stream: true)",
        llm.ChatCompletionRequest, api.ChatCompletion, api.ChatCompletionChunk, tags=("chat",)),
    ("POST", "/v1/completions"): Op(
        "Create a text completion", llm.CompletionRequest, api.TextCompletion, api.TextCompletion,
        tags=("completions",)),
    ("POST", "/v1/responses"): Op(
        "Create a response (the Responses API)", responses_api.CreateResponse, responses_api.Response,
        responses_api.ResponseEvent, tags=("responses",)),
    ("GET", "/v1/responses/{response_id}"): Op("Get a stored response", response=responses_api.Response,
                                                  tags=("responses",)),
    ("DELETE", "/v1/responses/{response_id}"): Op("Delete a stored response", response=api.DeletedObject,
                                                     tags=("responses",)),
    ("GET", "/v1/responses/{response_id}/input_items"): Op(
        "List a stored response's input items", response=responses_api.InputItemList, tags=("responses",)),
    ("POST", "/v1/messages"): Op(
        "Create a message (Anthropic's Messages API; x-api-key or Bearer)", anthropic_api.MessagesRequest,
        anthropic_api.MessageObject, anthropic_api.StreamEvent, tags=("messages",), auth=("api_key", "bearer"),
        error=anthropic_api.AnthropicError),
    ("POST", "/v1/messages/count_tokens"): Op(
        "Count a message's input tokens", anthropic_api.CountTokensRequest, anthropic_api.TokenCount,
        tags=("messages",), auth=("api_key", "bearer"), error=anthropic_api.AnthropicError),
    ("GET", "/v1/models"): Op("List models, with versions, policy and live workers", response=api.ModelList,
                              tags=("models",)),
    ("GET", "/v1/models/{model}"): Op("Get a model", response=api.ModelObject, tags=("models",)),
    ("GET", "/healthz"): Op("Liveness", response=api.Health, tags=("health",), auth=()),
    ("GET", "/readyz"): Op("Readiness: NATS, PostgreSQL, Redis", response=api.Readiness, tags=("health",), auth=()),
    ("POST", "/v1/audio/transcriptions"): Op("Transcribe audio", form=TranscriptionForm, response=Transcription,
                                             tags=("audio",)),
    ("POST", "/v1/audio/translations"): Op("Translate audio into English text", form=TranscriptionForm,
                                           response=Transcription, tags=("audio",)),
    ("POST", "/v1/audio/speech"): Op(
        "Synthesize speech (the audio itself; OpenAI's events with stream_format: sse)", SpeechBody,
        events=(SpeechAudioDelta, SpeechAudioDone), content_type="audio/mpeg", tags=("audio",)),
    ("POST", "/v1/admin/tenants"): Op("Create a tenant", tenancy.CreateTenant, tenancy.Tenant, status=201,
                                      tags=("admin",)),
    ("GET", "/v1/admin/tenants"): Op("List tenants", tags=("admin",)),
    ("PATCH", "/v1/admin/tenants/{tenant}"): Op("Update a tenant", tenancy.UpdateTenant, tenancy.Tenant,
                                                tags=("admin",)),
    ("POST", "/v1/admin/keys"): Op("Create an API key (shown once)", tenancy.CreateKey, tenancy.NewKey, status=201,
                                   tags=("admin",)),
    ("GET", "/v1/admin/keys"): Op("List API keys (never the keys)", query=ChatQuery, tags=("admin",)),
    ("POST", "/v1/admin/keys/{key_id}/revoke"): Op("Revoke an API key", tenancy.RevokeKey, tenancy.KeyInfo,
                                                   tags=("admin",)),
    ("POST", "/v1/admin/keys/{key_id}/rotate"): Op("Rotate an API key", tenancy.RotateKey, tenancy.NewKey,
                                                   status=201, tags=("admin",)),
    ("PATCH", "/v1/admin/keys/{key_id}"): Op("Update an API key", tenancy.UpdateKey, tenancy.KeyInfo,
                                             tags=("admin",)),
    ("GET", "/v1/usage"): Op("Usage from the ledger (JSON or CSV)", query=UsageQueryParams, tags=("usage",)),
    ("GET", "/openapi.json"): Op("This document", tags=("meta",), auth=()),
    ("GET", "/docs"): Op("API documentation (Swagger UI)", content_type="text/html", tags=("meta",), auth=()),
}
WEBSOCKETS = {"/v1/ws", "/v1/realtime"}


def describe(method: str, path: str, op: Op) -> None:
    """A route module's own description of one of its operations (call at import time)."""
    OPERATIONS[(method.upper(), path)] = op


def _path_of(route: web.AbstractRoute) -> str | None:
    info = route.resource.get_info() if route.resource is not None else {}
    path = info.get("path") or info.get("formatter")
    return str(path) if path else None


def _tag(path: str) -> str:
    parts = [p for p in path.split("/") if p and not p.startswith("{")]
    if parts[:1] == ["v1"]:
        parts = parts[1:]
    return parts[0] if parts else "meta"


def _summary(route: web.AbstractRoute) -> str:
    doc = inspect.getdoc(route.handler) or ""
    return doc.splitlines()[0] if doc else route.handler.__name__.replace("_", " ")


class Builder:
    def __init__(self) -> None:
        self.types: list[Any] = [api.ErrorResponse]

    def ref(self, typ: Any) -> dict[str, Any]:
        if typ not in self.types:
            self.types.append(typ)
        return {"$ref": REF.format(name=typ.__name__)} if isinstance(typ, type) else {"x-type": str(typ)}

    def operation(self, method: str, path: str, op: Op, ws: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "summary": op.summary,
            "operationId": re.sub(r"[^a-zA-Z0-9]+", "_", f"{method.lower()}_{path}").strip("_"),
            "tags": list(op.tags or (_tag(path),)),
            "responses": {"default": {"description": "An error", "content": {
                "application/json": {"schema": self.ref(op.error)}}}},
        }
        out["security"] = [{scheme: []} for scheme in op.auth]
        params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in re.findall(r"\{([^}:]+)", path)]
        if op.query is not None:
            schema, _ = msgspec.json.schema_components([op.query], ref_template=REF)
            required = set(_resolve(schema[0], op.query).get("required", []))
            for name, prop in _resolve(schema[0], op.query).get("properties", {}).items():
                params.append({"name": name, "in": "query", "required": name in required, "schema": prop})
        if params:
            out["parameters"] = params
        if op.request is not None:
            out["requestBody"] = {"required": True, "content": {"application/json": {"schema": self.ref(op.request)}}}
        elif op.form is not None:
            form = self.ref(op.form)
            out["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": form}}}
        if ws:
            out["responses"]["101"] = {"description": "Switching protocols: a WebSocket (see the README)"}
            return out
        content: dict[str, Any] = {}
        if op.response is not None:
            content["application/json"] = {"schema": self.ref(op.response)}
        elif op.content_type != "application/json":
            content[op.content_type] = {"schema": {"type": "string"}}
        else:
            content["application/json"] = {"schema": {"type": "object"}}
        if isinstance(op.events, tuple):
            content[SSE] = {"schema": {"type": "string"},
                            "x-inferbus-event": {"oneOf": [self.ref(event) for event in op.events]}}
        elif op.events is not None:
            content[SSE] = {"schema": {"type": "string"}, "x-inferbus-event": self.ref(op.events)}
        out["responses"][str(op.status)] = {"description": "OK", "content": content}
        return out

    def components(self) -> dict[str, Any]:
        _, components = msgspec.json.schema_components(self.types, ref_template=REF)
        return dict(components)


def _resolve(schema: dict[str, Any], typ: Any) -> dict[str, Any]:
    if "$ref" in schema:
        _, components = msgspec.json.schema_components([typ], ref_template=REF)
        return dict(components[schema["$ref"].rsplit("/", 1)[-1]])
    return schema


def build(app: web.Application) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `app`'s routes."""
    builder = Builder()
    paths: dict[str, dict[str, Any]] = {}
    for route in app.router.routes():
        method = route.method.upper()
        path = _path_of(route)
        if path is None or method in ("HEAD", "OPTIONS", "*"):
            continue
        op = OPERATIONS.get((method, path)) or Op(_summary(route), tags=(_tag(path),))
        paths.setdefault(path, {})[method.lower()] = builder.operation(method, path, op, path in WEBSOCKETS)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "InferBus",
            "version": "0.1.0",
            "description": "OpenAI-compatible inference platform: chat and text completions (tools, structured"
                           " outputs), the Responses API, Anthropic's Messages API, embeddings, audio, vision,"
                           " batch, and its operators' admin API. Errors are OpenAI-shaped.",
        },
        "servers": [{"url": "/"}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": builder.components(),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "An InferBus API key (ib-...)"},
                "api_key": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
    }


@routes.get("/openapi.json")
async def openapi_json(request: web.Request) -> web.Response:
    """This document."""
    app = request.app
    if SPEC not in app:  # built once, after every route is registered
        app[SPEC] = build(app)
    return json_response(200, app[SPEC])


DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>InferBus API</title>
<link rel="stylesheet" href="/docs/assets/swagger-ui.css"></head>
<body><div id="docs"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script src="/docs/init.js"></script>
</body></html>
"""
DOCS_INIT = b'window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#docs", deepLinking: true});\n'


def _assets() -> Path | None:
    try:
        import swagger_ui_bundle
    except ImportError:
        return None
    return Path(swagger_ui_bundle.swagger_ui_path)


@routes.get("/docs")
async def docs(_: web.Request) -> web.Response:
    """API documentation (Swagger UI over /openapi.json)."""
    if _assets() is None:
        return web.Response(text='<a href="/openapi.json">openapi.json</a>', content_type="text/html")
    return web.Response(text=DOCS_HTML, content_type="text/html")


@routes.get("/docs/init.js")
async def docs_init(_: web.Request) -> web.Response:
    return web.Response(body=DOCS_INIT, content_type="application/javascript")


@routes.get("/docs/assets/{name}")
async def docs_asset(request: web.Request) -> web.StreamResponse:
    root = _assets()
    name = request.match_info["name"]
    if root is None or name not in ("swagger-ui.css", "swagger-ui-bundle.js"):
        raise web.HTTPNotFound()
    return web.FileResponse(root / name, headers={"Cache-Control": "public, max-age=86400"})
