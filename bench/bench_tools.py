"""Benchmark the OpenAI surface on the default model: concurrency, constrained decoding, tool-list latency.

    python bench/bench_tools.py [--quick] [--note TEXT]

Starts its own embedded nats-server, PostgreSQL and Redis, a gateway and one llama.cpp worker serving
SmolLM2-135M-Instruct (the default model), then measures through the gateway (streamed chat completions,
aiohttp on the same cores):

  a. aggregate tokens/s at 1, 4, 8 and 16 concurrent streams (every stream generates `tokens` tokens);
  b. constrained decoding: decode tokens/s (first to last token of each stream) with a JSON-schema
     response_format vs free decoding of about as many tokens, alternating, in one run (target >= 0.8x);
  c. first-token latency with a 20-function tool list (tool_choice auto) vs the same chat without tools,
     alternating; the first request of each kind (cold: nothing of its prompt cached) is reported apart.

Prints "[bench] ..." progress lines and tables, and writes section `tools` of bench/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from bench import harness  # noqa: E402
from bench.bench_spine import CpuMeter, machine, say  # noqa: E402
from bench.harness import Report  # noqa: E402
from bench.results import write_section  # noqa: E402
from services.runtime import bus  # noqa: E402
from services.runtime.embedded import free_port  # noqa: E402
from services.runtime.local import EmbeddedStack, ServiceProcess, settings_env, wait_http, wait_worker  # noqa: E402

ADMIN_KEY = "ib-bench-admin-" + secrets.token_hex(16)
MODEL, VERSION = "smollm2-135m-instruct", "q4_1"
NARROW = "smollm2-135m-instruct-narrow"  # the same weights on an engine with n_threads_wide=1 (section a only)
ENGINES = {MODEL: "default (wide steps)", NARROW: "one thread every step"}
RESULTS_PATH = ROOT / "bench" / "RESULTS.md"
FULL = {"concurrency": [1, 4, 8, 16], "tokens": 64, "rounds": 3, "constrained": 12, "latency": 12}
QUICK = {"concurrency": [1, 4, 8], "tokens": 32, "rounds": 1, "constrained": 4, "latency": 4}
TITLES = {
    "a": "a. Aggregate tokens/s by concurrent streams (default model, llama.cpp)",
    "b": "b. Constrained decoding (JSON schema) vs free decoding",
    "c": "c. First-token latency with a 20-function tool list",
}
LIST_SCHEMA = {
    "type": "object",
    "properties": {"fruits": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 12,
                              "maxItems": 12}},
    "required": ["fruits"],
    "additionalProperties": False,
}


def twenty_tools() -> list[dict[str, Any]]:
    verbs = ["get", "set", "list", "delete", "create"]
    nouns = ["weather", "calendar_event", "reminder", "contact"]
    tools = []
    for verb in verbs:
        for noun in nouns:
            tools.append({"type": "function", "function": {
                "name": f"{verb}_{noun}",
                "description": f"{verb.capitalize()} a {noun.replace('_', ' ')} for the user",
                "parameters": {"type": "object", "properties": {
                    "id": {"type": "string", "description": f"The {noun} id"},
                    "city": {"type": "string"},
                    "when": {"type": "string", "format": "date"},
                    "count": {"type": "integer"},
                }, "required": ["id"]},
            }})
    return tools


class Stream:
    """One streamed chat completion: when it started, its first and last token, tokens, the finish."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last = 0.0
        self.tokens = 0
        self.prompt_tokens = 0
        self.text: list[str] = []

    @property
    def ttft(self) -> float:
        return (self.first or self.last) - self.start

    @property
    def decode_rate(self) -> float:
        span = self.last - (self.first or self.last)
        return (self.tokens - 1) / span if span > 0 and self.tokens > 1 else 0.0


async def chat(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Stream:
    out = Stream()
    body = {"model": MODEL, "stream": True, "stream_options": {"include_usage": True}, **body}
    # No response cache: every request is generated.
    async with http.post(url + "/v1/chat/completions", json=body, headers={"x-inferbus-cache": "off"}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                out.tokens = event["usage"]["completion_tokens"]
                out.prompt_tokens = event["usage"]["prompt_tokens"]
            for choice in event.get("choices", []):
                delta = choice.get("delta", {})
                if delta.get("content") or delta.get("tool_calls"):
                    now = time.perf_counter()
                    out.first = out.first or now
                    out.last = now
                    out.text.append(delta.get("content") or "")
    return out


async def concurrency(http: aiohttp.ClientSession, url: str, cfg: dict[str, Any], rep: Report) -> None:
    """Both engines (WIDE: the default; NARROW: one thread for every step, the engine before), alternating
    round by round at each concurrency."""
    rep.table("a", ["streams", "engine", "aggregate tokens/s", "per stream tokens/s", "TTFT p50 ms", "wall s"])
    one: dict[str, float] = {}
    for n in cfg["concurrency"]:
        rates: dict[str, list[float]] = {m: [] for m in ENGINES}
        ttfts: dict[str, list[float]] = {m: [] for m in ENGINES}
        walls: dict[str, list[float]] = {m: [] for m in ENGINES}
        for r in range(cfg["rounds"]):
            for model in (ENGINES if r % 2 == 0 else list(reversed(ENGINES))):
                asks = [f"Write a story about robot number {i + r * 100}." for i in range(n)]
                bodies = [{"model": model, "max_tokens": cfg["tokens"], "temperature": 0.8, "seed": i,
                           "messages": [{"role": "user", "content": ask}]} for i, ask in enumerate(asks)]
                t0 = time.perf_counter()
                streams = await asyncio.gather(*(chat(http, url, b) for b in bodies))
                wall = time.perf_counter() - t0
                rates[model].append(sum(s.tokens for s in streams) / wall)
                ttfts[model] += [s.ttft for s in streams]
                walls[model].append(wall)
        for model in ENGINES:
            one.setdefault(model, statistics.median(rates[model]))
        base = one[NARROW]
        for model, label in ENGINES.items():
            aggregate = statistics.median(rates[model])
            rep.row("a", str(n), label, f"{aggregate:.0f} ({aggregate / base:.2f}x)", f"{aggregate / n:.1f}",
                    f"{statistics.median(ttfts[model]) * 1000:.0f}", f"{statistics.median(walls[model]):.2f}")
            say(f"{n} streams, {label}: {aggregate:.0f} tok/s ({aggregate / base:.2f}x one stream, one thread)")


async def constrained(http: aiohttp.ClientSession, url: str, cfg: dict[str, Any], rep: Report) -> None:
    rep.table("b", ["decoding", "requests", "tokens/request", "decode tokens/s (median)", "vs free"])
    schema = {"response_format": {"type": "json_schema", "json_schema": {"name": "fruits", "schema": LIST_SCHEMA}},
              "messages": [{"role": "user", "content": "List twelve fruits."}]}
    free = {"messages": [{"role": "user", "content": "List twelve fruits, one per line."}]}
    runs: dict[str, list[Stream]] = {"json_schema": [], "free": []}
    for i in range(cfg["constrained"]):
        for kind, body in (("json_schema", schema), ("free", free)):
            stream = await chat(http, url, {**body, "max_tokens": 120, "temperature": 0.7, "seed": i})
            if kind == "json_schema":
                json.loads("".join(stream.text))  # it parses, or the run fails
            runs[kind].append(stream)
    rates = {kind: statistics.median(s.decode_rate for s in streams) for kind, streams in runs.items()}
    for kind, streams in runs.items():
        tokens = statistics.mean(s.tokens for s in streams)
        rep.row("b", kind, str(len(streams)), f"{tokens:.0f}", f"{rates[kind]:.1f}",
                f"{rates[kind] / rates['free']:.2f}x")


async def tool_latency(http: aiohttp.ClientSession, url: str, cfg: dict[str, Any], rep: Report) -> None:
    rep.table("c", ["request", "prompt tokens", "cold TTFT ms", "warm TTFT p50 ms", "warm TTFT p90 ms",
                    "vs no tools (warm p50)"])
    tools = twenty_tools()
    questions = ["What is on my calendar tomorrow?", "Remind me to call Ada.", "What is the weather in Oslo?",
                 "Delete the contact Bob.", "How many reminders do I have?", "Create a contact for Eve."]
    kinds: dict[str, dict[str, Any]] = {"no tools": {}, "20 tools (auto)": {"tools": tools, "tool_choice": "auto"}}
    warm: dict[str, list[float]] = {k: [] for k in kinds}
    cold: dict[str, list[float]] = {k: [] for k in kinds}
    prompt: dict[str, int] = {}
    # Blocks of a few turns per kind, alternating: an agent's loop sends the same tools every turn, so after
    # a block's first request the tools' prefix is cached. Each block is a new session (its system prompt starts
    # with the block's number), so its first request is cold: nothing of its prompt is cached.
    per_block = 4
    for block in range(max(1, cfg["latency"] // per_block)):
        for kind, extra in kinds.items():
            for turn in range(per_block):
                question = questions[(block * per_block + turn) % len(questions)]
                body = {"messages": [{"role": "system", "content": f"Session {block}. You are a helpful assistant."},
                                     {"role": "user", "content": f"{question} (turn {block}.{turn})"}],
                        "max_tokens": 4, "temperature": 0, **extra}
                stream = await chat(http, url, body)
                prompt[kind] = stream.prompt_tokens
                (cold if turn == 0 else warm)[kind].append(stream.ttft)
    base = statistics.median(warm["no tools"])
    for kind, values in warm.items():
        p50 = statistics.median(values)
        p90 = sorted(values)[int(0.9 * (len(values) - 1))]
        rep.row("c", kind, str(prompt[kind]), f"{statistics.median(cold[kind]) * 1000:.0f}", f"{p50 * 1000:.0f}",
                f"{p90 * 1000:.0f}", f"{p50 / base:.2f}x")


async def bench(cfg: dict[str, Any], infra: EmbeddedStack, procs: list[ServiceProcess], rep: Report) -> None:
    port = free_port()
    models = json.dumps([{"name": MODEL, "version": VERSION}, {"name": NARROW, "version": VERSION}])
    gateway = ServiceProcess("gateway", "services.gateway", infra.env(
        INFERBUS_PORT=str(port), INFERBUS_ADMIN_KEY=ADMIN_KEY, INFERBUS_MODELS=models), infra.root)
    procs.append(gateway)
    # A 4096-token context: 20 tools take ~2,100 tokens of prompt (the default 2048 is too small for them).
    settings = settings_env(model=MODEL, version=VERSION, engine="llamacpp", engine_options={"n_ctx": 4096})
    worker = ServiceProcess("llm", "services.llm", infra.env(**settings), infra.root)
    procs.append(worker)
    narrow = ServiceProcess("llm-narrow", "services.llm", infra.env(**settings_env(
        model=NARROW, version=VERSION, engine="llamacpp", engine_options={"n_ctx": 4096, "n_threads_wide": 1})),
        infra.root)
    procs.append(narrow)
    url = f"http://127.0.0.1:{port}"
    await wait_http(url, gateway)
    nc = await bus.connect(infra.nats_url, "bench", identity=infra.identity())
    try:
        await wait_worker(nc, MODEL, worker, limit_s=180)
        await wait_worker(nc, NARROW, narrow, limit_s=180)
    finally:
        await nc.close()
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=timeout) as http:
        await chat(http, url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})  # warm up
        pids = {"gateway": gateway.popen.pid, "llm": worker.popen.pid, "llm-narrow": narrow.popen.pid}
        for name, step in (("a", concurrency), ("b", constrained), ("c", tool_latency)):
            say(TITLES[name])
            with CpuMeter(pids):
                await step(http, url, cfg, rep)


def write_results(rep: Report, quick: bool, outcome: harness.Outcome, note: str) -> str:
    about = [
        "Stack: embedded nats-server, PostgreSQL and Redis; one gateway and one llama.cpp worker "
        "(SmolLM2-135M-Instruct Q4_1, up to 8 sequences a batch), as separate processes, plus for section a a second "
        "worker with the same weights and n_threads_wide=1 (model name `smollm2-135m-instruct-narrow`), idle while the "
        "first runs; "
        "the client (aiohttp, streamed chat completions) runs on the same 2 cores.",
        *harness.noise(CpuMeter.others, outcome, note),
    ]
    tables = [
        "What the numbers mean:",
        "",
        "- **a**: the llama.cpp engine batches continuously (services/llm/engines/llamacpp_batch.py): up to 8 "
        "streams advance in one llama_decode a step, each with its own sampler; 16 streams = 8 decoding, 8 "
        "waiting for a slot. A step of one token decodes on one thread (n_threads); a step of 4 or more sequences on "
        "every core (n_threads_wide, the default) or, for the reference engine, on one. Ratios are to one stream "
        "on the one-thread engine (single-stream speed is the same on both: one thread); target 3x at 8.",
        "- **b**: the grammar is checked on the sampled token only, and applied to the whole vocabulary only "
        "when it refuses that token (services/llm/engines/sampling.py); decode rate is first to last token of "
        "each stream, so prefill is out of it.",
        "- **c**: with tool_choice auto the 20 tools go into the system prompt (the prompt tokens column) and "
        "the grammar waits for `<tool_call>`. Cold (a new session: nothing of its prompt cached), their prefill "
        "dominates; warm (the same tools again, as an agent's loop sends them every turn, with the other kind's "
        "requests in between) llama.cpp reuses the cached prefix and evaluates only the new turn. The worker runs "
        "with n_ctx 4096 for these prompts.",
        "",
        rep.section("a"),
        rep.section("b"),
        rep.section("c"),
    ]
    text = harness.markdown("InferBus OpenAI surface benchmark", "bench_tools.py", quick, outcome, about,
                            "\n".join(tables), rep.notes)
    write_section(RESULTS_PATH, "tools", text)
    return text


def main() -> int:
    args = harness.arguments(__doc__, "fewer rounds and streams", note=True)
    cfg = QUICK if args.quick else FULL
    rep = Report(TITLES)
    outcome = harness.run("tools", lambda infra, procs: bench(cfg, infra, procs, rep), quick=args.quick,
                          machine=machine())
    if outcome is None:
        return 1
    write_results(rep, args.quick, outcome, args.note)
    harness.report("tools", rep.titled(), outcome, RESULTS_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
