"""The remote provider engines against fakes of OpenAI, Anthropic and Gemini, and openai against llama.cpp's server."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from contracts.errors import InferBusError
from contracts.llm import GenerateRequest, Message, ResponseFormat, Tool, ToolCall, ToolCallDelta
from services.llm import engines
from services.llm.engines.anthropic import AnthropicEngine
from services.llm.engines.base import Piece
from services.llm.engines.remote import (
    RemoteEngine,
    SSEEvent,
    SSEParser,
    Turn,
    estimated_prompt_tokens,
    retry_after_s,
)
from services.runtime.embedded import free_port
from tests.fakes.providers import PROVIDERS, FakeProvider

KEY = "sk-test-0123456789abcdef"
MODEL = "fake-model"


def _req(text: str = "alpha beta gamma", max_tokens: int = 100, **fields: Any) -> GenerateRequest:
    fields.setdefault("messages", [Message("user", text)])
    return GenerateRequest(request_id="r", model="m", max_tokens=max_tokens, **fields)


def _engine(fake: FakeProvider, **options: Any) -> RemoteEngine:
    engine = engines.create(fake.provider, {"base_url": fake.base_url, "model": MODEL, "api_key": KEY, **options})
    assert isinstance(engine, RemoteEngine)
    return engine


async def _collect(engine: RemoteEngine, req: GenerateRequest) -> list[Piece]:
    return [p async for p in engine.generate(engine.prepare(req), req)]


async def _failure(engine: RemoteEngine, req: GenerateRequest) -> tuple[InferBusError, list[Piece]]:
    pieces: list[Piece] = []
    with pytest.raises(InferBusError) as caught:
        async for piece in engine.generate(engine.prepare(req), req):
            pieces.append(piece)
    return caught.value, pieces


async def _stats(fake: FakeProvider) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(fake.url + "/_fake/stats") as resp:
        data: dict[str, Any] = await resp.json()
        return data


async def _until_disconnected(fake: FakeProvider, polls: int = 250) -> dict[str, Any]:
    """The fake's stats once they show a disconnect (polled over its control API, at most ~5 s)."""
    for _ in range(polls):
        if (stats := await _stats(fake))["disconnects"]:
            break
        await asyncio.sleep(0.02)
    return stats


@pytest.fixture(scope="module", params=PROVIDERS)
async def fake(request: pytest.FixtureRequest) -> AsyncIterator[FakeProvider]:
    async with FakeProvider(request.param, api_key=KEY, model=MODEL) as server:
        yield server


@pytest.fixture
async def engine(fake: FakeProvider) -> AsyncIterator[RemoteEngine]:
    fake.reset()
    eng = _engine(fake)
    steps: list[tuple[str, float]] = []
    await eng.load(lambda step, fraction: steps.append((step, fraction)))
    assert steps[-1][1] == 1.0
    yield eng
    await eng.close()


# ---- answers --------------------------------------------------------------------------------


async def test_streams_text_then_a_finish_with_the_providers_usage(engine: RemoteEngine, fake: FakeProvider) -> None:
    pieces = await _collect(engine, _req("alpha beta gamma"))
    *text, last = pieces
    assert [p.text for p in text] == ["alpha", " beta", " gamma", " alpha", " beta", " gamma", " alpha", " beta"]
    assert all(p.tokens == 1 and p.finish_reason is None for p in text)
    assert last == Piece("", 0, "stop", prompt_tokens=13, completion_tokens=8)
    assert fake.stats.last_usage == [13, 8]  # 10 + the prompt's 3 words: not what we would estimate
    assert fake.stats.completed == 1


async def test_max_tokens_ends_with_length(engine: RemoteEngine) -> None:
    pieces = await _collect(engine, _req("one two", max_tokens=3))
    assert "".join(p.text for p in pieces) == "one two one"
    assert pieces[-1].finish_reason == "length"
    assert pieces[-1].completion_tokens == 3


async def test_usage_is_estimated_when_the_upstream_reports_none(engine: RemoteEngine, fake: FakeProvider) -> None:
    fake.set_script(no_usage=True)
    req = _req("a fairly long question about nothing in particular")
    last = (await _collect(engine, req))[-1]
    assert last.finish_reason == "stop"
    assert (last.prompt_tokens, last.completion_tokens) == (estimated_prompt_tokens(req), 8)
    assert estimated_prompt_tokens(req) == 13  # 50 characters


async def test_a_plain_prompt_is_one_user_turn(engine: RemoteEngine) -> None:
    req = GenerateRequest(request_id="r", model="m", max_tokens=4, prompt="once upon a")
    assert "".join(p.text for p in await _collect(engine, req)) == "once upon a once"


# ---- translation ----------------------------------------------------------------------------

CONVERSATION = [
    Message("system", "Be brief."),
    Message("user", "hello there"),
    Message("assistant", "hi"),
    Message("developer", "Use French."),
    Message("user", "name a city"),
]
SAMPLING: dict[str, Any] = {"stop": ["END"], "temperature": 0.5, "top_p": 0.9, "seed": 7, "user": "u-1"}

EXPECTED_BODY: dict[str, dict[str, Any]] = {
    "openai": {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": "hi"},
            {"role": "system", "content": "Use French."},
            {"role": "user", "content": "name a city"},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 5,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": ["END"],
        "seed": 7,
        "user": "u-1",
    },
    "anthropic": {
        "model": MODEL,
        "max_tokens": 5,
        "messages": [
            {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "name a city"},
        ],
        "stream": True,
        "system": "Be brief.\n\nUse French.",
        "temperature": 0.5,
        "top_p": 0.9,
        "stop_sequences": ["END"],
        "metadata": {"user_id": "u-1"},
    },
    "gemini": {
        "contents": [
            {"role": "user", "parts": [{"text": "hello there"}]},
            {"role": "model", "parts": [{"text": "hi"}]},
            {"role": "user", "parts": [{"text": "name a city"}]},
        ],
        "generationConfig": {"temperature": 0.5, "topP": 0.9, "maxOutputTokens": 5, "stopSequences": ["END"],
                             "seed": 7},
        "systemInstruction": {"parts": [{"text": "Be brief.\n\nUse French."}]},
    },
}
EXPECTED_PATH = {
    "openai": "/v1/chat/completions",
    "anthropic": "/v1/messages",
    "gemini": f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse",
}
EXPECTED_AUTH = {"openai": f"Bearer {KEY}", "anthropic": KEY, "gemini": KEY}


async def test_request_translation(engine: RemoteEngine, fake: FakeProvider) -> None:
    sampling = {k: v for k, v in SAMPLING.items() if k != "seed" or fake.provider != "anthropic"}  # it has none
    pieces = await _collect(engine, _req(max_tokens=5, messages=CONVERSATION, **sampling))
    assert "".join(p.text for p in pieces) == "name a city name a"
    assert fake.stats.last_body == EXPECTED_BODY[fake.provider]
    assert fake.stats.last_path == EXPECTED_PATH[fake.provider]
    assert fake.stats.last_auth == EXPECTED_AUTH[fake.provider]
    if fake.provider == "anthropic":
        assert fake.stats.last_headers["anthropic-version"] == "2023-06-01"


def test_anthropic_sends_only_sampling_that_differs_from_the_default() -> None:
    engine = AnthropicEngine(model="claude", api_key=KEY)
    assert "temperature" not in engine.body(_req()) and "top_p" not in engine.body(_req())
    assert engine.body(_req(temperature=1.7))["temperature"] == 1.0  # Anthropic's range ends at 1
    with pytest.raises(InferBusError) as caught:
        engine.body(_req(messages=[Message("tool", "42")]))  # a tool result must name its call
    assert caught.value.code == "invalid_request"
    with pytest.raises(InferBusError) as refused:
        engine.prepare(_req(seed=3))
    assert (refused.value.code, refused.value.param) == ("unsupported_parameter", "seed")


# ---- errors ---------------------------------------------------------------------------------

FAULTS = [  # script, our code, what the message says, text pieces before the error
    pytest.param({"status": 429, "retry_after": 2}, "rate_limited", "returned 429", 0, id="429"),
    pytest.param({"status": 401}, "upstream_auth_failed", "returned 401", 0, id="401"),
    pytest.param({"status": 403}, "upstream_auth_failed", "returned 403", 0, id="403"),
    pytest.param({"status": 503}, "upstream_error", "returned 503", 0, id="503"),
    pytest.param({"status": 529}, "upstream_error", "returned 529", 0, id="529-overloaded"),
    pytest.param({"status": 400, "message": "unknown field foo"}, "invalid_request", "foo", 0, id="400"),
    pytest.param({"context_length": True}, "context_length_exceeded", "returned 400", 0, id="context-length"),
    pytest.param({"die_after_chunks": 3}, "upstream_error", "closed the stream before it finished", 3, id="dropped"),
    pytest.param({"malformed": True}, "upstream_error", "malformed stream chunk", 1, id="malformed"),
    pytest.param({"error_event": True}, "upstream_error", "failed mid-stream", 1, id="error-event"),
]


@pytest.mark.parametrize(("script", "code", "says", "before"), FAULTS)
async def test_faults_map_onto_the_catalogue(
    engine: RemoteEngine, fake: FakeProvider, script: dict[str, Any], code: str, says: str, before: int
) -> None:
    fake.set_script(**script)
    error, pieces = await _failure(engine, _req())
    assert error.code == code
    assert error.message.startswith(f"{fake.provider} upstream ") and says in error.message
    assert len(error.message) <= 300 and KEY not in error.message
    if code == "rate_limited":
        assert error.retry_after == 2.0 and error.headers["Retry-After"] == "2"
    else:
        assert error.retry_after is None
    assert len(pieces) == before


async def test_content_policy(engine: RemoteEngine, fake: FakeProvider) -> None:
    fake.set_script(content_filter=True)
    if fake.provider == "anthropic":  # a refusal is a finish reason in Anthropic's stream
        assert (await _collect(engine, _req()))[-1].finish_reason == "content_filter"
        return
    error, _ = await _failure(engine, _req())
    assert error.code == "content_filter"


@pytest.mark.parametrize(
    ("options", "script", "says"),
    [
        pytest.param({"first_byte_timeout_s": 0.2}, {"delay_s": 3}, "no response within 0.2s", id="first-byte"),
        pytest.param({"idle_timeout_s": 0.2}, {"chunk_delay_s": 3}, "went idle for 0.2s", id="idle"),
    ],
)
async def test_timeouts(fake: FakeProvider, options: dict[str, Any], script: dict[str, Any], says: str) -> None:
    fake.reset()
    fake.set_script(**script)
    engine = _engine(fake, **options)
    try:
        error, _ = await _failure(engine, _req())
    finally:
        await engine.close()
    assert error.code == "upstream_timeout" and says in error.message
    assert (await _until_disconnected(fake))["disconnects"] == 1  # we hung up: the fake saw it


async def test_retry_after_ms_header() -> None:
    async with FakeProvider("openai") as fake:
        fake.set_script(status=429, retry_after_ms=250)
        engine = _engine(fake)
        try:
            error, _ = await _failure(engine, _req())
        finally:
            await engine.close()
    assert (error.code, error.retry_after) == ("rate_limited", 0.25)


def test_retry_after_forms() -> None:
    in_30s = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= retry_after_s({"retry-after": in_30s}) <= 30
    assert retry_after_s({"retry-after": email.utils.formatdate(time.time() - 60, usegmt=True)}) == 0.0
    assert retry_after_s({"retry-after": "7"}) == 7.0
    assert retry_after_s({"retry-after-ms": "1500", "retry-after": "7"}) == 1.5
    assert retry_after_s({"retry-after": "soon"}) == 1.0
    assert retry_after_s({}, hint=37.0) == 37.0
    assert retry_after_s({}) == 1.0


async def test_unreachable_upstream() -> None:
    engine = engines.create("openai", {"base_url": f"http://127.0.0.1:{free_port()}/v1", "model": MODEL})
    assert isinstance(engine, RemoteEngine)
    try:
        error, _ = await _failure(engine, _req())
        healthy, reason = await engine.health()
    finally:
        await engine.close()
    assert error.code == "upstream_error" and "cannot be reached" in error.message
    assert not healthy and "cannot be reached" in reason


# ---- cancellation ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["aclose", "cancel"])
async def test_leaving_mid_stream_hangs_up_on_the_upstream(engine: RemoteEngine, fake: FakeProvider, how: str) -> None:
    fake.set_script(chunks=500, chunk_delay_s=0.01)
    req = _req()
    stream = engine.generate(engine.prepare(req), req)
    if how == "aclose":
        assert [(await anext(stream)).text, (await anext(stream)).text] == ["alpha", " beta"]
        await stream.aclose()
    else:
        two = asyncio.Event()

        async def consume() -> None:
            count = 0
            async for _ in stream:
                count += 1
                if count == 2:
                    two.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(two.wait(), 5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    stats = await _until_disconnected(fake)
    assert (stats["disconnects"], stats["completed"]) == (1, 0)


# ---- health and secrets ---------------------------------------------------------------------


async def test_health(engine: RemoteEngine, fake: FakeProvider) -> None:
    assert await engine.health() == (True, "ok")
    assert fake.stats.health_requests == 1 and fake.stats.last_auth == EXPECTED_AUTH[fake.provider]
    assert "key=" not in (fake.stats.last_path or "")
    fake.set_script(status=503, message="down for maintenance")
    healthy, reason = await engine.health()
    assert not healthy and reason == f"{fake.provider} upstream returned 503: down for maintenance"


async def test_update_secrets_switches_the_key(fake: FakeProvider) -> None:
    fake.reset()
    engine = _engine(fake, api_key="sk-wrong-key-000000")
    try:
        error, _ = await _failure(engine, _req())
        assert error.code == "upstream_auth_failed"  # Gemini says it with a 400 and API_KEY_INVALID
        assert "sk-wrong-key-000000" not in error.message  # the fake's OpenAI echoes the key, as OpenAI does
        assert (await engine.health())[0] is False
        engine.update_secrets({"api_key": KEY})
        assert (await _collect(engine, _req()))[-1].finish_reason == "stop"
        assert fake.stats.last_auth == EXPECTED_AUTH[fake.provider]
        assert await engine.health() == (True, "ok")
    finally:
        await engine.close()


def test_options_are_checked() -> None:
    assert {"openai", "anthropic", "gemini"} <= set(engines.ENGINES)
    with pytest.raises(TypeError, match="bogus"):
        engines.create("openai", {"model": MODEL, "bogus": 1})
    with pytest.raises(TypeError, match="model"):
        engines.create("gemini", {"api_key": KEY})
    with pytest.raises(ValueError, match="capacity"):
        engines.create("anthropic", {"model": MODEL, "capacity": 0})
    options = {"model": MODEL, "system_prompt": "ignored", "anthropic_version": "2024-01-01"}
    engine = engines.create("anthropic", options)
    assert engine.capacity == 256 and isinstance(engine, AnthropicEngine)
    assert engine.headers()["anthropic-version"] == "2024-01-01"


# ---- the SSE parser -------------------------------------------------------------------------


def test_sse_parser_reads_events_split_anywhere() -> None:
    wire = (
        ": keep-alive\r\n\r\n"
        "event: message_start\r\ndata: {\"a\": 1}\r\n\r\n"
        "data: line one\ndata: line two\n\n"
        "id: 7\nretry: 100\ndata:no space é\n\n"
        "event: only-a-name\n\n"
        "data: [DONE]\n\n"
        "data: unfinished"
    ).encode()
    expected = [
        SSEEvent("message_start", '{"a": 1}'),
        SSEEvent("message", "line one\nline two"),
        SSEEvent("message", "no space é"),
        SSEEvent("message", "[DONE]"),
    ]
    assert SSEParser().feed(wire) == expected
    bytewise = SSEParser()
    assert [e for i in range(len(wire)) for e in bytewise.feed(wire[i : i + 1])] == expected
    with pytest.raises(ValueError, match="longer than"):
        SSEParser(max_line=16).feed(b"data: " + b"x" * 32)


# ---- the fake as a process, for platform tests ----------------------------------------------


async def test_fake_runs_as_a_process_scripted_over_http() -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.fakes.providers", "--provider", "anthropic", "--port", str(port),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line.decode().strip() == f"fake anthropic listening on http://127.0.0.1:{port}"
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/_fake/script", json={"status": 429, "retry_after": 3, "times": 1}) as resp:
                assert resp.status == 200
            async with http.post(url + "/_fake/script", json={"no_such_fault": 1}) as resp:
                assert resp.status == 400
            engine = engines.create("anthropic", {"base_url": url, "model": MODEL, "api_key": KEY})
            assert isinstance(engine, RemoteEngine)
            try:
                error, _ = await _failure(engine, _req())
                pieces = await _collect(engine, _req())  # `times: 1` used up
            finally:
                await engine.close()
            async with http.get(url + "/_fake/stats") as resp:
                stats = await resp.json()
        assert (error.code, error.retry_after) == ("rate_limited", 3.0)
        assert pieces[-1].finish_reason == "stop"
        assert stats["requests"] == 2 and stats["completed"] == 1 and stats["last_auth"] == KEY
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0


# ---- a real OpenAI-compatible server: llama-cpp-python's --------------------------------------


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """llama-cpp-python's server on SmolLM2: its base_url and log file (readiness is the test's to wait for)."""
    from services.llm.engines.llamacpp import smollm2_gguf

    port = free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    command = [sys.executable, "-m", "llama_cpp.server", "--model", smollm2_gguf(), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--n_ctx", "512", "--n_threads", "1", "--verbose", "False"]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}/v1", log
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _until_ready(base_url: str, log: Path, limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(base_url + "/models") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
    tail = (await asyncio.to_thread(log.read_text))[-2000:]
    raise TimeoutError(f"llama.cpp server at {base_url} not ready in {limit_s}s:\n{tail}")


PARIS = "What is the capital of France?"


@pytest.mark.model
async def test_openai_engine_against_llama_cpp_server(llama_server: tuple[str, Path]) -> None:
    base_url, log = llama_server
    await _until_ready(base_url, log)
    engine = engines.create("openai", {"base_url": base_url, "model": "smollm2", "api_key": "unused"})
    assert isinstance(engine, RemoteEngine)
    await engine.load(lambda step, fraction: None)
    req = _req(
        max_tokens=12,
        temperature=0.0,
        messages=[Message("system", "You are a helpful AI assistant."), Message("user", PARIS)],
    )
    try:
        assert await engine.health() == (True, "ok")
        *text, last = await _collect(engine, req)
    finally:
        await engine.close()
    assert "Paris" in "".join(p.text for p in text)
    assert last.finish_reason in ("stop", "length") and all(p.tokens == 1 for p in text)
    # llama-cpp-python's server sends no usage in streams (it ignores stream_options): we estimate it.
    assert (last.prompt_tokens, last.completion_tokens) == (estimated_prompt_tokens(req), len(text))


# ---- tools and structured output: translation both ways, on each provider's documented wire data ----

WEATHER = Tool(name="get_weather", description="Weather in a city",
               parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
TOOL_HISTORY = [
    Message("user", "Weather in Paris and Rome?"),
    Message("assistant", "", tool_calls=[ToolCall("call_a", "get_weather", '{"city": "Paris"}'),
                                         ToolCall("call_b", "get_weather", '{"city": "Rome"}')]),
    Message("tool", "21C", tool_call_id="call_a"),
    Message("tool", "25C", tool_call_id="call_b"),
]


def _offline(provider: str) -> RemoteEngine:
    engine = engines.create(provider, {"model": MODEL, "api_key": KEY})
    assert isinstance(engine, RemoteEngine)
    return engine


def test_openai_passes_tools_and_history_through() -> None:
    body = _offline("openai").prepare(_req(messages=TOOL_HISTORY, tools=[WEATHER], tool_choice="required",
                                          parallel_tool_calls=False)).prompt
    assert isinstance(body, dict)
    assert body["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city", "parameters": WEATHER.parameters}}]
    assert (body["tool_choice"], body["parallel_tool_calls"]) == ("required", False)
    assert body["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]}
    assert body["messages"][2] == {"role": "tool", "content": "21C", "tool_call_id": "call_a"}
    named = _offline("openai").body(_req(tools=[WEATHER], tool_choice="required", tool_name="get_weather"))
    assert named["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    schema = ResponseFormat(type="json_schema", schema={"type": "object"}, name="out", strict=True)
    formatted = _offline("openai").body(_req(response_format=schema, logprobs=2, frequency_penalty=0.5))
    spec = {"name": "out", "schema": {"type": "object"}, "strict": True}
    assert formatted["response_format"] == {"type": "json_schema", "json_schema": spec}
    assert (formatted["logprobs"], formatted["top_logprobs"], formatted["frequency_penalty"]) == (True, 2, 0.5)


def test_openai_reads_streamed_tool_calls() -> None:
    # The shape of https://platform.openai.com/docs/guides/function-calling (streaming): id and name first.
    engine, turn = _offline("openai"), Turn()
    events = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA", "type": "function",
             "function": {"name": "get_weather", "arguments": ""}}]}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\""}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": "city\": \"Paris\"}"}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    ]
    calls = []
    for data in events:
        assert engine.read(SSEEvent("message", json.dumps(data)), turn) == ""
        calls += turn.calls
        turn.calls = []
    assert calls[0] == ToolCallDelta(0, "call_DdmO9pD3xa9XTPNJ32zg2hcA", "get_weather", "")
    assert "".join(c.arguments for c in calls) == '{"city": "Paris"}' and turn.finish == "tool_calls"


def test_anthropic_translates_tools_history_and_choice() -> None:
    body = _offline("anthropic").body(_req(messages=TOOL_HISTORY, tools=[WEATHER], tool_choice="required",
                                          parallel_tool_calls=False))
    assert body["tools"] == [{"name": "get_weather", "description": "Weather in a city",
                              "input_schema": WEATHER.parameters}]
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert body["messages"][1] == {"role": "assistant", "content": [
        {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_b", "name": "get_weather", "input": {"city": "Rome"}}]}
    assert body["messages"][2] == {"role": "user", "content": [  # both results in one user turn
        {"type": "tool_result", "tool_use_id": "call_a", "content": "21C"},
        {"type": "tool_result", "tool_use_id": "call_b", "content": "25C"}]}
    named = _offline("anthropic").body(_req(tools=[WEATHER], tool_choice="required", tool_name="get_weather"))
    assert named["tool_choice"] == {"type": "tool", "name": "get_weather"}
    assert _offline("anthropic").body(_req(tools=[WEATHER], tool_choice="none"))["tool_choice"] == {"type": "none"}


def _anthropic_events(engine: RemoteEngine, turn: Turn, events: list[tuple[str, dict[str, Any]]]) -> str:
    text = ""
    for name, data in events:
        text += engine.read(SSEEvent(name, json.dumps(data)), turn)
    return text


ANTHROPIC_TOOL_STREAM = [  # https://docs.anthropic.com/en/docs/build-with-claude/streaming (tool use)
    ("message_start", {"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 472,
                                                                                      "output_tokens": 2}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": "Let me check."}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
        "type": "tool_use", "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "get_weather", "input": {}}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": ""}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": "{\"city\": \"San"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": " Francisco\"}"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 1}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                       "usage": {"output_tokens": 89}}),
    ("message_stop", {"type": "message_stop"}),
]


def test_anthropic_reads_tool_use_blocks_as_calls() -> None:
    engine, turn = _offline("anthropic"), Turn()
    assert _anthropic_events(engine, turn, ANTHROPIC_TOOL_STREAM) == "Let me check."
    assert turn.calls[0] == ToolCallDelta(0, "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "get_weather", "")
    assert "".join(c.arguments for c in turn.calls) == '{"city": "San Francisco"}'
    assert (turn.finish, turn.prompt_tokens, turn.completion_tokens) == ("tool_calls", 472, 89)


def test_anthropic_structured_output_and_effort_go_in_output_config() -> None:
    engine = _offline("anthropic")
    fmt = ResponseFormat(type="json_schema", schema={"type": "object", "properties": {"a": {"type": "integer"}}})
    body = engine.body(_req(response_format=fmt, reasoning_effort="low"))
    assert body["output_config"] == {"format": {"type": "json_schema", "schema": fmt.schema}, "effort": "low"}
    assert "tools" not in body
    any_object = engine.body(_req(response_format=ResponseFormat(type="json_object")))
    assert any_object["output_config"]["format"]["schema"] == {"type": "object"}


def test_gemini_translates_tools_and_reads_function_calls() -> None:
    engine = _offline("gemini")
    body = engine.body(_req(messages=TOOL_HISTORY, tools=[WEATHER], tool_choice="required", tool_name="get_weather"))
    assert body["tools"] == [{"functionDeclarations": [{
        "name": "get_weather", "description": "Weather in a city", "parametersJsonSchema": WEATHER.parameters}]}]
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}}
    assert body["contents"][1] == {"role": "model", "parts": [
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
        {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}}]}
    assert body["contents"][2] == {"role": "user", "parts": [
        {"functionResponse": {"name": "get_weather", "response": {"content": "21C"}}},
        {"functionResponse": {"name": "get_weather", "response": {"content": "25C"}}}]}
    with pytest.raises(InferBusError) as serial:
        engine.body(_req(tools=[WEATHER], parallel_tool_calls=False))
    assert serial.value.param == "parallel_tool_calls"
    # https://ai.google.dev/gemini-api/docs/function-calling: a functionCall part, whole, in one chunk.
    chunk = {"candidates": [{"content": {"role": "model", "parts": [
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]}, "finishReason": "STOP"}],
        "usageMetadata": {"promptTokenCount": 30, "candidatesTokenCount": 8}}
    turn = Turn()
    assert engine.read(SSEEvent("message", json.dumps(chunk)), turn) == ""
    (call,) = turn.calls
    assert (call.index, call.name, json.loads(call.arguments)) == (0, "get_weather", {"city": "Paris"})
    assert call.id is not None and call.id.startswith("call_") and turn.finish == "tool_calls"
    fmt = ResponseFormat(type="json_schema", schema={"type": "object"})
    config = engine.body(_req(response_format=fmt, presence_penalty=0.3))["generationConfig"]
    assert (config["responseMimeType"], config["responseJsonSchema"], config["presencePenalty"]) == (
        "application/json", {"type": "object"}, 0.3)


@pytest.mark.parametrize(("provider", "fields", "param"), [
    ("anthropic", {"logprobs": 1}, "logprobs"),
    ("anthropic", {"frequency_penalty": 0.5}, "frequency_penalty"),
    ("gemini", {"logit_bias": {1: 2.0}}, "logit_bias"),
    ("gemini", {"reasoning_effort": "low"}, "reasoning_effort"),
])
def test_what_a_provider_cannot_do_is_refused_by_name(provider: str, fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InferBusError) as refused:
        _offline(provider).prepare(_req(**fields))
    assert (refused.value.code, refused.value.param) == ("unsupported_parameter", param)


async def test_tools_go_out_through_the_http_seam() -> None:
    async with FakeProvider("openai", api_key=KEY, model=MODEL) as fake:
        engine = _engine(fake)
        try:
            pieces = await _collect(engine, _req(tools=[WEATHER]))
        finally:
            await engine.close()
    assert fake.stats.last_body["tools"][0]["function"]["name"] == "get_weather"
    assert fake.stats.last_body["tool_choice"] == "auto" and pieces[-1].finish_reason == "stop"
