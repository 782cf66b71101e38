"""Structured outputs and the sampling parameters on the real default model: supported, or a 400 naming them."""

from __future__ import annotations

import json
from typing import Any, Literal

import jsonschema
import openai
import pydantic
import pytest

from tests.conftest import ADMIN_KEY, DEFAULT_MODEL, Gateway

pytestmark = pytest.mark.model

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "country": {"type": "string", "maxLength": 20},
        "capital": {"type": "boolean"},
        "population": {"type": "integer"},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 1, "maxItems": 3},
        "founded": {"type": "string", "format": "date"},
        "climate": {"anyOf": [{"type": "string", "enum": ["mild", "cold", "hot"]}, {"type": "null"}]},
        "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "mayor": {"$ref": "#/$defs/person"},
    },
    "required": ["city", "country", "capital", "population", "landmarks", "founded", "climate", "code", "mayor"],
    "additionalProperties": False,
    "$defs": {"person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30}},
                         "required": ["name"], "additionalProperties": False}},
}
ASK = [{"role": "user", "content": "Describe Paris."}]


@pytest.fixture
def client(gateway: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=ADMIN_KEY, max_retries=0)


async def test_json_schema_output_validates(client: openai.AsyncOpenAI, default_worker: dict[str, Any]) -> None:
    resp = await client.chat.completions.create(
        model=DEFAULT_MODEL, messages=ASK, temperature=0, max_tokens=300,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}},
    )
    assert resp.choices[0].finish_reason == "stop"
    content = resp.choices[0].message.content or ""
    jsonschema.validate(json.loads(content), CITY, format_checker=jsonschema.FormatChecker())


async def test_streamed_json_schema_output_validates(
    client: openai.AsyncOpenAI, default_worker: dict[str, Any]
) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                               "confidence": {"type": "number"}},
              "required": ["answer", "confidence"]}
    stream = await client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Is Paris in France?"}], stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}},
        temperature=0.7, seed=7, max_tokens=100,
    )
    parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    jsonschema.validate(json.loads("".join(parts)), schema)


async def test_json_object_output_parses(client: openai.AsyncOpenAI, default_worker: dict[str, Any]) -> None:
    resp = await client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Paris facts as JSON."}], temperature=0,
        response_format={"type": "json_object"}, max_tokens=400,
    )
    if resp.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(resp.choices[0].message.content or ""), dict)
    else:  # cut by max_tokens: still a JSON object so far
        assert (resp.choices[0].message.content or "").lstrip().startswith("{")


class Verdict(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=20)
    in_europe: bool
    continent: Literal["Europe", "Asia", "Africa", "America", "Oceania"]


async def test_the_sdk_parse_helper_gets_its_pydantic_model(
    client: openai.AsyncOpenAI, default_worker: dict[str, Any]
) -> None:
    completion = await client.chat.completions.parse(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Where is Paris?"}], response_format=Verdict,
        temperature=0, max_tokens=100,
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Verdict)


@pytest.mark.parametrize(("schema", "param"), [
    ({"type": "object", "properties": {"n": {"type": "integer", "maximum": 3}}}, "properties.n.maximum"),
    ({"type": "object", "properties": {"s": {"type": "string", "format": "email"}}}, "properties.s.format"),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "oneOf"),
    ({"type": "object", "properties": {"a": {"$ref": "https://example.com/x.json"}}}, "properties.a.$ref"),
    ({"type": "object", "required": ["b"], "properties": {}}, "required"),
])
async def test_schema_keywords_the_grammar_cannot_enforce_are_named(
    client: openai.AsyncOpenAI, default_worker: dict[str, Any], schema: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(
            model=DEFAULT_MODEL, messages=ASK, max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
    assert bad.value.code == "unsupported_parameter"
    assert bad.value.param == "response_format.json_schema.schema." + param


# ---- sampling parameters ---------------------------------------------------------------------


async def test_logprobs_are_reported_per_token(client: openai.AsyncOpenAI, default_worker: dict[str, Any]) -> None:
    resp = await client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=6, logprobs=True, top_logprobs=3,
    )
    choice = resp.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    items = choice.logprobs.content
    assert "".join(t.token for t in items) == choice.message.content
    for item in items:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob
        assert item.top_logprobs[0].token == item.token  # greedy: the likeliest token is the one chosen
        assert item.bytes == list(item.token.encode())


async def test_completions_logprobs_in_the_legacy_shape(
    client: openai.AsyncOpenAI, default_worker: dict[str, Any]
) -> None:
    resp = await client.completions.create(model=DEFAULT_MODEL, prompt="The capital of France is", max_tokens=4,
                                           temperature=0, logprobs=2)
    logprobs = resp.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs and logprobs.top_logprobs
    assert "".join(logprobs.tokens) == resp.choices[0].text
    assert all(len(top) == 2 for top in logprobs.top_logprobs)


async def test_logit_bias_bans_a_token(client: openai.AsyncOpenAI, default_worker: dict[str, Any]) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    first = await client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, temperature=0,
                                                 max_tokens=3, logprobs=True)
    assert first.choices[0].logprobs is not None and first.choices[0].logprobs.content
    token = first.choices[0].logprobs.content[0].token  # the greedy first token, banned below by its id
    ids = _token_ids(token)
    biased = await client.chat.completions.create(
        model=DEFAULT_MODEL, messages=messages, temperature=0, max_tokens=3,
        logit_bias={str(i): -100 for i in ids},
    )
    assert not (biased.choices[0].message.content or "").startswith(token)


def _token_ids(text: str) -> list[int]:
    """Token ids of `text` in the default model's own vocabulary (loaded alone: no weights)."""
    from llama_cpp import Llama

    from services.llm.engines.llamacpp import smollm2_gguf

    llm = Llama(model_path=smollm2_gguf(), vocab_only=True, verbose=False)
    return list(llm.tokenize(text.encode(), add_bos=False, special=False))


async def test_penalties_and_seed_are_applied(client: openai.AsyncOpenAI, default_worker: dict[str, Any]) -> None:
    messages = [{"role": "user", "content": "List ten fruits."}]
    plain = await client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, temperature=0,
                                                 max_tokens=60)
    penalized = await client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, temperature=0,
                                                     max_tokens=60, frequency_penalty=2.0, presence_penalty=2.0)
    assert plain.choices[0].message.content != penalized.choices[0].message.content
    a, b = [await client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, temperature=1.0, seed=11,
                                                 max_tokens=20, presence_penalty=0.5) for _ in range(2)]
    assert a.choices[0].message.content == b.choices[0].message.content


@pytest.mark.parametrize(("fields", "param"), [
    ({"n": 17}, "n"),
    ({"store": True}, "store"),
    ({"metadata": {"a": "b"}}, "metadata"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"logit_bias": {"99999999": 5}}, "logit_bias"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
])
async def test_parameters_that_cannot_be_honoured_are_named(
    client: openai.AsyncOpenAI, default_worker: dict[str, Any], fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, max_tokens=3, **fields)
    assert bad.value.param == param


async def test_accepted_no_op_values_and_the_fingerprint(
    client: openai.AsyncOpenAI, default_worker: dict[str, Any]
) -> None:
    resp = await client.chat.completions.create(
        model=DEFAULT_MODEL, messages=ASK, max_tokens=3, store=False, service_tier="auto", n=1,
        parallel_tool_calls=True, prompt_cache_key="conversation-1", safety_identifier="user-1",
    )
    assert resp.system_fingerprint == "llamacpp:q4_1"
