#!/usr/bin/env python
"""Benchmark batch jobs: throughput against interactive traffic, interactive TTFT while a batch runs, lines/s.

    python bench/bench_batch.py [--quick] [--note TEXT]

Starts its own embedded nats-server, PostgreSQL and Redis, a gateway, metering, the batch service, a
llama.cpp worker (the default model, SmolLM2-135M Q4_1) and a benchmark-engine worker, then measures:

  1. the default model, N requests (500; --quick 40) of at most 16 tokens each: sent interactively at
     concurrency 2, 4 and 8 (requests/s; the best is the reference; 1 was always the slowest) and as batches
     (submit to `completed`), the very same requests in every mode (the response cache off for the interactive
     ones; batch lines never use it), in rounds that alternate the modes (4 rounds of N/4; --quick 2);
     target: the batch's throughput >= 0.95x the best interactive one;
  2. interactive time to first token (streamed, one at a time, M requests: 40; --quick 15) with the worker
     idle, then while a second batch of N runs; target: p50 and p99 while the batch runs <= 1.25x idle;
  3. the benchmark engine, L lines (10,000; --quick 2,000) of 4 tokens: upload, then submit to `completed`,
     lines/s end to end.

Prints "[bench] ..." lines and a table; a full run (not --quick) replaces section `batch` of bench/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from openai import AsyncOpenAI  # noqa: E402

from bench import harness  # noqa: E402
from bench.harness import Report, say  # noqa: E402
from bench.results import write_section  # noqa: E402
from services.runtime import bus  # noqa: E402
from services.runtime.embedded import free_port  # noqa: E402
from services.runtime.local import (  # noqa: E402
    EmbeddedStack,
    ServiceProcess,
    settings_env,
    wait_http,
    wait_service,
    wait_worker,
)

RESULTS_PATH = ROOT / "bench" / "RESULTS.md"
ADMIN_KEY = "ib-bench-batch-" + "x" * 24
DEFAULT = "smollm2-135m-instruct"
FAST = "bench-fast"
FULL = {"requests": 500, "rounds": 4, "ttft": 40, "lines": 10_000}
QUICK = {"requests": 40, "rounds": 2, "ttft": 15, "lines": 2_000}
TOKENS = 16
CONCURRENCIES = (2, 4, 8)  # 8: the llama.cpp worker's sequences a step; 1 (always the slowest) is left out


def chat(i: int, model: str, max_tokens: int, tag: str) -> dict[str, Any]:
    """One request; `tag` makes each phase's prompts its own (no response cache answers one phase from another)."""
    return {"model": model, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": f"Write one sentence about the number {i} ({tag})."}]}


def jsonl(bodies: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body}).encode() + b"\n" for i, body in enumerate(bodies))


NO_CACHE = {"x-inferbus-cache": "off"}  # the same requests again must be generated again (batch lines never are)


async def interactive(api: AsyncOpenAI, bodies: list[dict[str, Any]], concurrency: int) -> tuple[float, int]:
    """(requests/s, completion tokens) sending `bodies` with `concurrency` in flight, the response cache off."""
    queue = list(bodies)
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        while queue:
            body = queue.pop()
            answer = await api.chat.completions.create(**body, extra_headers=NO_CACHE)
            tokens += answer.usage.completion_tokens if answer.usage else 0

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return len(bodies) / (time.perf_counter() - t0), tokens


async def output_tokens(api: AsyncOpenAI, batch_id: str) -> int:
    """The completion tokens of a finished batch's output file."""
    batch = await api.batches.retrieve(batch_id)
    assert batch.output_file_id is not None
    content = await api.files.content(batch.output_file_id)
    return sum(json.loads(line)["response"]["body"]["usage"]["completion_tokens"]
               for line in content.text.splitlines() if line.strip())


async def run_batch(api: AsyncOpenAI, bodies: list[dict[str, Any]],
                    started: asyncio.Event | None = None) -> tuple[str, float, float]:
    """(batch id, upload s, submit-to-completed s); `started` is set once its first line is answered."""
    t0 = time.perf_counter()
    uploaded = await api.files.create(file=("bench.jsonl", jsonl(bodies)), purpose="batch")
    upload_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    batch = await api.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                     completion_window="24h")
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        await asyncio.sleep(0.2)
        batch = await api.batches.retrieve(batch.id)
        if started is not None and batch.request_counts and batch.request_counts.completed:
            started.set()
    if batch.status != "completed":
        raise RuntimeError(f"batch {batch.id} ended {batch.status}: {batch.errors}")
    return batch.id, upload_s, time.perf_counter() - t1


async def ttfts(api: AsyncOpenAI, n: int, tag: str, stop: asyncio.Event | None = None) -> list[float]:
    """Time to first token (ms) of `n` streamed requests, one at a time (until `stop`, if given)."""
    out: list[float] = []
    for i in range(n):
        if stop is not None and stop.is_set():
            break
        t0 = time.perf_counter()
        stream = await api.chat.completions.create(**chat(i, DEFAULT, 8, f"ttft-{tag}"), stream=True)
        first = None
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = (time.perf_counter() - t0) * 1000
        if first is not None:
            out.append(first)
    return out


async def exec_ready(nc: bus.Connection, limit_s: float = 30) -> None:
    """Wait until the gateway takes batch lines (it does once it has heard every worker)."""
    deadline = time.monotonic() + limit_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            for svc in await bus.discover(nc, "INFO", "inferbus-gateway", wait=0.3):
                port = (svc.get("metadata") or {}).get("metrics_port")
                async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    if "inferbus_gateway_batch_exec_ready 1.0" in await resp.text():
                        return
    raise TimeoutError("the gateway never took batch lines")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench(cfg: dict[str, int], infra: EmbeddedStack, procs: list[ServiceProcess], report: Report) -> None:
    nc = await bus.connect(infra.nats_url, "bench", identity=infra.identity())
    port = free_port()
    gw = ServiceProcess("gateway", "services.gateway", infra.env(
        INFERBUS_PORT=str(port), INFERBUS_ADMIN_KEY=ADMIN_KEY), infra.root)
    llm = ServiceProcess("llm", "services.llm", infra.env(**settings_env(
        model=DEFAULT, version="q4_1", engine="llamacpp")), infra.root)
    fast = ServiceProcess("fast", "services.llm", infra.env(**settings_env(
        model=FAST, version="v1", engine="benchmark")), infra.root)
    metering = ServiceProcess("metering", "services.metering", infra.env(), infra.root)
    batch = ServiceProcess("batch", "services.batch", infra.env(), infra.root)
    procs += [gw, llm, fast, metering, batch]
    url = f"http://127.0.0.1:{port}"
    await wait_http(url, gw)
    await wait_worker(nc, DEFAULT, llm, limit_s=300)
    await wait_worker(nc, FAST, fast)
    await wait_service(nc, "inferbus-metering", metering)
    await wait_service(nc, "inferbus-batch", batch)
    await exec_ready(nc)
    api = AsyncOpenAI(base_url=url + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=600)
    n = cfg["requests"]

    def bodies(tag: str) -> list[dict[str, Any]]:
        return [chat(i, DEFAULT, TOKENS, tag) for i in range(n)]

    say("warming the model with 8 requests")
    await interactive(api, bodies("warm")[:8], 1)

    # Throughput: the very same requests each time (what they generate is the same work), the cache off.
    same = bodies("throughput")
    # One core's speed drifts by +-20 % over tens of seconds on this kind of machine (measured: the same 80
    # requests at c=8, six times in a row, 2.0 to 3.1 req/s), so the phases alternate: each round sends its
    # requests once per mode, the modes' order rotating from round to round, and each mode's rate is its requests
    # over its seconds summed over all rounds. A round's batch is a batch of its own (its validation, status poll
    # and output file paid each round: the batch side pays them `rounds` times, not once).
    rounds = cfg["rounds"]
    per = [same[r * n // rounds:(r + 1) * n // rounds] for r in range(rounds)]
    modes: list[int | str] = [*CONCURRENCIES, "batch"]
    seconds = dict.fromkeys(modes, 0.0)
    generated = dict.fromkeys(modes, 0)
    for r, part in enumerate(per):  # a Latin square: over len(modes) rounds each mode runs once in each place
        for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
            t0 = time.perf_counter()
            if mode == "batch":
                batch_id, _, took = await run_batch(api, part)
                seconds[mode] += took
                generated[mode] += await output_tokens(api, batch_id)
            else:
                _, tokens = await interactive(api, part, int(mode))
                seconds[mode] += time.perf_counter() - t0
                generated[mode] += tokens
            say(f"round {r + 1}/{rounds}: {mode if mode == 'batch' else f'c={mode}'} {len(part)} requests "
                f"in {time.perf_counter() - t0:.1f} s")
    rates = {mode: n / seconds[mode] for mode in modes}
    best_c = max(CONCURRENCIES, key=lambda c: rates[c])
    report.table("batch", ["measure", "value", "target / note"])
    for c in CONCURRENCIES:
        report.row("batch", f"{DEFAULT}: {n} requests interactively, concurrency {c}", f"{rates[c]:.2f} req/s",
                   f"{seconds[c]:.1f} s; {generated[c]:,} completion tokens")
    ratio = rates["batch"] / rates[best_c]
    report.row("batch", f"{DEFAULT}: the same {n} requests as batches ({rounds} of {n // rounds} lines)",
               f"{rates['batch']:.2f} req/s ({seconds['batch']:.1f} s)",
               f"{ratio:.2f}x the best interactive (c={best_c}); target >= 0.95x; "
               f"{generated['batch']:,} completion tokens")

    m = cfg["ttft"]
    idle = await ttfts(api, m, "idle")
    done, started = asyncio.Event(), asyncio.Event()
    running = asyncio.create_task(run_batch(api, bodies("busy"), started))
    running.add_done_callback(lambda _: done.set())
    await started.wait()  # the batch is under way: lines are running on the worker
    busy = await ttfts(api, m, "busy", done)
    await running
    p50i, p99i, p50b, p99b = pct(idle, 0.5), pct(idle, 0.99), pct(busy, 0.5), pct(busy, 0.99)
    report.row("batch", f"{DEFAULT}: interactive TTFT idle, p50 / p99 ({len(idle)} requests)",
               f"{p50i:.0f} / {p99i:.0f} ms", "")
    report.row("batch", f"{DEFAULT}: interactive TTFT while a batch runs, p50 / p99 ({len(busy)} requests)",
               f"{p50b:.0f} / {p99b:.0f} ms",
               f"{p50b / p50i:.2f}x / {p99b / p99i:.2f}x idle; target <= 1.25x")

    lines = cfg["lines"]
    fast_bodies = [chat(i, FAST, 4, "fast") for i in range(lines)]
    _, upload_s, took = await run_batch(api, fast_bodies)
    report.row("batch", f"benchmark engine: {lines:,} lines, submit to completed", f"{lines / took:,.0f} lines/s",
               f"{took:.1f} s; upload of {len(jsonl(fast_bodies)) / 1e6:.1f} MB took {upload_s:.2f} s")
    report.note(f"TTFT medians: idle {statistics.median(idle):.0f} ms, busy {statistics.median(busy):.0f} ms")
    await nc.close()


def main() -> int:
    args = harness.arguments(__doc__, "smaller counts (a smoke run)", note=True)
    cfg = QUICK if args.quick else FULL
    report = Report({"batch": "Batch jobs"})
    outcome = harness.run("batch", lambda infra, procs: bench(cfg, infra, procs, report), quick=args.quick,
                          machine="this machine")
    if outcome is None:
        return 1
    about = [
        "What: the default model through the Batch API vs the same requests sent interactively, interactive TTFT "
        "while a batch runs, and lines/s on the benchmark engine.",
        *harness.noise([], outcome, args.note),
    ]
    text = harness.markdown("Batch jobs", "bench_batch.py", args.quick, outcome, about, report.markdown("batch"),
                            report.notes)
    if not args.quick:  # a smoke run never replaces the measured figures
        write_section(RESULTS_PATH, "batch", text)
    harness.report("batch", report.markdown("batch"), outcome, RESULTS_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
