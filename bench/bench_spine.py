#!/usr/bin/env python
"""Benchmark the InferBus spine: HTTP gateway -> NATS -> LLM worker, side by side with direct NATS.

    python bench/bench_spine.py [--quick]

Starts its own embedded nats-server, PostgreSQL and Redis on free loopback ports, a gateway process
and LLM worker processes (`python -m services.gateway` / `python -m services.llm`, configured through
INFERBUS_* variables), then measures:

  1. latency of a 1-token non-streaming generation, directly over NATS (StreamClient) and through
     the gateway (HTTP keep-alive pool), interleaved in rounds, at concurrency 1 and 64;
  2. max non-streaming req/s through one gateway (1 and 2 client processes, concurrency 64 in all);
  3. time to first token added by the gateway for streaming (first Delta vs first SSE content chunk);
  4. streamed tokens/s (max_tokens=20000) through the gateway's SSE, worker coalescing 0 and 2 ms;
  5. the default model (llama.cpp, SmolLM2-135M Q4_1) tokens/s with 1 and 8 streams, and worker RSS.

Prints "[bench] ..." progress lines and a table, and writes section `spine` of bench/RESULTS.md (other
benchmarks keep their own sections there, see bench/results.py). Every process it starts
is stopped at the end, on error too. The load generator shares the machine's cores with the system
under test, so the figures are a floor for what the services would do on their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import secrets
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import msgspec  # noqa: E402
import psutil  # noqa: E402

from bench import harness  # noqa: E402
from bench.harness import log_findings, say  # noqa: E402, F401  (re-exported for the other benchmarks)
from bench.results import write_section  # noqa: E402
from contracts import subjects  # noqa: E402
from contracts.llm import Delta, Final, GenerateRequest, Message  # noqa: E402
from services.runtime import bus  # noqa: E402
from services.runtime.embedded import free_port  # noqa: E402
from services.runtime.local import (  # noqa: E402
    EmbeddedStack,
    ServiceProcess,
    settings_env,
    wait_http,
    wait_worker,
)
from services.runtime.streaming import StreamClient  # noqa: E402

ADMIN_KEY = "ib-bench-admin-" + secrets.token_hex(16)
FAST_MODEL = "bench-fast"  # benchmark engine, unlimited rate, no coalescing
COALESCE_MODEL = "bench-coalesce2"  # benchmark engine, unlimited rate, INFERBUS_COALESCE_MS=2
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_VERSION = "q4_1"
SHORT_PROMPT = "hi"
STORY_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
RESULTS_PATH = ROOT / "bench" / "RESULTS.md"

FULL = {
    "lat_c1": 500,
    "lat_c1_rounds": 5,
    "lat_c64": 3000,
    "lat_c64_rounds": 3,
    "tp_seconds": 8.0,
    "ttft": 300,
    "ttft_rounds": 3,
    "long_tokens": 20000,
    "long_reps": 3,
    "long_concurrent": 4,
    "llm_single_reps": 3,
    "llm_concurrent": 8,
    "llm_single_cap": 45.0,
    "llm_concurrent_cap": 75.0,
}
QUICK = {
    "lat_c1": 150,
    "lat_c1_rounds": 3,
    "lat_c64": 640,
    "lat_c64_rounds": 2,
    "tp_seconds": 3.0,
    "ttft": 90,
    "ttft_rounds": 3,
    "long_tokens": 20000,
    "long_reps": 1,
    "long_concurrent": 4,
    "llm_single_reps": 1,
    "llm_concurrent": 8,
    "llm_single_cap": 15.0,
    "llm_concurrent_cap": 20.0,
}


# ---- processes ------------------------------------------------------------------------------


def start_worker(
    infra: EmbeddedStack, name: str, settings: dict[str, Any], procs: list[ServiceProcess]
) -> ServiceProcess:
    proc = ServiceProcess(name, "services.llm", infra.env(**settings_env(**settings)), infra.root)
    procs.append(proc)
    return proc


def start_gateway(infra: EmbeddedStack, procs: list[ServiceProcess]) -> tuple[ServiceProcess, str]:
    port = free_port()
    models = [
        {"name": DEFAULT_MODEL, "version": DEFAULT_VERSION},
        {"name": FAST_MODEL, "version": "v1"},
        {"name": COALESCE_MODEL, "version": "v1"},
    ]
    env = infra.env(INFERBUS_PORT=str(port), INFERBUS_ADMIN_KEY=ADMIN_KEY, INFERBUS_MODELS=json.dumps(models))
    proc = ServiceProcess("gateway", "services.gateway", env, infra.root)
    procs.append(proc)
    return proc, f"http://127.0.0.1:{port}"


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, MiB."""
    values = {"VmRSS": 0.0, "VmHWM": 0.0}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in values:
                values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


class CpuMeter:
    """CPU seconds used by given processes, and by everything else on the machine, over a window."""

    others: list[float] = []  # cores used outside the bench, one entry per measured window

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))

    def _ours(self) -> dict[str, float]:
        out = {}
        for name, p in self.procs.items():
            with contextlib.suppress(psutil.Error):
                c = p.cpu_times()
                out[name] = c.user + c.system
        return out

    def __enter__(self) -> CpuMeter:
        self.t0, self.busy0, self.ours0 = time.perf_counter(), self._busy(), self._ours()
        self.extra_cpu = 0.0  # client processes report their own CPU time
        return self

    def __exit__(self, *_: object) -> None:
        self.wall = time.perf_counter() - self.t0
        busy = self._busy() - self.busy0
        ours1 = self._ours()
        self.used = {n: ours1.get(n, 0.0) - self.ours0.get(n, 0.0) for n in self.ours0}
        self.other = max(0.0, busy - sum(self.used.values()) - self.extra_cpu)
        self.busy = busy
        if self.wall > 0:
            CpuMeter.others.append(self.other / self.wall)

    def cores(self, name: str) -> float:
        return self.used.get(name, 0.0) / self.wall if self.wall else 0.0

    def summary(self) -> str:
        parts = [f"{n} {self.cores(n):.2f}" for n in self.used]
        if self.extra_cpu:
            parts.append(f"clients {self.extra_cpu / self.wall:.2f}")
        parts.append(f"OTHER (not bench) {self.other / self.wall:.2f}")
        return "cores busy: " + ", ".join(parts)


# ---- one request, each way -----------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def gen_request(model: str, max_tokens: int, prompt: str = SHORT_PROMPT, temperature: float = 1.0) -> GenerateRequest:
    return GenerateRequest(
        request_id="bench-" + secrets.token_hex(8),
        model=model,
        max_tokens=max_tokens,
        messages=[Message("user", prompt)],
        temperature=temperature,
    )


class Direct:
    """The caller side the gateway itself uses, driven straight at the worker subject."""

    def __init__(self, client: StreamClient, model: str, version: str = "v1") -> None:
        self.client = client
        self.model = model
        self.subject = subjects.infer("llm", model, version)

    async def once(self, max_tokens: int = 1) -> float:
        t0 = time.perf_counter()
        final = None
        async for chunk in self.client.stream(
            self.subject, gen_request(self.model, max_tokens), deadline=time.time() + 60
        ):
            if isinstance(chunk, Final):
                final = chunk
        if final is None:
            raise RuntimeError("no Final chunk")
        return time.perf_counter() - t0

    async def stream(self, max_tokens: int) -> dict[str, float]:
        """(ttft, wall, tokens) of one streamed generation."""
        t0 = time.perf_counter()
        first = None
        tokens = 0
        async for chunk in self.client.stream(
            self.subject, gen_request(self.model, max_tokens), deadline=time.time() + 120
        ):
            if isinstance(chunk, Delta) and chunk.text and first is None:
                first = time.perf_counter() - t0
            if isinstance(chunk, Final):
                tokens = chunk.usage.completion_tokens
        return {"ttft": first or float("nan"), "wall": time.perf_counter() - t0, "tokens": tokens}


class Http:
    """OpenAI-style requests to the gateway over one keep-alive connection pool."""

    def __init__(self, session: aiohttp.ClientSession, base: str, key: str) -> None:
        self.session = session
        self.url = base + "/v1/chat/completions"
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def body(
        self,
        model: str,
        max_tokens: int,
        *,
        stream: bool = False,
        prompt: str = SHORT_PROMPT,
        temperature: float | None = None,
    ) -> bytes:
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": prompt}],
        }
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        if temperature is not None:
            body["temperature"] = temperature
        return msgspec.json.encode(body)

    async def once(self, body: bytes) -> float:
        t0 = time.perf_counter()
        async with self.session.post(self.url, data=body, headers=self.headers) as resp:
            data = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
        return time.perf_counter() - t0

    async def stream(
        self, body: bytes, count_text: str | None = None, progress: dict[str, int] | None = None
    ) -> dict[str, float]:
        """(ttft to first content chunk, wall to [DONE], completion tokens from usage, tokens counted in text).

        `progress["chunks"]` counts content chunks as they arrive, for a run cut short by a time cap.
        """
        t0 = time.perf_counter()
        first = None
        usage = None
        counted = 0
        done = False
        async with self.session.post(self.url, data=body, headers=self.headers) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {(await resp.read())[:200]!r}")
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:].strip()
                if payload == b"[DONE]":
                    done = True
                    continue
                event = msgspec.json.decode(payload)
                if "error" in event:
                    raise RuntimeError(f"stream error: {event['error']}")
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or ():
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        if first is None:
                            first = time.perf_counter() - t0
                        if progress is not None:
                            progress["chunks"] = progress.get("chunks", 0) + 1
                        if count_text:
                            counted += content.count(count_text)
        wall = time.perf_counter() - t0
        if not done or usage is None:
            raise RuntimeError(f"stream ended without usage/[DONE] (done={done}, usage={usage})")
        return {"ttft": first or float("nan"), "wall": wall, "tokens": usage["completion_tokens"], "counted": counted}


async def run_load(fn: Callable[[], Awaitable[float]], n: int, concurrency: int) -> tuple[list[float], float, int]:
    """n calls of fn with `concurrency` in flight; (latencies, wall seconds, errors)."""
    latencies: list[float] = []
    errors = [0]
    todo = iter(range(n))

    async def lane() -> None:
        for _ in todo:
            try:
                latencies.append(await fn())
            except Exception as exc:
                errors[0] += 1
                if errors[0] <= 3:
                    say(f"  request failed: {exc!r}")

    t0 = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return latencies, time.perf_counter() - t0, errors[0]


async def side_by_side(
    ways: dict[str, Callable[[], Awaitable[float]]], n: int, concurrency: int, rounds: int
) -> dict[str, dict[str, Any]]:
    """Run each way n times, interleaved in `rounds` blocks (alternating which goes first) so drift hits both."""
    out: dict[str, dict[str, Any]] = {k: {"lat": [], "wall": 0.0, "errors": 0} for k in ways}
    names = list(ways)
    per = max(1, n // rounds)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            lat, wall, errors = await run_load(ways[name], per, concurrency)
            out[name]["lat"] += lat
            out[name]["wall"] += wall
            out[name]["errors"] += errors
    for v in out.values():
        v["p50"], v["p99"] = pct(v["lat"], 0.50), pct(v["lat"], 0.99)
        v["rps"] = len(v["lat"]) / v["wall"] if v["wall"] else 0.0
    return out


# ---- throughput from client processes ------------------------------------------------------


def _tp_child(
    kind: str, target: str, key: str, model: str, concurrency: int, seconds: float, ready: Any, go: Any, results: Any
) -> None:
    try:
        results.put(asyncio.run(_tp_child_main(kind, target, key, model, concurrency, seconds, ready, go)))
    except BaseException as exc:  # report instead of hanging the parent
        ready.put(("error", repr(exc)))
        results.put({"error": traceback.format_exc()})


async def _tp_child_main(
    kind: str, target: str, key: str, model: str, concurrency: int, seconds: float, ready: Any, go: Any
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    cleanup: list[Callable[[], Awaitable[Any]]] = []
    if kind == "gateway":
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency + 8))
        cleanup.append(session.close)
        http = Http(session, target, key)
        body = http.body(model, 1)

        def fn() -> Awaitable[float]:
            return http.once(body)
    else:
        nc = await bus.connect(target, "bench-client")
        cleanup.append(nc.close)
        client = StreamClient(nc)
        await client.start()
        direct = Direct(client, model)
        fn = direct.once
    try:
        await run_load(fn, concurrency * 8, concurrency)  # warm up connections and caches
        ready.put(("ready", os.getpid()))
        await loop.run_in_executor(None, go.wait)
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        end = t0 + seconds
        count = [0]
        errors = [0]
        lat: list[float] = []

        async def lane() -> None:
            while time.perf_counter() < end:
                try:
                    d = await fn()
                except Exception:
                    errors[0] += 1
                    continue
                if time.perf_counter() <= end:
                    count[0] += 1
                    lat.append(d)

        await asyncio.gather(*(lane() for _ in range(concurrency)))
        return {
            "count": count[0],
            "errors": errors[0],
            "seconds": seconds,
            "cpu": time.process_time() - cpu0,
            "p50": pct(lat, 0.5),
            "p99": pct(lat, 0.99),
        }
    finally:
        for close in cleanup:
            await close()


async def throughput(
    kind: str, target: str, model: str, clients: int, concurrency: int, seconds: float, pids: dict[str, int]
) -> dict[str, Any]:
    """Sum of requests completed in a `seconds` window by `clients` processes, `concurrency` in flight in all."""
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    per = concurrency // clients
    children = [
        ctx.Process(
            target=_tp_child, args=(kind, target, ADMIN_KEY, model, per, seconds, ready, go, results), daemon=True
        )
        for _ in range(clients)
    ]
    loop = asyncio.get_running_loop()
    try:
        for c in children:
            c.start()
        for _ in children:
            state, info = await loop.run_in_executor(None, ready.get, True, 90)
            if state != "ready":
                raise RuntimeError(f"client process failed: {info}")
        meter = CpuMeter(pids)
        with meter:
            go.set()
            got = [await loop.run_in_executor(None, results.get, True, seconds + 90) for _ in children]
            meter.extra_cpu = sum(g.get("cpu", 0.0) for g in got)
        for g in got:
            if "error" in g:
                raise RuntimeError(f"client process failed:\n{g['error']}")
        for c in children:
            c.join(10)
        total = sum(g["count"] for g in got)
        return {
            "rps": total / seconds,
            "count": total,
            "errors": sum(g["errors"] for g in got),
            "p50": max(g["p50"] for g in got),
            "p99": max(g["p99"] for g in got),
            "cpu": meter.summary(),
            "meter": meter,
        }
    finally:
        for c in children:
            if c.is_alive():
                c.terminate()
                c.join(5)


async def llm_runs(http: Http, body: bytes, streams: int, reps: int, cap: float) -> dict[str, Any]:
    """`reps` rounds of `streams` concurrent SSE streams, all within `cap` seconds.

    A round still running at the cap is cancelled; its unfinished streams count the content chunks they
    got (about one token each), and the result is marked as cut.
    """
    tokens = 0
    wall = 0.0
    ttft: list[float] = []
    runs = 0
    cut = ""
    deadline = time.perf_counter() + cap
    for _ in range(reps):
        left = deadline - time.perf_counter()
        if left <= 0:
            break
        progress: list[dict[str, int]] = [{} for _ in range(streams)]
        tasks = [asyncio.create_task(http.stream(body, progress=progress[i])) for i in range(streams)]
        t0 = time.perf_counter()
        done, pending = await asyncio.wait(tasks, timeout=left)
        wall += time.perf_counter() - t0
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        runs += 1
        for i, t in enumerate(tasks):
            if t in done:
                r = t.result()
                tokens += int(r["tokens"])
                ttft.append(r["ttft"])
            else:
                tokens += progress[i].get("chunks", 0)
        if pending:
            cut = f" (cut at the {cap:.0f} s cap: {len(done)}/{streams} streams finished)"
            break
    return {
        "tokens": tokens,
        "wall": wall,
        "rate": tokens / wall if wall else 0.0,
        "ttft": ttft,
        "runs": runs,
        "cut": cut,
    }


# ---- the benchmark -------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


class Results:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str, str]] = []
        self.notes: list[str] = []

    def add(self, section: str, metric: str, value: str, target: str = "—", met: bool | None = None) -> None:
        verdict = "—" if met is None else ("yes" if met else "**no**")
        self.rows.append((section, metric, value, target, verdict))
        say(f"  {metric}: {value}" + (f"  (target {target}: {verdict})" if met is not None else ""))

    def note(self, text: str) -> None:
        self.notes.append(text)
        say(f"  note: {text}")

    def table(self) -> str:
        head = "| # | Measurement | Result | Target | Met? |\n|---|---|---|---|---|\n"
        return head + "".join(f"| {a} | {b} | {c} | {d} | {e} |\n" for a, b, c, d, e in self.rows)


async def bench(cfg: dict[str, Any], infra: EmbeddedStack, procs: list[ServiceProcess], res: Results) -> None:
    say("starting gateway and benchmark workers")
    gateway, base = start_gateway(infra, procs)
    fast = start_worker(
        infra,
        "llm-bench-fast",
        {"model": FAST_MODEL, "version": "v1", "engine": "benchmark", "coalesce_ms": "0"},
        procs,
    )
    coal = start_worker(
        infra,
        "llm-bench-coalesce2",
        {"model": COALESCE_MODEL, "version": "v1", "engine": "benchmark", "coalesce_ms": "2"},
        procs,
    )
    nc = await bus.connect(infra.nats_url, "bench", identity=infra.identity())
    client = StreamClient(nc)
    await client.start()
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=128))
    try:
        await wait_http(base, gateway)
        await wait_worker(nc, FAST_MODEL, fast)
        await wait_worker(nc, COALESCE_MODEL, coal)
        say(f"gateway {base} (pid {gateway.pid}), workers pids {fast.pid}, {coal.pid}, nats pid {infra.nats_pid}")
        pids = {"gateway": gateway.pid, "worker": fast.pid, "nats": infra.nats_pid, "bench": os.getpid()}
        http = Http(session, base, ADMIN_KEY)
        direct = Direct(client, FAST_MODEL)
        body1 = http.body(FAST_MODEL, 1)
        ways: dict[str, Callable[[], Awaitable[float]]] = {"direct": direct.once, "gateway": lambda: http.once(body1)}

        say("warm-up")
        await side_by_side(ways, 400, 16, 2)

        # 1. latency, concurrency 1 and 64
        for conc, n, rounds in ((1, cfg["lat_c1"], cfg["lat_c1_rounds"]), (64, cfg["lat_c64"], cfg["lat_c64_rounds"])):
            say(f"1. latency max_tokens=1, concurrency {conc}: {n} requests each way, {rounds} interleaved rounds")
            meter = CpuMeter(pids)
            with meter:
                r = await side_by_side(ways, n, conc, rounds)
            d, g = r["direct"], r["gateway"]
            res.add("1", f"c={conc} direct NATS p50 / p99", f"{ms(d['p50'])} / {ms(d['p99'])}")
            res.add("1", f"c={conc} gateway HTTP p50 / p99", f"{ms(g['p50'])} / {ms(g['p99'])}")
            added50, added99 = g["p50"] - d["p50"], g["p99"] - d["p99"]
            if conc == 1:
                res.add(
                    "1",
                    "c=1 added by gateway p50 / p99",
                    f"{ms(added50)} / {ms(added99)}",
                    "added p50 <= 1 ms",
                    added50 <= 0.001,
                )
            else:
                res.add("1", f"c={conc} added by gateway p50 / p99", f"{ms(added50)} / {ms(added99)}")
            errs = d["errors"] + g["errors"]
            res.note(f"latency c={conc}: {len(d['lat'])}+{len(g['lat'])} requests, {errs} errors; {meter.summary()}")

        # 2. max req/s through one gateway
        secs = cfg["tp_seconds"]
        tp_pids = {k: v for k, v in pids.items() if k != "bench"}
        tp: dict[str, dict[str, Any]] = {}
        for label, kind, target, clients in (
            ("gateway, 1 client process x64", "gateway", base, 1),
            ("gateway, 2 client processes x32", "gateway", base, 2),
            ("direct NATS (worker ceiling), 1 client process x64", "direct", infra.nats_url, 1),
        ):
            say(f"2. throughput {label}, {secs:.0f} s window")
            tp[label] = t = await throughput(kind, target, FAST_MODEL, clients, 64, secs, tp_pids)
            res.note(
                f"throughput {label}: {t['count']} requests, {t['errors']} errors, client-side p50 "
                f"{ms(t['p50'])} p99 {ms(t['p99'])}; {t['cpu']}"
            )
        best = max(tp["gateway, 1 client process x64"]["rps"], tp["gateway, 2 client processes x32"]["rps"])
        for label, t in tp.items():
            errors = f" ({t['errors']} errors)" if t["errors"] else ""
            res.add("2", f"req/s, {label}", f"{t['rps']:,.0f}{errors}")
        res.add(
            "2", "max req/s through one gateway (c=64, max_tokens=1)", f"{best:,.0f}", ">= 3000 req/s", best >= 3000
        )

        # 3. TTFT added by the gateway, streaming
        say(f"3. time to first token, streaming max_tokens=16, concurrency 1: {cfg['ttft']} each way")
        body16 = http.body(FAST_MODEL, 16, stream=True)
        ttft: dict[str, list[float]] = {"direct": [], "gateway": []}

        async def ttft_direct() -> float:
            r = await direct.stream(16)
            ttft["direct"].append(r["ttft"])
            return r["wall"]

        async def ttft_gateway() -> float:
            r = await http.stream(body16)
            ttft["gateway"].append(r["ttft"])
            return r["wall"]

        ttft_ways: dict[str, Callable[[], Awaitable[float]]] = {"direct": ttft_direct, "gateway": ttft_gateway}
        await side_by_side(ttft_ways, 60, 1, 2)  # warm-up
        ttft["direct"].clear()
        ttft["gateway"].clear()
        meter = CpuMeter(pids)
        with meter:
            r = await side_by_side(ttft_ways, cfg["ttft"], 1, cfg["ttft_rounds"])
        d50, g50 = pct(ttft["direct"], 0.5), pct(ttft["gateway"], 0.5)
        res.add("3", "TTFT direct (first Delta) p50 / p99", f"{ms(d50)} / {ms(pct(ttft['direct'], 0.99))}")
        res.add(
            "3", "TTFT gateway (first SSE content chunk) p50 / p99", f"{ms(g50)} / {ms(pct(ttft['gateway'], 0.99))}"
        )
        res.add("3", "TTFT added by gateway p50", ms(g50 - d50))
        res.note(f"TTFT: {r['direct']['errors'] + r['gateway']['errors']} errors; {meter.summary()}")

        # 4. streamed tokens/s, coalescing 0 and 2 ms
        n_tok = cfg["long_tokens"]
        for model, label, proc in ((FAST_MODEL, "coalesce 0 ms", fast), (COALESCE_MODEL, "coalesce 2 ms", coal)):
            say(f"4. streamed tokens/s, max_tokens={n_tok}, {label}")
            cpids = {"gateway": gateway.pid, "worker": proc.pid, "nats": infra.nats_pid, "bench": os.getpid()}
            body = http.body(model, n_tok, stream=True)
            sdirect = Direct(client, model)
            await http.stream(http.body(model, 2000, stream=True))  # warm-up
            singles = []
            dsingles = []
            meter = CpuMeter(cpids)
            with meter:
                for _ in range(cfg["long_reps"]):
                    dsingles.append(await sdirect.stream(n_tok))
                    singles.append(await http.stream(body, count_text="tok"))
            for s in singles:
                if s["tokens"] != n_tok or s["counted"] != n_tok:
                    res.note(f"{label}: token count mismatch: usage {s['tokens']}, text {s['counted']}, asked {n_tok}")
            rate1 = sum(s["tokens"] for s in singles) / sum(s["wall"] for s in singles)
            drate = sum(s["tokens"] for s in dsingles) / sum(s["wall"] for s in dsingles)
            k = cfg["long_concurrent"]
            t0 = time.perf_counter()
            many = await asyncio.gather(*(http.stream(body, count_text="tok") for _ in range(k)))
            wall = time.perf_counter() - t0
            ratek = sum(s["tokens"] for s in many) / wall
            res.add("4", f"{label}: direct NATS, 1 stream (reference)", f"{drate:,.0f} tok/s")
            res.add("4", f"{label}: gateway SSE, 1 stream", f"{rate1:,.0f} tok/s", ">= 50,000 tok/s", rate1 >= 50_000)
            res.add(
                "4",
                f"{label}: gateway SSE, {k} concurrent streams (aggregate)",
                f"{ratek:,.0f} tok/s",
                ">= 50,000 tok/s",
                ratek >= 50_000,
            )
            res.note(
                f"{label}: single-stream runs {[round(s['tokens'] / s['wall']) for s in singles]} tok/s "
                f"(gateway), {[round(s['tokens'] / s['wall']) for s in dsingles]} tok/s (direct); "
                f"single-stream phase {meter.summary()}"
            )
        coal.stop()

        # 5. default model: llama.cpp + SmolLM2-135M Q4_1, worker defaults
        say("5. starting the default-model worker (engine llamacpp, smollm2-135m-instruct q4_1, defaults)")
        t0 = time.perf_counter()
        llm = start_worker(infra, "llm-default", {}, procs)
        await wait_worker(nc, DEFAULT_MODEL, llm, limit_s=180)
        load_s = time.perf_counter() - t0
        rss_load, _ = rss_mib(llm.pid)
        say(f"default worker ready in {load_s:.1f} s, pid {llm.pid}, RSS {rss_load:.0f} MiB")
        lpids = {"gateway": gateway.pid, "worker": llm.pid, "nats": infra.nats_pid, "bench": os.getpid()}
        lbody = http.body(DEFAULT_MODEL, 128, stream=True, prompt=STORY_PROMPT, temperature=0.7)
        await http.stream(http.body(DEFAULT_MODEL, 8, stream=True, prompt=STORY_PROMPT, temperature=0.7))
        say(
            f"5. 1 stream x{cfg['llm_single_reps']}, max_tokens=128, temperature 0.7 "
            f"(cap {cfg['llm_single_cap']:.0f} s)"
        )
        meter1 = CpuMeter(lpids)
        with meter1:
            single = await llm_runs(http, lbody, 1, cfg["llm_single_reps"], cfg["llm_single_cap"])
        k = cfg["llm_concurrent"]
        say(f"5. {k} concurrent streams, max_tokens=128, temperature 0.7 (cap {cfg['llm_concurrent_cap']:.0f} s)")
        meterk = CpuMeter(lpids)
        with meterk:
            multi = await llm_runs(http, lbody, k, 1, cfg["llm_concurrent_cap"])
        rss_after, hwm = rss_mib(llm.pid)
        rate1, ratek = single["rate"], multi["rate"]
        res.add(
            "5",
            "default model, 1 stream, tokens/s (completion tokens / wall)",
            f"{rate1:,.1f} tok/s{single['cut']}",
            ">= 100 tok/s",
            rate1 >= 100,
        )
        res.add("5", f"default model, {k} concurrent streams, aggregate tokens/s", f"{ratek:,.1f} tok/s{multi['cut']}")
        res.add("5", "default model, 1 stream TTFT p50", ms(pct(single["ttft"], 0.5)))
        res.add(
            "5",
            "default-model worker RSS after load / after runs (peak VmHWM)",
            f"{rss_load:.0f} MiB / {rss_after:.0f} MiB ({hwm:.0f} MiB)",
        )
        res.note(
            f"default model (n_threads defaults to os.cpu_count() = {os.cpu_count()}): load {load_s:.1f} s; "
            f"1 stream: {single['tokens']} tokens in {single['wall']:.2f} s over {single['runs']} run(s); "
            f"{k} streams: {multi['tokens']} tokens in {multi['wall']:.2f} s (engine capacity 1, so they queue); "
            f"1-stream phase {meter1.summary()}; {k}-stream phase {meterk.summary()}"
        )
        llm.stop()

        # Reference only: same model with n_threads=1, to show how llama.cpp's thread count fares on a shared box.
        say("5. reference: default model with engine_options n_threads=1, 1 stream")
        llm1 = start_worker(infra, "llm-default-1thread", {"engine_options": {"n_threads": 1}}, procs)
        await wait_worker(nc, DEFAULT_MODEL, llm1, limit_s=180)
        await http.stream(http.body(DEFAULT_MODEL, 8, stream=True, prompt=STORY_PROMPT, temperature=0.7))
        lpids["worker"] = llm1.pid
        meter = CpuMeter(lpids)
        with meter:
            one = await llm_runs(http, lbody, 1, cfg["llm_single_reps"], cfg["llm_single_cap"])
        res.add("5", "reference: default model with n_threads=1, 1 stream", f"{one['rate']:,.1f} tok/s{one['cut']}")
        res.note(f"n_threads=1 reference: {one['tokens']} tokens in {one['wall']:.2f} s; {meter.summary()}")
        llm1.stop()
        gw_rss, gw_hwm = rss_mib(gateway.pid)
        res.note(f"gateway RSS at the end {gw_rss:.0f} MiB (peak {gw_hwm:.0f} MiB)")
    finally:
        await session.close()
        await nc.close()


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = psutil.virtual_memory().total / 2**30
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def write_results(res: Results, quick: bool, outcome: harness.Outcome, note: str) -> str:
    others = CpuMeter.others or [0.0]
    other_mean, other_max = sum(others) / len(others), max(others)
    load = outcome.load
    about = [
        "Load generator: Python asyncio clients (aiohttp keep-alive pool for HTTP, the gateway's own "
        "`StreamClient` for direct NATS) running **on the same 2 cores** as nats-server, the gateway and the "
        "worker; every figure is therefore a floor for what the services would do on their own.",
        f"Noise: processes outside the bench used {other_mean:.2f} cores on average (max {other_max:.2f}) of "
        f"the 2 during the measured windows (load average {load[0]} at start, {load[1]} at the end); the "
        "`OTHER (not bench)` figures in the notes give it per measurement."
        + (" Figures taken with other load present are noisy." if other_max > 0.2 else ""),
        *([f"Note: {note}"] if note else []),
        "Direct and gateway latencies are measured interleaved in rounds, in one run, so drift hits both.",
    ]
    text = harness.markdown(
        "InferBus spine benchmark", "bench_spine.py", quick, outcome, about, res.table(), res.notes
    )
    write_section(RESULTS_PATH, "spine", text)
    return text


def main() -> int:
    args = harness.arguments(__doc__, "smaller counts (~1.5 minutes)", note=True)
    cfg = QUICK if args.quick else FULL
    res = Results()
    outcome = harness.run(
        "spine", lambda infra, procs: bench(cfg, infra, procs, res), quick=args.quick, machine=machine()
    )
    if outcome is None:
        return 1
    write_results(res, args.quick, outcome, args.note)
    harness.report("spine", res.table(), outcome, RESULTS_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
