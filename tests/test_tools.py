"""Tool calling through the openai SDK on the real default model: forced, named, parallel, streamed, history."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jsonschema
import openai
import pytest

from contracts.errors import InferBusError
from contracts.structured import check_schema
from services.gateway.formats import ToolCalls
from services.llm.engines.toolcalls import ToolCallParser
from tests.conftest import ADMIN_KEY, DEFAULT_MODEL, Gateway

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                       "required": ["city"]},
    },
}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
def client(gateway: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=ADMIN_KEY, max_retries=0)


def _valid(name: str, arguments: str) -> dict[str, Any]:
    args: dict[str, Any] = json.loads(arguments)
    jsonschema.validate(args, SCHEMAS[name])
    return args


@pytest.mark.model
async def test_a_named_tool_is_called_with_arguments_that_validate(
    client: openai.AsyncOpenAI, default_worker: dict[str, Any]
) -> None:
    resp = await client.chat.completions.create(
        model=DEFAULT_MODEL, messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=120,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and choice.message.role == "assistant"
    calls = choice.message.tool_calls or []
    assert calls and all(c.type == "function" and c.function.name == "get_weather" for c in calls)
    assert all(c.id.startswith("call_") for c in calls) and len({c.id for c in calls}) == len(calls)
    args = _valid("get_weather", calls[0].function.arguments)
    assert args["unit"] in ("celsius", "fahrenheit")
    assert isinstance(resp.system_fingerprint, str) and resp.system_fingerprint.startswith("llamacpp:")


@pytest.mark.model
async def test_required_without_parallel_calls_exactly_one_tool(
    client: openai.AsyncOpenAI, default_worker: dict[str, Any]
) -> None:
    resp = await client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Weather and time in Rome?"}],
        tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False,
        temperature=0, max_tokens=120,
    )
    calls = resp.choices[0].message.tool_calls or []
    assert len(calls) == 1 and resp.choices[0].finish_reason == "tool_calls"
    _valid(calls[0].function.name, calls[0].function.arguments)


@pytest.mark.model
async def test_parallel_calls_each_validate_against_their_own_tool(
    client: openai.AsyncOpenAI, default_worker: dict[str, Any]
) -> None:
    resp = await client.chat.completions.create(
        model=DEFAULT_MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
        temperature=0, max_tokens=200,
    )
    calls = resp.choices[0].message.tool_calls or []
    assert calls, resp
    for call in calls:
        _valid(call.function.name, call.function.arguments)
    # SmolLM2 at temperature 0 makes more than one call here: the grammar lets it, and each is whole.
    assert len(calls) >= 2 and len({c.id for c in calls}) == len(calls)


@pytest.mark.model
async def test_streamed_tool_calls_arrive_as_openai_deltas(
    client: openai.AsyncOpenAI, default_worker: dict[str, Any]
) -> None:
    stream = await client.chat.completions.create(
        model=DEFAULT_MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", stream=True,
        stream_options={"include_usage": True}, temperature=0, max_tokens=120,
    )
    calls: dict[int, dict[str, str]] = {}
    finishes, deltas, usage = [], 0, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
            for tc in choice.delta.tool_calls or []:
                deltas += 1
                if tc.id is not None:  # the first delta of a call: id, type, name
                    assert tc.index not in calls and tc.type == "function" and tc.function is not None
                    calls[tc.index] = {"id": tc.id, "name": tc.function.name or "", "arguments": ""}
                assert tc.function is not None
                calls[tc.index]["arguments"] += tc.function.arguments or ""
    assert finishes == ["tool_calls"]
    assert deltas > len(calls), "arguments stream in parts, not in one piece at the end"
    assert usage is not None and usage.completion_tokens > 0
    for call in calls.values():
        assert call["name"] == "get_weather"
        _valid(call["name"], call["arguments"])


@pytest.mark.model
async def test_the_sdk_stream_helper_assembles_the_calls(
    client: openai.AsyncOpenAI, default_worker: dict[str, Any]
) -> None:
    async with client.chat.completions.stream(
        model=DEFAULT_MODEL, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=120,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    ) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    calls = final.choices[0].message.tool_calls or []
    assert calls and calls[0].function.name == "get_weather"
    _valid("get_weather", calls[0].function.arguments)


@pytest.mark.model
async def test_a_tool_result_in_the_history_gets_a_text_answer(
    client: openai.AsyncOpenAI, default_worker: dict[str, Any]
) -> None:
    history: list[Any] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "sunny"}'},
    ]
    resp = await client.chat.completions.create(
        model=DEFAULT_MODEL, messages=history, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=40,
    )
    message = resp.choices[0].message
    assert message.tool_calls is None and message.content
    assert resp.choices[0].finish_reason in ("stop", "length")


@pytest.mark.model
async def test_auto_answers_in_text_or_in_valid_calls(
    client: openai.AsyncOpenAI, default_worker: dict[str, Any]
) -> None:
    resp = await client.chat.completions.create(
        model=DEFAULT_MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="auto", temperature=0, max_tokens=60,
    )
    choice = resp.choices[0]
    for call in choice.message.tool_calls or []:
        _valid(call.function.name, call.function.arguments)
    assert (choice.finish_reason == "tool_calls") == bool(choice.message.tool_calls)
    assert choice.message.tool_calls or choice.message.content


@pytest.mark.model
@pytest.mark.parametrize(("body", "param"), [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required", "tools": None}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
])
async def test_bad_tool_requests_are_refused_at_the_edge(
    client: openai.AsyncOpenAI, default_worker: dict[str, Any], body: dict[str, Any], param: str
) -> None:
    fields: dict[str, Any] = {"messages": ASK, "tools": [WEATHER], **body}
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model=DEFAULT_MODEL, **fields)
    assert bad.value.param == param


@pytest.mark.model
async def test_a_schema_keyword_the_grammar_cannot_enforce_is_named(
    client: openai.AsyncOpenAI, default_worker: dict[str, Any]
) -> None:
    tool = {"type": "function", "function": {"name": "set_level", "parameters": {
        "type": "object", "properties": {"level": {"type": "integer", "minimum": 1}}}}}
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, tools=[tool], tool_choice="required")
    assert bad.value.code == "unsupported_parameter"
    assert bad.value.param == "tools[0].function.parameters.properties.level.minimum"
    assert "minimum" in str(bad.value)


# ---- the same over the WebSocket /v1/ws ------------------------------------------------------------

FORCED = {"model": DEFAULT_MODEL, "messages": ASK, "tools": [WEATHER, TIME], "temperature": 0, "max_tokens": 120,
          "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
GREEDY = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Name a fruit."}], "temperature": 0,
          "max_tokens": 8, "logprobs": True, "top_logprobs": 3}
MINIMUM = {"type": "function", "function": {"name": "set_level", "parameters": {
    "type": "object", "properties": {"level": {"type": "integer", "minimum": 1}}}}}
MALFORMED = {"type": "function", "function": {"name": "set_level", "parameters": {
    "type": "object", "properties": {"level": {"type": "integer"}}, "required": "level"}}}


@pytest.fixture
async def ws(gateway: Gateway) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    async with aiohttp.ClientSession() as http, http.ws_connect(gateway.url + "/v1/ws", headers=gateway.headers) as ws:
        yield ws


async def _http(gateway: Gateway, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.post(
        gateway.url + "/v1/chat/completions", json=body, headers=gateway.headers
    ) as resp:
        return resp.status, await resp.json()


async def _ws_run(
    ws: aiohttp.ClientWebSocketResponse, rid: str, body: dict[str, Any], endpoint: str = "chat.completions"
) -> list[dict[str, Any]]:
    """One request's events, up to its done or error event."""
    await ws.send_json({"type": "request", "id": rid, "endpoint": endpoint, "body": body})
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(120):
        while not events or events[-1]["type"] not in ("done", "error"):
            event = await ws.receive_json()
            assert event["id"] == rid, event
            events.append(event)
    return events


def _rebuilt(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The choice of the non-streamed response, rebuilt from a request's delta and done events."""
    deltas = [e for e in events if e["type"] == "delta"]
    assert [e["seq"] for e in deltas] == list(range(len(deltas)))
    assert events[-1]["type"] == "done", events[-1]
    text = "".join(e["text"] for e in deltas)
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if any("tool_calls" in e for e in deltas):
        calls: list[dict[str, Any]] = []
        for piece in (p for e in deltas for p in e.get("tool_calls", ())):
            if "id" in piece:  # a call's first piece: id, type and name
                assert piece["index"] == len(calls)
                calls.append({"id": piece["id"], "type": piece["type"], "function": dict(piece["function"])})
            else:
                calls[piece["index"]]["function"]["arguments"] += piece["function"]["arguments"]
        message["tool_calls"], message["content"] = calls, text or None
    logprobs = None
    if any("logprobs" in e for e in deltas):
        logprobs = {"content": [t for e in deltas for t in e.get("logprobs", {}).get("content", ())], "refusal": None}
    return {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": events[-1]["finish_reason"]}


def _without_call_ids(choice: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(choice)
    for call in out["message"].get("tool_calls") or ():
        assert call.pop("id").startswith("call_")
    return out


@pytest.mark.model
async def test_a_forced_call_over_the_socket_is_the_http_call(
    gateway: Gateway, ws: aiohttp.ClientWebSocketResponse, default_worker: dict[str, Any]
) -> None:
    events = await _ws_run(ws, "forced", FORCED)
    assert events[0]["type"] == "accepted"
    pieces = [p for e in events if e["type"] == "delta" for p in e.get("tool_calls", ())]
    assert len(pieces) > 1, "arguments stream in parts"
    assert all(e["text"] or "tool_calls" in e for e in events if e["type"] == "delta"), "no empty delta events"
    choice = _rebuilt(events)
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert calls and all(c["type"] == "function" and c["function"]["name"] == "get_weather" for c in calls)
    for call in calls:
        _valid("get_weather", call["function"]["arguments"])
    status, whole = await _http(gateway, FORCED)
    assert status == 200, whole
    assert _without_call_ids(choice) == _without_call_ids(whole["choices"][0])
    assert events[-1]["usage"] == whole["usage"]


@pytest.mark.model
async def test_logprobs_over_the_socket_are_the_http_logprobs(
    gateway: Gateway, ws: aiohttp.ClientWebSocketResponse, default_worker: dict[str, Any]
) -> None:
    events = await _ws_run(ws, "greedy", GREEDY)
    deltas = [e for e in events if e["type"] == "delta"]
    assert deltas and all("logprobs" in e and "tool_calls" not in e for e in deltas)
    choice = _rebuilt(events)
    content = choice["logprobs"]["content"]
    assert "".join(t["token"] for t in content) == choice["message"]["content"]
    assert all(len(t["top_logprobs"]) == 3 for t in content)
    status, whole = await _http(gateway, GREEDY)
    assert status == 200, whole
    assert choice == whole["choices"][0]


@pytest.mark.model
async def test_completion_logprobs_over_the_socket_are_the_http_logprobs(
    gateway: Gateway, ws: aiohttp.ClientWebSocketResponse, default_worker: dict[str, Any]
) -> None:
    body = {"model": DEFAULT_MODEL, "prompt": "Paris is", "max_tokens": 6, "temperature": 0, "logprobs": 2}
    events = await _ws_run(ws, "text", body, "completions")
    deltas = [e for e in events if e["type"] == "delta"]
    assert deltas and all("logprobs" in e for e in deltas)
    fields = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    logprobs = {f: [x for e in deltas for x in e["logprobs"][f]] for f in fields}
    async with aiohttp.ClientSession() as http, http.post(
        gateway.url + "/v1/completions", json=body, headers=gateway.headers
    ) as resp:
        whole = await resp.json()
    assert "".join(e["text"] for e in deltas) == whole["choices"][0]["text"]
    assert logprobs == whole["choices"][0]["logprobs"]


@pytest.mark.model
@pytest.mark.parametrize("body", [
    {"tools": [MINIMUM], "tool_choice": "required"},  # a keyword the grammar cannot enforce: the engine says
    {"tools": [MALFORMED], "tool_choice": "required"},  # not a schema: the engine says
    {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},  # the edge says
    {"tools": [{"type": "function", "function": {"name": "x", "parameters": "not an object"}}]},
], ids=["unsupported-keyword", "malformed-schema", "missing-function", "parameters-not-an-object"])
async def test_a_bad_tool_request_is_an_error_event_and_the_socket_serves_on(
    gateway: Gateway, ws: aiohttp.ClientWebSocketResponse, default_worker: dict[str, Any], body: dict[str, Any]
) -> None:
    bad = {"model": DEFAULT_MODEL, "messages": ASK, "max_tokens": 20, **body}
    events = await _ws_run(ws, "bad", bad)
    assert events[-1]["type"] == "error" and all(e["type"] == "accepted" for e in events[:-1]), events
    status, refused = await _http(gateway, bad)
    assert status == 400 and events[-1]["error"] == refused["error"], refused
    events = await _ws_run(ws, "next", {**FORCED, "max_tokens": 60})
    assert events[-1]["type"] == "done" and _rebuilt(events)["message"]["tool_calls"]


# ---- the pieces, without a model ---------------------------------------------------------------


def test_the_call_parser_streams_arguments_from_text_split_anywhere() -> None:
    text = ('Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Par}is", "n": [1, {"a": "\\"x"}]}}'
            '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    for size in (1, 2, 3, 7, len(text)):
        parser = ToolCallParser()
        content, calls = "", ToolCalls()
        for i in range(0, len(text), size):
            piece, deltas = parser.feed(text[i:i + size])
            content += piece
            calls.add(deltas)
        content += parser.flush()
        assert content == "Sure. ", size
        assert [(c[1], json.loads(c[2])) for c in calls.calls] == [
            ("get_weather", {"city": "Par}is", "n": [1, {"a": '"x'}]}), ("get_time", {})], size
        assert all(c[0].startswith("call_") for c in calls.calls)


def test_text_that_only_looks_like_a_call_is_content() -> None:
    parser = ToolCallParser()
    content, deltas = parser.feed("a <tool and <tool_ca")
    content += parser.flush()
    assert (content, deltas) == ("a <tool and <tool_ca", [])


@pytest.mark.parametrize(("schema", "param"), [
    ({"type": "object", "properties": {"a": {"type": "number", "exclusiveMinimum": 0}}},
     "p.properties.a.exclusiveMinimum"),
    ({"type": ["string", "null"], "maxLength": 3}, "p.type"),
    ({"type": "array", "items": [{"type": "string"}]}, "p.items"),
    ({"anyOf": [{"type": "string"}], "maxLength": 2}, "p.anyOf"),
    ({"$ref": "#/$defs/missing"}, "p.$ref"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 4}, "p.pattern"),
])
def test_schema_keywords_a_grammar_cannot_enforce(schema: dict[str, Any], param: str) -> None:
    with pytest.raises(InferBusError) as refused:
        check_schema(schema, "p")
    assert refused.value.param == param and refused.value.code == "unsupported_parameter"


def test_supported_schemas_pass() -> None:
    check_schema({"type": "object", "title": "T", "properties": {
        "a": {"type": "string", "format": "date-time", "description": "when"},
        "b": {"anyOf": [{"$ref": "#/$defs/x"}, {"type": "null"}]},
        "c": {"type": "array", "prefixItems": [{"const": 1}, {"enum": ["x", "y"]}]},
    }, "required": ["a"], "additionalProperties": False, "$defs": {"x": {"type": "integer"}}}, "p")
