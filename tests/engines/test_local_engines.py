"""The CPU engines on the real SmolLM2 GGUF: answers, token counts, early exit frees the engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from contracts.llm import GenerateRequest, Message
from services.llm import engines
from services.llm.engines.base import Piece

PARIS = [Message("user", "What is the capital of France?")]


def _req(n: int = 24, **kw: Any) -> GenerateRequest:
    fields: dict[str, Any] = {"messages": PARIS, "temperature": 0, **kw}
    return GenerateRequest(request_id="t", model="m", max_tokens=n, **fields)


async def _collect(engine: Any, req: GenerateRequest) -> list[Piece]:
    return [p async for p in engine.generate(engine.prepare(req), req)]


@pytest.fixture(scope="module", params=[
    pytest.param("llamacpp", marks=pytest.mark.model),
    pytest.param("transformers", marks=pytest.mark.transformers),
])
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    if request.param == "transformers":
        pytest.importorskip("torch", reason="transformers extra not installed")
    eng = engines.create(request.param, {"system_prompt": "You are a helpful AI assistant."})
    await eng.load(lambda step, fraction: None)
    yield eng
    await eng.close()


async def test_answers_paris_greedily_and_deterministically(engine: Any) -> None:
    first = await _collect(engine, _req())
    second = await _collect(engine, _req())
    text = "".join(p.text for p in first)
    assert "Paris" in text
    assert text == "".join(p.text for p in second)
    assert first[-1].finish_reason in ("stop", "length")


async def test_token_counts_come_from_the_tokenizer(engine: Any) -> None:
    pieces = await _collect(engine, _req(5, messages=[Message("user", "Count from one to twenty.")]))
    assert sum(p.tokens for p in pieces) == 5
    assert pieces[-1].finish_reason == "length"
    prepared = engine.prepare(_req())
    longer = engine.prepare(_req(messages=[*PARIS, Message("assistant", "Paris."), Message("user", "And Spain?")]))
    assert prepared.prompt_tokens == len(prepared.prompt) > 10
    assert longer.prompt_tokens > prepared.prompt_tokens


async def test_leaving_early_frees_the_engine(engine: Any) -> None:
    req = _req(200, messages=[Message("user", "Write a long story about a dragon.")], temperature=0.8, seed=1)
    stream = engine.generate(engine.prepare(req), req)
    got = [await anext(stream), await anext(stream)]
    await stream.aclose()
    assert len(got) == 2
    after = await _collect(engine, _req())
    assert "Paris" in "".join(p.text for p in after)


async def test_prompt_over_the_context_is_refused(engine: Any) -> None:
    from contracts.errors import InferBusError

    with pytest.raises(InferBusError) as err:
        engine.prepare(_req(messages=[Message("user", "word " * 5000)]))
    assert err.value.code == "context_length_exceeded"


@pytest.mark.model
async def test_requantized_weights_are_converted_once_and_still_answer(tmp_path: Path) -> None:
    """`requantize: q8_0` holds the shipped Q4_1 weights in Q8_0 blocks (to within Q8_0's rounding): converted
    once into the cache, then loaded from there, and it answers the question the shipped file answers."""
    shipped = engines.create("llamacpp", {"system_prompt": "You are a helpful AI assistant.", "capacity": 1})
    await shipped.load(lambda step, fraction: None)
    try:
        expected = "".join(p.text for p in await _collect(shipped, _req(12)))
    finally:
        await shipped.close()
    options = {"system_prompt": "You are a helpful AI assistant.", "capacity": 1, "requantize": "q8_0",
               "cache_dir": str(tmp_path)}
    target = tmp_path / "SmolLM2-135M-Instruct.Q4_1.q8_0.gguf"
    for run in range(2):
        steps: list[str] = []
        eng = engines.create("llamacpp", options)
        await eng.load(lambda step, fraction, seen=steps: seen.append(step))
        try:
            assert eng.model_path == str(target) and target.is_file()
            assert any(s.startswith("converting") for s in steps) == (run == 0)  # the second load finds it
            assert "Paris" in "".join(p.text for p in await _collect(eng, _req(12)))
        finally:
            await eng.close()
    assert "Paris" in expected
    with pytest.raises(ValueError, match="requantize"):
        engines.create("llamacpp", {"requantize": "q2_k"})


@pytest.mark.model
async def test_requantize_q4_0_gives_the_repackable_type_and_still_answers(tmp_path: Path) -> None:
    """`requantize: q4_0` (speed for quality, see REQUANTIZE): every block weight becomes Q4_0, the type llama.cpp
    repacks for its x86 matrix kernels (the Q8_0 token embedding stays), and the model still answers."""
    import gguf

    eng = engines.create("llamacpp", {"system_prompt": "You are a helpful AI assistant.", "capacity": 1,
                                      "requantize": "q4_0", "cache_dir": str(tmp_path)})
    await eng.load(lambda step, fraction: None)
    try:
        assert "Paris" in "".join(p.text for p in await _collect(eng, _req(12)))
    finally:
        await eng.close()
    converted = gguf.GGUFReader(tmp_path / "SmolLM2-135M-Instruct.Q4_1.q4_0.gguf")
    types = {t.name: t.tensor_type.name for t in converted.tensors}
    blocks = {n: kind for n, kind in types.items() if n.startswith("blk.") and not n.endswith("norm.weight")}
    assert blocks and set(blocks.values()) == {"Q4_0"}, set(blocks.values())
    assert types["token_embd.weight"] == "Q8_0"



@pytest.mark.model
async def test_kv_cache_cells_are_the_type_asked_for() -> None:
    """`kv_cache` sets the K and V cells' type: f16 twice gives the very same log probabilities, bf16 others
    (cells rounded another way) and the same answer; `auto` is bf16 exactly where llama.cpp multiplies it natively."""
    from services.llm.engines.llamacpp import native_bf16

    async def logprobs(kv_cache: str) -> tuple[str, list[float], str]:
        eng: Any = engines.create("llamacpp", {"system_prompt": "You are a helpful AI assistant.", "capacity": 1,
                                               "kv_cache": kv_cache})
        await eng.load(lambda step, fraction: None)
        try:
            pieces = await _collect(eng, _req(12, logprobs=3))
            values = [t.logprob for p in pieces for t in p.logprobs or ()]
            return "".join(p.text for p in pieces), values, eng.kv_cache
        finally:
            await eng.close()

    (f16, first, _), (_, again, _), (bf16, other, _) = [await logprobs(k) for k in ("f16", "f16", "bf16")]
    assert "Paris" in f16 and "Paris" in bf16 and len(first) >= 5
    assert first == again  # deterministic cells: any difference below is the type's
    assert other != first and max(abs(a - b) for a, b in zip(first, other, strict=False)) < 0.5
    assert (await logprobs("auto"))[2] == ("bf16" if native_bf16() else "f16")
    with pytest.raises(ValueError, match="kv_cache"):
        engines.create("llamacpp", {"kv_cache": "q4_0"})
