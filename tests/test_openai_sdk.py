"""The official openai SDK against the gateway, unchanged: chat, completions, models, errors."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.conftest import ADMIN_KEY, BENCH_MODEL, DEFAULT_MODEL, Gateway


@pytest.fixture
def client(gateway: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=ADMIN_KEY, max_retries=0)


async def test_chat_non_streaming(client: openai.AsyncOpenAI, bench_worker: dict[str, Any]) -> None:
    resp = await client.chat.completions.create(
        model=BENCH_MODEL, messages=[{"role": "user", "content": "one two three"}], max_tokens=5
    )
    assert resp.choices[0].message.content == " tok" * 5
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (3, 5, 8)
    assert resp.id.startswith("chatcmpl-")


async def test_chat_streaming_with_usage(client: openai.AsyncOpenAI, bench_worker: dict[str, Any]) -> None:
    stream = await client.chat.completions.create(
        model=BENCH_MODEL,
        messages=[{"role": "user", "content": "hello there"}],
        max_tokens=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " tok" * 7
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7
    assert chunks[-1].usage.prompt_tokens == 2


async def test_completions_both_ways(client: openai.AsyncOpenAI, bench_worker: dict[str, Any]) -> None:
    resp = await client.completions.create(model=BENCH_MODEL, prompt="a b c d", max_tokens=3)
    assert resp.choices[0].text == " tok" * 3
    assert resp.usage is not None and resp.usage.prompt_tokens == 4
    stream = await client.completions.create(model=BENCH_MODEL, prompt="a", max_tokens=4, stream=True)
    texts = [c.choices[0].text async for c in stream if c.choices]
    assert "".join(texts) == " tok" * 4


async def test_models_list_shows_live_worker(client: openai.AsyncOpenAI, bench_worker: dict[str, Any]) -> None:
    models = {m.id: m for m in (await client.models.list()).data}
    assert BENCH_MODEL in models
    assert models[BENCH_MODEL].model_extra is not None and models[BENCH_MODEL].model_extra["workers"] >= 1


async def test_sdk_exception_types(client: openai.AsyncOpenAI, gateway: Gateway, bench_worker: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model=BENCH_MODEL, messages=[{"role": "user", "content": "x"}],
                                             temperature=5)
    assert bad.value.code == "invalid_request" and bad.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert missing.value.code == "model_not_found"
    wrong = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="ib-not-a-real-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await wrong.models.list()


@pytest.mark.model
async def test_default_model_knows_paris(client: openai.AsyncOpenAI, default_worker: dict[str, Any]) -> None:
    resp = await client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=30,
    )
    assert "Paris" in (resp.choices[0].message.content or "")
    assert resp.usage is not None and resp.usage.prompt_tokens > 5
    assert 0 < resp.usage.completion_tokens <= 30


@pytest.mark.model
async def test_default_model_streams(client: openai.AsyncOpenAI, default_worker: dict[str, Any]) -> None:
    stream = await client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=30, stream=True, stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens >= len([c for c in chunks if c.choices and
                                                                 c.choices[0].delta.content])
