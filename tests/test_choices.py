"""`n` > 1 on chat and text completions: each choice its own generation, merged, metered, limited and cancelled
as one request."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import openai
import pytest

from contracts.llm import Delta, TokenLogprob
from services.gateway.formats import ChatFormat, ChoiceDelta, CompletionFormat
from services.runtime import bus
from tests.conftest import ADMIN_KEY, BENCH_MODEL, DEFAULT_MODEL, SLOW_MODEL, Gateway, SlowWorker, usage_event
from tests.test_tenancy import admin, complete

ASK = [{"role": "user", "content": "Name a colour and a fruit."}]


@pytest.fixture
def client(gateway: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=ADMIN_KEY, max_retries=0)


@pytest.mark.model
async def test_choices_differ_repeat_with_their_seed_and_are_metered_each(
    client: openai.AsyncOpenAI, nc: bus.Connection, default_worker: dict[str, Any]
) -> None:
    def ask() -> Any:
        return client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, n=3, temperature=1.0, seed=7,
                                              max_tokens=12)

    first, again = await ask(), await ask()
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert all(texts) and len(set(texts)) > 1, texts  # seed + i per choice: not three copies of one sample
    assert [c.message.content for c in again.choices] == texts
    assert all(c.finish_reason in ("stop", "length") for c in first.choices)
    one = await client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, temperature=1.0, seed=7,
                                               max_tokens=12)
    assert one.choices[0].message.content == texts[0]  # choice 0 is the request as n=1 would run it
    # A usage event per choice (the ledger's rows), and the answer's usage is their sum.
    events = [await usage_event(nc, "llm", DEFAULT_MODEL, rid) for rid in (first.id, f"{first.id}-1",
                                                                           f"{first.id}-2")]
    assert first.usage is not None and one.usage is not None
    assert first.usage.prompt_tokens == sum(e.prompt_tokens for e in events) == 3 * one.usage.prompt_tokens
    assert first.usage.completion_tokens == sum(e.completion_tokens for e in events)


@pytest.mark.model
async def test_streamed_choices_carry_their_index_and_match_the_whole_answer(
    client: openai.AsyncOpenAI, default_worker: dict[str, Any]
) -> None:
    ask: dict[str, Any] = {"model": DEFAULT_MODEL, "messages": ASK, "n": 2, "temperature": 1.0, "seed": 3,
                           "max_tokens": 10}
    whole = await client.chat.completions.create(**ask)
    stream = await client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True})
    texts, roles, finishes, usage = ["", ""], [0, 0], [None, None], None
    async for chunk in stream:
        if chunk.usage is not None:
            assert not chunk.choices
            usage = chunk.usage
            continue
        (choice,) = chunk.choices
        assert finishes[choice.index] is None, "nothing after a choice's finish chunk"
        if choice.delta.role == "assistant":
            roles[choice.index] += 1
        texts[choice.index] += choice.delta.content or ""
        finishes[choice.index] = choice.finish_reason
    assert roles == [1, 1]
    assert texts == [c.message.content for c in whole.choices]
    assert finishes == [c.finish_reason for c in whole.choices]
    assert usage == whole.usage


async def test_text_completions_give_n_choices(gateway: Gateway, bench_worker: dict[str, Any]) -> None:
    async with aiohttp.ClientSession(headers=gateway.headers) as http:
        async with http.post(gateway.url + "/v1/completions",
                             json={"model": BENCH_MODEL, "prompt": "hi", "max_tokens": 4, "n": 2}) as resp:
            assert resp.status == 200, await resp.text()
            body = await resp.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["text"] and c["finish_reason"] == "length" for c in body["choices"])
    assert body["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize(("n", "status", "code"), [(0, 400, "invalid_request"), (17, 400, "unsupported_parameter")])
async def test_n_out_of_range_is_refused_naming_it(
    gateway: Gateway, bench_worker: dict[str, Any], n: int, status: int, code: str
) -> None:
    async with aiohttp.ClientSession(headers=gateway.headers) as http:
        async with http.post(gateway.url + "/v1/chat/completions",
                             json={"model": BENCH_MODEL, "messages": ASK, "n": n}) as resp:
            body = await resp.json()
    assert resp.status == status and body["error"]["code"] == code and body["error"]["param"] == "n", body


async def test_token_limits_reserve_for_every_choice(
    gateway: Gateway, bench_worker: dict[str, Any], nc: bus.Connection
) -> None:
    # Estimate per choice: prompt bytes (5) + 16 + max_tokens (30) = 51; four choices need 204 of 200.
    key = (await admin(nc, "keys.create", name="tpm-200-choices", limits={"tpm": 200}))["key"]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
        async with http.post(gateway.url + "/v1/completions",
                             json={"model": BENCH_MODEL, "prompt": "hello", "max_tokens": 30, "n": 4}) as resp:
            body = await resp.json()
            assert resp.status == 429 and "Request too large" in body["error"]["message"], body
        async with http.post(gateway.url + "/v1/completions",
                             json={"model": BENCH_MODEL, "prompt": "hello", "max_tokens": 30, "n": 3}) as resp:
            assert resp.status == 200 and len((await resp.json())["choices"]) == 3
        status, _, _ = await complete(http, gateway, key, max_tokens=30)
        assert status == 200  # settled with the 3 x 31 tokens really used, not the 153 reserved


async def test_leaving_a_streamed_request_cancels_every_choice(
    gateway: Gateway, nc: bus.Connection, slow_worker: SlowWorker
) -> None:
    async with aiohttp.ClientSession(headers=gateway.headers) as http:
        async with http.post(gateway.url + "/v1/chat/completions",
                             json={"model": SLOW_MODEL, "messages": ASK, "n": 2, "max_tokens": 400,
                                   "stream": True}) as resp:
            assert resp.status == 200
            rid = resp.headers["x-request-id"]
            seen: set[int] = set()
            async for line in resp.content:  # until both choices have said something, then leave
                if line.startswith(b"data: {"):
                    (choice,) = json.loads(line[6:])["choices"]
                    if choice["delta"].get("content"):
                        seen.add(choice["index"])
                if seen == {0, 1}:
                    break
    # Both generations end early (400 tokens at 20/s would take 20 s) and are metered for what they made.
    for request_id in (rid, rid + "-1"):
        event = await usage_event(nc, "llm", SLOW_MODEL, request_id)
        assert 0 < event.completion_tokens < 400, event


@pytest.mark.parametrize("usage", [False, True])
def test_prepared_token_events_are_the_events_built_whole(usage: bool) -> None:
    """A plain token's SSE event is made from prepared bytes around its encoded text (the streaming hot path):
    byte for byte what building the whole event gives, for awkward text too, in both OpenAI shapes and after a
    fallback changes the serving model; other choices and tokens with logprobs take the whole path."""
    texts = ["tok", 'a "quote" \\ and\nnewline', "\x00 é 漢字 🙂", "\x00inferbus-text\x00", "</script>"]
    for cls in (ChatFormat, CompletionFormat):
        fmt = cls("chatcmpl-1", "asked", 1700000000, usage)
        for served in (("first", "llamacpp", "v1"), ("fallback", None, "v2")):
            fmt.served(*served)
            for text in texts:
                event = fmt.delta(Delta(1, text, 1))
                assert event == fmt._chunk(fmt._content(text))
                body = json.loads(event.removeprefix(b"data: ").removesuffix(b"\n\n"))
                choice = body["choices"][0]
                assert (choice["delta"]["content"] if cls is ChatFormat else choice["text"]) == text
                assert body["model"] == served[0] and ("usage" in body) == usage
            other = json.loads(fmt.delta(ChoiceDelta(1, "x", 1, index=2)).removeprefix(b"data: "))
            assert other["choices"][0]["index"] == 2
        with_logprobs = fmt.delta(Delta(1, "y", 1, logprobs=[TokenLogprob("y", -0.5, [])]))
        assert json.loads(with_logprobs.removeprefix(b"data: "))["choices"][0]["logprobs"] is not None
        assert fmt.delta(Delta(1, "", 0)) == b""
