"""The anthropic SDK against /v1/messages on the real default model: text, streaming, tool use, counts, errors."""

from __future__ import annotations

from typing import Any

import anthropic
import jsonschema
import pydantic
import pytest

from tests.conftest import ADMIN_KEY, DEFAULT_MODEL, Gateway

pytestmark = pytest.mark.model

WEATHER = {
    "name": "get_weather",
    "description": "The current weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                     "required": ["city"]},
}
ASK = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0}  # the API takes it; this SDK's create() no longer has the argument


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    country: str = pydantic.Field(max_length=20)


@pytest.fixture
def client(gateway: Gateway) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gateway.url, api_key=ADMIN_KEY, max_retries=0)


async def test_a_text_message(client: anthropic.AsyncAnthropic, default_worker: dict[str, Any]) -> None:
    message = await client.messages.create(model=DEFAULT_MODEL, max_tokens=30, messages=ASK,
                                           system="Answer in one sentence.", extra_body=GREEDY)
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.content[0].type == "text" and "Paris" in message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    assert message.model == DEFAULT_MODEL


async def test_a_streamed_message(client: anthropic.AsyncAnthropic, default_worker: dict[str, Any]) -> None:
    async with client.messages.stream(model=DEFAULT_MODEL, max_tokens=30, messages=ASK, extra_body=GREEDY) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text and final.content[0].type == "text" and final.content[0].text == text
    assert final.usage.output_tokens > 0 and final.stop_reason in ("end_turn", "max_tokens")
    raw = await client.messages.create(model=DEFAULT_MODEL, max_tokens=5, messages=ASK, stream=True)
    kinds = [event.type async for event in raw]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert "content_block_start" in kinds and "content_block_delta" in kinds and "content_block_stop" in kinds


async def test_tool_use_and_its_result(client: anthropic.AsyncAnthropic, default_worker: dict[str, Any]) -> None:
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    message = await client.messages.create(model=DEFAULT_MODEL, max_tokens=100, messages=ask, tools=[WEATHER],
                                           tool_choice={"type": "tool", "name": "get_weather",
                                                        "disable_parallel_tool_use": True}, extra_body=GREEDY)
    uses = [b for b in message.content if b.type == "tool_use"]
    assert message.stop_reason == "tool_use" and len(uses) == 1 and uses[0].name == "get_weather"
    jsonschema.validate(uses[0].input, WEATHER["input_schema"])
    follow = await client.messages.create(
        model=DEFAULT_MODEL, max_tokens=30, tools=[WEATHER], extra_body=GREEDY, tool_choice={"type": "none"},
        messages=[*ask, {"role": "assistant", "content": message.content},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                                "content": "21 degrees and sunny"}]}],
    )
    assert follow.content and follow.content[0].type == "text" and follow.stop_reason != "tool_use"


async def test_streamed_tool_use_is_assembled_by_the_sdk(
    client: anthropic.AsyncAnthropic, default_worker: dict[str, Any]
) -> None:
    async with client.messages.stream(model=DEFAULT_MODEL, max_tokens=100, tools=[WEATHER], extra_body=GREEDY,
                                      messages=[{"role": "user", "content": "Weather in Rome?"}],
                                      tool_choice={"type": "any", "disable_parallel_tool_use": True}) as stream:
        partial = [e.partial_json async for e in stream if e.type == "input_json"]
        final = await stream.get_final_message()
    uses = [b for b in final.content if b.type == "tool_use"]
    assert len(uses) == 1 and len(partial) > 1 and final.stop_reason == "tool_use"
    jsonschema.validate(uses[0].input, WEATHER["input_schema"])


async def test_structured_output_with_the_sdk_parse_helper(
    client: anthropic.AsyncAnthropic, default_worker: dict[str, Any]
) -> None:
    parsed = await client.messages.parse(model=DEFAULT_MODEL, max_tokens=80, output_format=City,
                                         messages=[{"role": "user", "content": "Describe Paris."}], extra_body=GREEDY)
    assert isinstance(parsed.parsed_output, City)


async def test_count_tokens_matches_the_usage(client: anthropic.AsyncAnthropic, default_worker: dict[str, Any]) -> None:
    counted = await client.messages.count_tokens(model=DEFAULT_MODEL, messages=ASK, system="Be brief.")
    message = await client.messages.create(model=DEFAULT_MODEL, max_tokens=1, messages=ASK, system="Be brief.")
    assert counted.input_tokens == message.usage.input_tokens > 0
    with_tools = await client.messages.count_tokens(model=DEFAULT_MODEL, messages=ASK, tools=[WEATHER])
    assert with_tools.input_tokens > counted.input_tokens  # the tools are in the prompt


async def test_errors_in_anthropics_shape(
    client: anthropic.AsyncAnthropic, gateway: Gateway, default_worker: dict[str, Any]
) -> None:
    wrong = anthropic.AsyncAnthropic(base_url=gateway.url, api_key="ib-not-a-key", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as auth:
        await wrong.messages.create(model=DEFAULT_MODEL, max_tokens=5, messages=ASK)
    assert auth.value.body == {"type": "error", "request_id": None, "error": {
        "type": "authentication_error", "message": auth.value.body["error"]["message"]}}
    with pytest.raises(anthropic.NotFoundError) as missing:
        await client.messages.create(model="no-such-model", max_tokens=5, messages=ASK)
    assert missing.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as bad:
        await client.messages.create(model=DEFAULT_MODEL, max_tokens=5, messages=ASK, extra_body={"top_k": 5})
    assert bad.value.body["error"]["type"] == "invalid_request_error" and "top_k" in bad.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as image:
        await client.messages.create(model=DEFAULT_MODEL, max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
    assert "messages[0].content[0].type" in image.value.body["error"]["message"]
