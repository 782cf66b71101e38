"""The Responses API through the openai SDK on the real default model: plain, streamed, tools, structured, chained."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import jsonschema
import openai
import pydantic
import pytest

from tests.conftest import ADMIN_KEY, DEFAULT_MODEL, Gateway

pytestmark = pytest.mark.model

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                   "required": ["city"], "additionalProperties": False},
    "strict": True,
}


@pytest.fixture
def client(gateway: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=ADMIN_KEY, max_retries=0)


async def test_a_plain_response(client: openai.AsyncOpenAI, default_worker: dict[str, Any]) -> None:
    resp = await client.responses.create(model=DEFAULT_MODEL, input="What is the capital of France?",
                                         instructions="Answer in one sentence.", max_output_tokens=24, temperature=0)
    assert resp.id.startswith("resp_") and resp.object == "response"
    assert resp.status in ("completed", "incomplete") and "Paris" in resp.output_text
    assert resp.usage is not None and resp.usage.output_tokens > 0
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    assert resp.instructions == "Answer in one sentence." and resp.store is True
    message = resp.output[0]
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")


async def test_a_streamed_response_has_the_typed_events(
    client: openai.AsyncOpenAI, default_worker: dict[str, Any]
) -> None:
    kinds: list[str] = []
    deltas: list[str] = []
    async with client.responses.stream(model=DEFAULT_MODEL, input="What is the capital of France?",
                                       max_output_tokens=100, temperature=0) as stream:
        async for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = await stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] == "response.completed" and final.status == "completed"
    assert deltas and final.output_text == "".join(deltas)


async def test_a_response_cut_by_max_output_tokens_is_incomplete(
    client: openai.AsyncOpenAI, default_worker: dict[str, Any]
) -> None:
    resp = await client.responses.create(model=DEFAULT_MODEL, input="Tell me a long story.", max_output_tokens=3)
    assert resp.status == "incomplete" and resp.incomplete_details is not None
    assert resp.incomplete_details.reason == "max_output_tokens"
    stream = await client.responses.create(model=DEFAULT_MODEL, input="Tell me a long story.", max_output_tokens=3,
                                           stream=True)
    events = [event async for event in stream]
    assert events[-1].type == "response.incomplete" and [e.sequence_number for e in events] == list(range(len(events)))


async def test_tools_then_the_result_continues_the_conversation(
    client: openai.AsyncOpenAI, default_worker: dict[str, Any]
) -> None:
    first = await client.responses.create(model=DEFAULT_MODEL, input="What is the weather in Paris?",
                                          tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                                          temperature=0, max_output_tokens=80)
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id
    args = json.loads(calls[0].arguments)
    jsonschema.validate(args, WEATHER["parameters"])
    second = await client.responses.create(
        model=DEFAULT_MODEL, previous_response_id=first.id, tools=[WEATHER], temperature=0, max_output_tokens=30,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"celsius": 21}'}],
        tool_choice="none",
    )
    assert second.previous_response_id == first.id and second.output_text
    alone = await client.responses.create(
        model=DEFAULT_MODEL, tools=[WEATHER], temperature=0, max_output_tokens=1, tool_choice="none", store=False,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"celsius": 21}'}],
    )
    assert second.usage is not None and alone.usage is not None
    assert second.usage.input_tokens > alone.usage.input_tokens + 10  # the stored conversation came along


async def test_streamed_function_call_arguments(client: openai.AsyncOpenAI, default_worker: dict[str, Any]) -> None:
    arguments: list[str] = []
    async with client.responses.stream(model=DEFAULT_MODEL, input="Weather in Rome?", tools=[WEATHER],
                                       tool_choice={"type": "function", "name": "get_weather"}, temperature=0,
                                       parallel_tool_calls=False, max_output_tokens=80) as stream:
        async for event in stream:
            if event.type == "response.function_call_arguments.delta":
                arguments.append(event.delta)
        final = await stream.get_final_response()
    calls = [item for item in final.output if item.type == "function_call"]
    assert len(calls) == 1 and len(arguments) > 1 and calls[0].arguments == "".join(arguments)
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    country: str = pydantic.Field(max_length=20)


async def test_structured_text_format(client: openai.AsyncOpenAI, default_worker: dict[str, Any]) -> None:
    parsed = await client.responses.parse(model=DEFAULT_MODEL, input="Describe Paris.", text_format=City,
                                          temperature=0, max_output_tokens=60)
    assert isinstance(parsed.output_parsed, City)


async def test_stored_responses_get_list_delete_and_chain(
    client: openai.AsyncOpenAI, gateway: Gateway, default_worker: dict[str, Any]
) -> None:
    first = await client.responses.create(model=DEFAULT_MODEL, input="My name is Ada.", max_output_tokens=8,
                                          temperature=0, metadata={"case": "chain"})
    fetched = await client.responses.retrieve(first.id)
    assert fetched.id == first.id and fetched.output_text == first.output_text and fetched.metadata == {"case": "chain"}
    items = await client.responses.input_items.list(first.id)
    assert [i.type for i in items.data] == ["message"]
    second = await client.responses.create(model=DEFAULT_MODEL, previous_response_id=first.id,
                                           input="What is my name?", max_output_tokens=8, temperature=0)
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens + 3
    await client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as gone:
        await client.responses.create(model=DEFAULT_MODEL, previous_response_id=first.id, input="again")
    assert gone.value.param == "previous_response_id"
    unstored = await client.responses.create(model=DEFAULT_MODEL, input="hi", store=False, max_output_tokens=4)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(unstored.id)
    # Another tenant's key sees none of this tenant's responses.
    other = await _key_of_new_tenant(gateway)
    stranger = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=other, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        await stranger.responses.retrieve(second.id)


async def _key_of_new_tenant(gateway: Gateway) -> str:
    async with aiohttp.ClientSession(headers=gateway.headers) as http:
        async with http.post(gateway.url + "/v1/admin/tenants", json={"name": "responses-other"}) as resp:
            assert resp.status in (201, 409), await resp.text()
        async with http.post(gateway.url + "/v1/admin/keys",
                             json={"name": "other", "tenant": "responses-other"}) as resp:
            assert resp.status == 201, await resp.text()
            key: str = (await resp.json())["key"]
            return key


@pytest.mark.parametrize(("fields", "param"), [
    ({"background": True}, "background"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input[0].content[0].type"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"oneOf": [{"type": "string"}]}}}},
     "text.format.schema.oneOf"),
])
async def test_what_is_not_supported_is_named(
    client: openai.AsyncOpenAI, default_worker: dict[str, Any], fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        await client.responses.create(**{"model": DEFAULT_MODEL, "input": "hi", "max_output_tokens": 4, **fields})
    assert bad.value.param == param
