"""Continuous batching in the llama.cpp engine on the real SmolLM2 GGUF: batched = one at a time, slots, limits."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from contracts.batch import BATCH_HEADER
from contracts.errors import InferBusError
from contracts.llm import GenerateRequest, Message, ResponseFormat
from services.llm import engines
from services.llm.engines.base import Piece
from services.runtime.worker import REQUEST_HEADERS

pytestmark = pytest.mark.model

CAPACITY = 3
TOPICS = ["a dragon", "the sea", "a lighthouse keeper", "a clockmaker"]


def _req(text: str, n: int = 24, **kw: Any) -> GenerateRequest:
    fields: dict[str, Any] = {"messages": [Message("user", text)], "temperature": 0, **kw}
    return GenerateRequest(request_id="t", model="m", max_tokens=n, **fields)


def _story(i: int, n: int = 24, **kw: Any) -> GenerateRequest:
    return _req(f"Write a short story about {TOPICS[i]}.", n, **kw)


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[Any]:
    eng = engines.create("llamacpp", {"system_prompt": "You are a helpful AI assistant.", "capacity": CAPACITY})
    await eng.load(lambda step, fraction: None)
    yield eng
    await eng.close()


async def _pieces(engine: Any, req: GenerateRequest) -> list[Piece]:
    return [p async for p in engine.generate(engine.prepare(req), req)]


async def _text(engine: Any, req: GenerateRequest) -> str:
    return "".join(p.text for p in await _pieces(engine, req))


async def test_concurrent_greedy_generations_match_one_at_a_time(engine: Any) -> None:
    requests = [_story(i) for i in range(CAPACITY)]
    alone = [await _text(engine, r) for r in requests]
    engine._batch.peak = 0
    together = await asyncio.gather(*(_text(engine, r) for r in requests))
    assert engine._batch.peak == CAPACITY  # all three were decoded in the same steps
    assert together == alone
    assert len(set(alone)) == CAPACITY and all(alone)


async def test_wide_steps_run_on_more_threads_and_give_the_same_answers(engine: Any) -> None:
    wide = engines.create("llamacpp", {"system_prompt": "You are a helpful AI assistant.", "capacity": CAPACITY,
                                       "n_threads": 1, "n_threads_wide": 2, "wide_from": 2})
    await wide.load(lambda step, fraction: None)
    try:
        requests = [_story(i) for i in range(CAPACITY)]
        alone = [await _text(engine, r) for r in requests]  # the module's engine: one thread every step
        assert wide._batch.wide_steps == 0
        together = await asyncio.gather(*(_text(wide, r) for r in requests))
        assert wide._batch.wide_steps > 0  # steps of 2 or more sequences ran on two threads
        assert together == alone
    finally:
        await wide.close()


async def test_more_requests_than_slots_wait_their_turn(engine: Any) -> None:
    requests = [_story(i % len(TOPICS), 8) for i in range(2 * CAPACITY + 1)]
    alone = [await _text(engine, r) for r in requests[:len(TOPICS)]]
    together = await asyncio.gather(*(_text(engine, r) for r in requests))
    assert together == [alone[i % len(TOPICS)] for i in range(len(requests))]
    assert engine._batch.peak <= CAPACITY


async def test_seeded_sampling_is_reproducible_when_batched(engine: Any) -> None:
    sampled = _story(0, 32, temperature=0.8, seed=7)
    first = await _text(engine, sampled)
    assert first == await _text(engine, sampled)
    others = [_story(1, 40, temperature=0.9, seed=3), _story(2, 16)]
    batched, *_ = await asyncio.gather(_text(engine, sampled), *(_text(engine, r) for r in others))
    assert batched == first
    assert first != await _text(engine, _story(0, 32, temperature=0.8, seed=8))


async def test_a_cancelled_sequence_frees_its_slot_and_the_others_continue(engine: Any) -> None:
    long = [_story(i, 48) for i in range(CAPACITY)]
    expected = [await _text(engine, r) for r in long[1:]]
    streams = [engine.generate(engine.prepare(r), r) for r in long]
    heads = [await anext(s) for s in streams]  # all three hold a slot now
    assert len(engine._batch._free) == 0 and all(p.finish_reason is None for p in heads)
    await streams[0].aclose()
    assert len(engine._batch._free) == 1  # released before aclose returned
    newcomer = await _text(engine, _story(3, 8))  # runs in the freed slot while the two others decode
    assert newcomer == await _text(engine, _story(3, 8))
    rests = [[heads[i + 1], *[p async for p in s]] for i, s in enumerate(streams[1:])]
    assert ["".join(p.text for p in rest) for rest in rests] == expected
    assert all(rest[-1].finish_reason is not None for rest in rests)


async def test_a_sequence_that_joins_while_others_run_gets_its_own_answer(engine: Any) -> None:
    running, joining = _story(0, 40), _req("What is the capital of France?", 16)
    expected_running, expected_joining = await _text(engine, running), await _text(engine, joining)
    stream = engine.generate(engine.prepare(running), running)
    head = [await anext(stream) for _ in range(5)]
    joined = await _text(engine, joining)  # prefilled and decoded while `running` keeps decoding
    rest = [p async for p in stream]
    assert joined == expected_joining and "Paris" in joined
    assert "".join(p.text for p in head + rest) == expected_running


async def test_max_tokens_and_end_of_generation_finish_reasons(engine: Any) -> None:
    capped, stopping = await asyncio.gather(
        _pieces(engine, _story(1, 5)), _pieces(engine, _req("What is the capital of France?", 100)))
    assert sum(p.tokens for p in capped) == 5 and capped[-1].finish_reason == "length"
    assert stopping[-1].finish_reason == "stop" and stopping[-1].tokens == 0
    assert 0 < sum(p.tokens for p in stopping) < 100
    assert all(p.finish_reason is None for p in capped[:-1] + stopping[:-1])


async def test_a_sequence_stops_when_its_context_is_full(engine: Any) -> None:
    def completion(words: int) -> GenerateRequest:
        return GenerateRequest(request_id="t", model="m", prompt="word " * words, max_tokens=50, temperature=0)

    probe = engine.prepare(completion(1000)).prompt_tokens
    full = completion(1000 + engine.n_ctx - 3 - probe)
    assert engine.prepare(full).prompt_tokens == engine.n_ctx - 3
    pieces, other = await asyncio.gather(_pieces(engine, full), _text(engine, _story(2, 24)))
    assert sum(p.tokens for p in pieces) == 3 and pieces[-1].finish_reason == "length"
    assert other == await _text(engine, _story(2, 24))


async def test_a_long_prompt_is_fed_in_chunks_without_changing_its_answer(engine: Any) -> None:
    notes = " ".join(f"Note {i}: the meeting about project {i} moved to room {i + 7}." for i in range(60))
    long = _req(f"{notes}\nWhich room is the meeting about project 12 in?", 12)
    assert engine.prepare(long).prompt_tokens > 2 * engine._batch.prefill_chunk + 512
    alone = await _pieces(engine, long)
    stream = engine.generate(engine.prepare(_story(0, 60)), _story(0, 60))
    await anext(stream)
    joined = await _pieces(engine, long)  # fed 256 tokens a step between the running story's tokens
    await stream.aclose()
    assert joined == alone and sum(p.tokens for p in alone) > 0


async def test_a_short_prompt_leaves_a_long_cached_prefix_to_the_prompts_that_share_it(engine: Any) -> None:
    """An agent's long prefix (tools, a document) stays cached while short chats that share its first tokens come
    and go: they take other slots, and the agent's next turn computes only what is new."""
    from services.llm.engines.llamacpp_batch import common_prefix

    facts = [f"Fact {i}: the {TOPICS[i % 4]} has number {i * 7}." for i in range(40)]
    first = _req("Summarize. " + " ".join(facts) + " What is fact 3?", 2)
    await _text(engine, first)
    for i in range(2 * CAPACITY):  # each shares the system prompt and the first fact with it, and little else
        await _text(engine, _req(f"Summarize. {facts[0]} ({TOPICS[i % 4]})", 2))
    second = _req("Summarize. " + " ".join(facts) + " What is fact 9?", 2)
    shared = common_prefix(engine.prepare(first).prompt, engine.prepare(second).prompt)
    assert shared > 400
    before = engine._batch.reused
    await _text(engine, second)
    assert engine._batch.reused - before >= shared - 2  # (a prompt's last token is always decoded again)


async def test_a_shared_system_prompt_is_copied_from_a_slot_that_keeps_its_own_cells(engine: Any) -> None:
    """Two chats with one long system prompt and different long questions: the second takes another slot (the
    first's cells are mostly its own question), gets the system prompt's cells copied into it, and answers as a
    fresh engine does."""
    rules = " ".join(f"Rule {i}: answer questions about the {TOPICS[i % 4]} politely." for i in range(16))

    def chat(who: int) -> GenerateRequest:
        lines = " ".join(f"Customer {who} line {j}: order {who * 100 + j} is late." for j in range(30))
        return GenerateRequest(request_id="t", model="m", max_tokens=8, temperature=0,
                               messages=[Message("system", rules), Message("user", lines)])

    await _text(engine, chat(1))
    copies, reused = engine._batch.copies, engine._batch.reused
    answer = await _text(engine, chat(2))
    assert engine._batch.copies == copies + 1
    assert engine._batch.reused - reused > 150  # the system prompt's tokens, not computed again
    fresh = engines.create("llamacpp", {"capacity": 1})
    await fresh.load(lambda step, fraction: None)
    try:
        assert await _text(fresh, chat(2)) == answer
    finally:
        await fresh.close()


async def test_a_prompt_a_running_sequence_is_computing_waits_and_copies_its_cells(engine: Any) -> None:
    """The same long prompt twice at once (n choices, a burst of calls with one tool list): the second waits for
    the first's prefill and copies its cells instead of computing them again, and answers the same."""
    notes = " ".join(f"Note {i}: the parcel for {TOPICS[i % 4]} left on day {i + 2}." for i in range(36))
    req = _req(f"{notes} Which parcel left on day 9?", 6)
    copies, reused = engine._batch.copies, engine._batch.reused
    first, second = await asyncio.gather(_text(engine, req), _text(engine, req))
    assert first == second
    assert engine._batch.copies == copies + 1
    assert engine._batch.reused - reused >= engine.prepare(req).prompt_tokens - 2


async def test_a_prompt_longer_than_the_context_is_refused(engine: Any) -> None:
    with pytest.raises(InferBusError) as err:
        engine.prepare(_req("word " * 5000))
    assert err.value.code == "context_length_exceeded"


async def test_structured_output_and_logprobs_run_in_the_batch(engine: Any) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
              "additionalProperties": False}
    structured = _req("Name the capital of France as JSON.", 40,
                      response_format=ResponseFormat(type="json_schema", schema=schema, name="city"))
    with_logprobs = _req("What is the capital of France?", 8, logprobs=2)
    plain = _story(1, 24)
    expected = (await _text(engine, structured), await _pieces(engine, with_logprobs), await _text(engine, plain))
    engine._batch.peak = 0
    got = tuple(await asyncio.gather(_text(engine, structured), _pieces(engine, with_logprobs), _text(engine, plain)))
    assert engine._batch.peak == 3
    assert got == expected
    assert set(json.loads(got[0])) == {"city"}
    tokens = [lp for p in got[1] for lp in p.logprobs or []]
    assert len(tokens) == sum(p.tokens for p in got[1]) and all(len(t.top) == 2 for t in tokens)


async def _batch_lines(engine: Any, requests: list[GenerateRequest], events: list[str] | None = None,
                       started: list[asyncio.Event] | None = None) -> list[asyncio.Task[str]]:
    """`requests` as batch lines (a batch line's header in each line's own task, as the worker sets it), running."""

    async def line(i: int) -> str:
        REQUEST_HEADERS.set({BATCH_HEADER: "batch_test"})
        text = ""
        async for piece in engine.generate(engine.prepare(requests[i]), requests[i]):
            text += piece.text
            if events is not None:
                events.append(f"line{i}")
            if started is not None:
                started[i].set()
        return text

    return [asyncio.create_task(line(i)) for i in range(len(requests))]


async def test_batch_work_sits_out_while_an_interactive_prompt_is_prefilled(engine: Any) -> None:
    """Batch lines give way: an interactive prompt needing several prefill chunks is fed while they wait (a
    batch step in flight when it came is aborted), and its answer is the one it gets alone."""
    notes = " ".join(f"Note {i}: the meeting about project {i} moved to room {i + 7}." for i in range(60))
    interactive = _req(f"{notes}\nWhich room is the meeting about project 12 in?", 4)
    assert engine.prepare(interactive).prompt_tokens > 2 * engine._batch.prefill_chunk + 512
    lines = [_story(i, 48) for i in range(CAPACITY - 1)]
    expected_interactive = await _pieces(engine, interactive)
    events: list[str] = []
    started = [asyncio.Event() for _ in lines]
    running = await _batch_lines(engine, lines, events, started)
    for ready in started:
        await ready.wait()
    events.append("submitted")
    stream = engine.generate(engine.prepare(interactive), interactive)
    first = await anext(stream)
    events.append("first token")
    answer = [first, *[p async for p in stream]]
    texts = await asyncio.gather(*running)
    assert answer == expected_interactive
    assert all(texts) and events.count("line0") == events.count("line1") == 48  # every token of every line
    waited = events[events.index("submitted"):events.index("first token")]
    # Without priority each line would gain a token per 256-token chunk (three chunks or more).
    for i in range(len(lines)):
        assert waited.count(f"line{i}") <= 1, waited


async def test_an_interactive_request_aborts_the_batch_step_in_flight(engine: Any) -> None:
    """With only batch lines running, each step is theirs alone and an arriving interactive request stops it at
    the next graph node: the step's tokens are fed again later, every line gets all its tokens, and the
    interactive answers are the ones they get alone. (A line's greedy text may differ from its interactive
    twin's in rare low-bit ways: a token fed again can land in another KV cell, which changes the order of
    the attention's sums.)"""
    lines = [_story(i, 48) for i in range(CAPACITY - 1)]
    short = _req("What is the capital of France?", 2)
    alone = await _text(engine, short)
    aborted = engine._batch.aborted
    events: list[str] = []
    running = await _batch_lines(engine, lines, events)
    answers = []
    while not all(task.done() for task in running) and len(answers) < 8:
        answers.append(await _text(engine, short))
    texts = await asyncio.gather(*running)
    assert engine._batch.aborted > aborted
    assert answers and set(answers) == {alone}
    assert all(texts) and events.count("line0") == events.count("line1") == 48


async def test_an_interactive_request_takes_a_batch_lines_slot_when_none_is_free(engine: Any) -> None:
    """Batch lines fill every slot; an interactive request preempts the one that joined last, gets the answer it
    gets alone, and every line still gets all its tokens (the preempted one feeds again what it had fed)."""
    lines = [_story(i, 40) for i in range(CAPACITY)]
    short = _req("What is the capital of France?", 2)
    alone = await _text(engine, short)
    preempted = engine._batch.preempted
    events: list[str] = []
    started = [asyncio.Event() for _ in lines]
    running = await _batch_lines(engine, lines, events, started)
    for ready in started:
        await ready.wait()
    answer = await _text(engine, short)
    texts = await asyncio.gather(*running)
    assert engine._batch.preempted > preempted
    assert answer == alone
    assert all(texts) and all(events.count(f"line{i}") == 40 for i in range(CAPACITY)), events
