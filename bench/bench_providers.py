#!/usr/bin/env python
"""Benchmark InferBus's remote-provider path beside LiteLLM and Portkey, against one mock OpenAI upstream.

    python bench/bench_providers.py [--quick] [--write] [--systems upstream,inferbus,litellm,portkey] [--note TEXT]

One run, one mock upstream (bench/mock_upstream.py: raw asyncio, pre-encoded answers), four systems in front
of it:

  - **upstream**: the mock itself, directly (the floor);
  - **InferBus**: gateway -> NATS -> the `openai` engine in the provider host (`python -m services.llm.providers`)
    -> upstream, on the embedded stack (nats-server, PostgreSQL, Redis) with the registry and metering; the
    model is registered through the registry's admin request with its API key as a secret;
  - **LiteLLM**: the proxy (`litellm[proxy]==1.106.2`, one uvicorn worker, a master key, no database), the model
    configured as an OpenAI-compatible provider at the upstream;
  - **Portkey**: the gateway (`@portkey-ai/gateway@1.15.2` on Node), `x-portkey-provider: openai` and
    `x-portkey-custom-host: <upstream>/v1`.

The peers are installed under bench/.peers/ by bench/peers.sh (once; later runs reuse them). Load:

  - non-streaming (`max_tokens` 16): wrk (one thread, keep-alive, POST body from a Lua script) at c=1, 16, 64:
    p50, p99, req/s;
  - streaming (32 content chunks as SSE): an aiohttp client in its own process at c=16 (streams/s) and c=1;
    time to first content chunk and full stream, p50 and p99.

For each window the CPU time (user+system) of every process of the system under test (process trees, so
PostgreSQL's backends and any worker children count; the mock upstream is shown apart), per request, and after
the load the RSS of those processes. Every system is warmed up first; the windows of a cell run in rounds, the
order of the systems rotated. Then the breaker scenario: `mock-primary` points at a closed port, with a routing
fallback to `mock-gpt`; a few requests open its breaker, then c=1 p50 of `mock-primary` (served by the fallback)
is compared with `mock-gpt`'s, round by round.

Prints "[bench] ..." progress, the tables and PASS/MISS for each target of the issue; with --write, rewrites
section `providers` of bench/RESULTS.md (bench/results.py). Cells of a system that could not start say
"not available: <reason>".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

# ---- the SSE client (its own process: `bench_providers.py --sse-client SPEC`) --------------------------------

FIRST_CONTENT = re.compile(rb'"content": ?"[^"]')  # the first event carrying text (not a role-only one)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _stream_once(http: aiohttp.ClientSession, spec: dict[str, Any], got: dict[str, list[float]]) -> bool:
    t0 = time.perf_counter()
    first = 0.0
    head = b""
    tail = b""
    async with http.post(spec["url"], data=spec["body"].encode(), headers=spec["headers"]) as resp:
        if resp.status != 200:
            await resp.read()
            return False
        async for data in resp.content.iter_any():
            if not first:
                head += data
                if FIRST_CONTENT.search(head):
                    first = time.perf_counter()
            tail = tail[-8:] + data
            if b"data: [DONE]" in tail:
                break
        else:
            return False
        await resp.read()  # the rest (the chunked terminator), so the connection goes back to the pool
    end = time.perf_counter()
    got["ttfc"].append((first or end) - t0)
    got["total"].append(end - t0)
    return True


async def sse_load(spec: dict[str, Any]) -> dict[str, Any]:
    """`concurrency` keep-alive connections streaming for `seconds`; the streams that started in time all count."""
    conc, seconds = spec["concurrency"], spec["seconds"]
    connector = aiohttp.TCPConnector(limit=conc, limit_per_host=conc, keepalive_timeout=60)
    got: dict[str, list[float]] = {"ttfc": [], "total": []}
    errors = 0
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as http:
        if spec.get("handshake"):
            print("SSEREADY", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        cpu0, t0 = time.process_time(), time.perf_counter()
        deadline = t0 + seconds

        async def connection() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                try:
                    if not await _stream_once(http, spec, got):
                        errors += 1
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1
                    await asyncio.sleep(0.01)

        await asyncio.gather(*(connection() for _ in range(conc)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    ttfc, total = got["ttfc"], got["total"]
    return {"streams": len(total), "seconds": wall, "errors": errors, "cpu": cpu,
            "ttfc_p50": _percentile(ttfc, 0.5), "ttfc_p99": _percentile(ttfc, 0.99),
            "p50": _percentile(total, 0.5), "p99": _percentile(total, 0.99)}


def sse_client_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        import uvloop

        result = uvloop.run(sse_load(spec))
    except ImportError:
        result = asyncio.run(sse_load(spec))
    print("SSEJSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__" and "--sse-client" in sys.argv:  # the client needs nothing below: start fast
    sys.exit(sse_client_main(sys.argv[sys.argv.index("--sse-client") + 1]))

import msgspec  # noqa: E402
import psutil  # noqa: E402

from bench import fleet, harness  # noqa: E402
from bench.bench_floor import body, fingerprint, loop_of  # noqa: E402
from bench.bench_spine import machine  # noqa: E402
from bench.harness import LUA, Report, TreeMeter, Wrk, say, wrk, wrk_binary  # noqa: E402
from bench.results import write_section  # noqa: E402
from services.runtime import bus  # noqa: E402
from services.runtime.embedded import free_port  # noqa: E402
from services.runtime.local import EmbeddedStack, ServiceProcess, wait_http, wait_service  # noqa: E402

RESULTS_PATH = ROOT / "bench" / "RESULTS.md"
SELF = str(Path(__file__).resolve())  # the SSE client runs as this script with --sse-client
SECTION = "providers"
PEERS = ROOT / "bench" / ".peers"
PEERS_SH = ROOT / "bench" / "peers.sh"
WRK_INSTALL = "make bench-deps  (or: apt-get install -y wrk)"

UPSTREAM_KEY = "sk-mock"  # the mock demands it: every system must deliver the provider key it was given
ADMIN_KEY = "ib-bench-admin-" + secrets.token_hex(16)
LITELLM_KEY = "sk-litellm-bench-" + secrets.token_hex(8)
MODEL = "mock-gpt"  # the name clients use at InferBus and LiteLLM
PRIMARY = "mock-primary"  # InferBus: a dead upstream with a fallback to MODEL
UPSTREAM_MODEL = "mock"  # the name the upstream (and Portkey, which passes it through) knows
MAX_TOKENS = 16
STREAM_PIECES = 32

SYSTEMS = ("upstream", "inferbus", "litellm", "portkey")
LABELS = {"upstream": "upstream (direct)", "inferbus": "InferBus", "litellm": "LiteLLM", "portkey": "Portkey"}
JSON_CONC = (1, 16, 64)
STREAM_CONC = (16, 1)

# Per cell and system: `rounds` windows of `seconds`; failover: `failover_rounds` pairs of c=1 windows.
FULL = {"seconds": 5, "rounds": 2, "warmup": 3, "failover_seconds": 3, "failover_rounds": 3}
QUICK = {"seconds": 2, "rounds": 1, "warmup": 1, "failover_seconds": 2, "failover_rounds": 2}

# The targets.
TARGET_RPS_X = 2.0  # InferBus req/s >= 2x Portkey's at c=16 and c=64 (non-streaming)
TARGET_STREAMS_X = 3.0  # InferBus streams/s >= 3x Portkey's at c=16
TARGET_C1_SLACK = 0.3e-3  # InferBus c=1 p50 <= Portkey's + 0.3 ms
TARGET_TTFC_ADDED = 1e-3  # time to first chunk added by InferBus over the direct upstream, p50, c=1
TARGET_FAILOVER_ADDED = 1e-3  # c=1 p50 of a model served by its fallback (breaker open) over the fallback's own
BREAKER_OPENERS = 12  # requests sent to the dead-upstream model before measuring (its breaker opens after 3)


# ---- processes that are not platform services ---------------------------------------------------------


class Command(ServiceProcess):
    """A process that is not a platform service (the mock upstream, a peer gateway), its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path, cwd: Path | None = None
                 ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)


def plain_env(**extra: str) -> dict[str, str]:
    """The environment for processes outside the platform: none of its settings, no database URLs."""
    drop = ("INFERBUS_", "DATABASE_URL", "REDIS_", "LITELLM_", "PORTKEY_")
    return {**{k: v for k, v in os.environ.items() if not k.startswith(drop)}, "PYTHONUNBUFFERED": "1", **extra}


async def wait_ready(url: str, proc: ServiceProcess, limit_s: float, ok: tuple[int, ...] = (200,)) -> None:
    deadline = time.monotonic() + limit_s
    async with aiohttp.ClientSession() as http:
        while True:
            proc.check_alive()
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(url, headers={"Authorization": f"Bearer {UPSTREAM_KEY}"}) as resp:
                    await resp.read()
                    if resp.status in ok:
                        return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{proc.name} did not answer {url} within {limit_s:.0f} s:\n{proc.log()[-2000:]}")
            await asyncio.sleep(0.2)


# ---- the systems -------------------------------------------------------------------------------------


class System(NamedTuple):
    name: str
    url: str  # the chat completions URL
    model: str
    headers: dict[str, str]  # Authorization and whatever else the system needs
    pids: dict[str, int]  # process tree roots that are the system (the mock upstream is added apart)
    script: Path  # wrk script, non-streaming


def wrk_script(root: Path, name: str, model: str, headers: dict[str, str]) -> Path:
    """bench_floor's wrk script (its `done` prints the figures as JSON) with this system's model and headers."""
    text = LUA % {"body": body(model, False).decode(), "key": headers["Authorization"].removeprefix("Bearer ")}
    text += "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers.items() if k != "Authorization")
    path = root / f"wrk-{name}.lua"
    path.write_text(text)
    return path


async def start_upstream(root: Path, procs: list[ServiceProcess]) -> tuple[str, int]:
    port = free_port()
    mock = Command("mock-upstream", [sys.executable, str(ROOT / "bench" / "mock_upstream.py"), "--port", str(port),
                                     "--api-key", UPSTREAM_KEY], plain_env(), root)
    procs.append(mock)
    base = f"http://127.0.0.1:{port}"
    await wait_ready(base + "/v1/models", mock, 30)
    return base, mock.pid


def install_peer(peer: str) -> tuple[str | None, str]:
    """Run bench/peers.sh for one peer; (None or why it failed, how long it took / that it was cached)."""
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(PEERS_SH), peer], capture_output=True, text=True)
    took = time.perf_counter() - t0
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if not ln.startswith("WARNING: Location")]
    for line in lines:
        if line.startswith("[peers]"):
            say(line.removeprefix("[peers] "))
    if proc.returncode != 0:
        return f"bench/peers.sh {peer} failed (exit {proc.returncode}): " + " / ".join(lines[-3:]), f"{took:.0f} s"
    cached = any("already" in ln for ln in lines)
    return None, "cached" if cached else f"installed in {took:.0f} s"


def start_litellm(root: Path, upstream: str) -> tuple[Command, str]:
    port = free_port()
    config = root / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{UPSTREAM_MODEL}\n"
        f"      api_base: {upstream}/v1\n"
        f"      api_key: {UPSTREAM_KEY}\n"
        "general_settings:\n"
        f"  master_key: {LITELLM_KEY}\n"
    )
    argv = [str(PEERS / "litellm" / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1",
            "--port", str(port), "--num_workers", "1"]
    # The cost map ships in the wheel; without this LiteLLM first tries to fetch a newer one.
    env = plain_env(LITELLM_LOCAL_MODEL_COST_MAP="True")
    return Command("litellm", argv, env, root), f"http://127.0.0.1:{port}"


def start_portkey(root: Path) -> tuple[Command, str]:
    port = free_port()
    server = PEERS / "portkey" / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
    argv = [shutil.which("node") or "node", str(server), f"--port={port}", "--headless"]
    return Command("portkey", argv, plain_env(NODE_ENV="production"), root, cwd=PEERS / "portkey"), \
        f"http://127.0.0.1:{port}"


def inferbus_missing() -> str | None:
    """What InferBus's remote-provider path still lacks in this checkout, if anything."""
    if importlib.util.find_spec("services.llm.providers") is None:
        return "services/llm/providers.py (the provider host) does not exist yet"
    if importlib.util.find_spec("services.llm.engines.openai") is None:
        return "services/llm/engines/openai.py (the `openai` engine) does not exist yet"
    from contracts.registry import RegisterVersion

    if "secrets" not in RegisterVersion.__struct_fields__:
        return "contracts.registry.RegisterVersion has no `secrets` field yet"
    return None


def failover_missing() -> str | None:
    import contracts.registry as reg

    if not hasattr(reg, "SetRouting"):
        return "contracts.registry has no SetRouting admin request yet"
    return None


class InferBus(NamedTuple):
    base: str
    pids: dict[str, int]
    gateway: ServiceProcess
    providers: ServiceProcess
    failover: str | None  # None: mock-primary is set up; else why not


async def start_inferbus(infra: EmbeddedStack, procs: list[ServiceProcess], upstream: str) -> InferBus:
    """Registry, metering, gateway and the provider host on the stack's secure bus, `mock-gpt` registered as an
    `openai` version at the upstream (and `mock-primary` at a dead port, falling back to it), ready to serve."""
    nc = await bus.connect(infra.nats_url, "bench", identity=infra.identity())
    try:
        say("InferBus: starting the registry")
        registry = await fleet.start_registry(infra, nc, procs)
        say(f"InferBus: registering {MODEL} v1 (engine openai, base_url {upstream}/v1, secret api_key)")
        await fleet.admin(nc, "register", model=MODEL, kind="llm", version="v1", engine="openai",
                          params={"base_url": f"{upstream}/v1", "model": UPSTREAM_MODEL},
                          secrets={"api_key": UPSTREAM_KEY})
        await fleet.admin(nc, "deploy", model=MODEL, version="v1")
        failover = failover_missing()
        if failover is None:
            dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: connection refused
            say(f"InferBus: registering {PRIMARY} v1 at a dead upstream ({dead}), fallback to {MODEL}")
            try:
                await fleet.admin(nc, "register", model=PRIMARY, kind="llm", version="v1", engine="openai",
                                  params={"base_url": dead, "model": UPSTREAM_MODEL}, secrets={"api_key": UPSTREAM_KEY})
                await fleet.admin(nc, "deploy", model=PRIMARY, version="v1")
                await fleet.admin(nc, "routing", model=PRIMARY, fallbacks=[MODEL])
            except fleet.AdminFailed as exc:
                failover = f"setting up {PRIMARY} failed: {exc}"
        say("InferBus: starting metering, the gateway and the provider host")
        metering = ServiceProcess("metering", "services.metering", infra.env(), infra.root)
        procs.append(metering)
        gateway, base = fleet.start_gateway(infra, "gateway", procs, ADMIN_KEY)
        providers = ServiceProcess("providers", "services.llm.providers", infra.env(), infra.root)
        procs.append(providers)
        await wait_http(base, gateway)
        await wait_service(nc, "inferbus-metering", metering)
    finally:
        await nc.close()
    async with aiohttp.ClientSession() as http:
        await until_serving(http, base, MODEL, providers, 90)
        if failover is None:
            try:
                await until_serving(http, base, PRIMARY, providers, 30)
            except (TimeoutError, RuntimeError) as exc:
                failover = f"{PRIMARY} never answered through its fallback: {str(exc)[:300]}"
    assert infra.redis.proc is not None and infra.postgres.proc is not None
    pids = {"gateway": gateway.pid, "providers": providers.pid, "registry": registry.pid, "metering": metering.pid,
            "nats": infra.nats_pid, "redis": infra.redis.proc.pid, "postgres": infra.postgres.proc.pid}
    say(f"InferBus: gateway {base}; pids " + ", ".join(f"{k} {v}" for k, v in pids.items()))
    return InferBus(base, pids, gateway, providers, failover)


async def until_serving(http: aiohttp.ClientSession, base: str, model: str, proc: ServiceProcess, limit_s: float
                        ) -> None:
    """Until one request for `model` through the gateway at `base` answers 200."""
    deadline = time.monotonic() + limit_s
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
    last = ""
    while True:
        proc.check_alive()
        with contextlib.suppress(aiohttp.ClientError):
            async with http.post(base + "/v1/chat/completions", data=body(model, False), headers=headers) as resp:
                text = await resp.text()
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}: {text[:300]}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"{model} not served within {limit_s:.0f} s (last answer {last}); provider host log:\n"
                               f"{proc.log()[-2000:]}")
        await asyncio.sleep(0.3)


async def check(http: aiohttp.ClientSession, system: System, stream: bool) -> str:
    """One request as the load sends it; what came back, or an error if it is not a whole answer."""
    headers = {**system.headers, "Content-Type": "application/json"}
    async with http.post(system.url, data=body(system.model, stream), headers=headers) as resp:
        raw = await resp.read()
    if resp.status != 200:
        raise RuntimeError(f"{system.name} ({'stream' if stream else 'json'}): HTTP {resp.status}: {raw[:300]!r}")
    if not stream:
        data = msgspec.json.decode(raw)
        text = data["choices"][0]["message"]["content"]
        return f"{len(raw)} B, {text.count('tok')} tokens, usage {data.get('usage', {}).get('completion_tokens')}"
    chunks = tokens = 0
    done = False
    usage = None
    for line in raw.split(b"\n"):
        if not line.startswith(b"data: "):
            continue
        if line[6:].strip() == b"[DONE]":
            done = True
            continue
        event = msgspec.json.decode(line[6:])
        usage = (event.get("usage") or {}).get("completion_tokens", usage)
        for choice in event.get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if content:
                chunks += 1
                tokens += content.count("tok")
    if not done:
        raise RuntimeError(f"{system.name} (stream): the stream did not end with [DONE]: {raw[-300:]!r}")
    return f"{len(raw)} B, {chunks} content chunks, {tokens} tokens, usage {usage}"


# ---- the measurement --------------------------------------------------------------------------------


class Window(NamedTuple):
    requests: int
    seconds: float
    p50: float  # seconds: full response (wrk) / full stream (SSE client)
    p99: float
    ttfc_p50: float  # SSE only
    ttfc_p99: float
    errors: int
    cpu: dict[str, float]  # CPU seconds by process tree, the upstream's included
    client_cpu: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


async def wrk_window(system: System, meter_pids: dict[str, int], conc: int, seconds: int) -> Window:
    meter = TreeMeter(meter_pids)
    meter.start()
    run: Wrk = await wrk(system.url, system.script, conc, seconds)
    meter.stop(run.cpu)
    return Window(run.requests, run.seconds, run.p50, run.p99, 0.0, 0.0, run.errors, meter.used, run.cpu)


async def sse_window(system: System, meter_pids: dict[str, int] | None, conc: int, seconds: float) -> Window:
    """The SSE client in its own process; the meter runs from its go to its result (imports excluded)."""
    spec = {"url": system.url, "headers": {**system.headers, "Content-Type": "application/json"},
            "body": body(system.model, True).decode(), "concurrency": conc, "seconds": seconds, "handshake": True}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, SELF, "--sse-client", json.dumps(spec),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdin is not None and proc.stdout is not None
    out: list[str] = []

    async def line() -> str:
        raw = await proc.stdout.readline()  # type: ignore[union-attr]
        if not raw:
            await proc.wait()
            raise RuntimeError(f"SSE client exited with {proc.returncode}:\n" + "".join(out)[-2000:])
        text = raw.decode(errors="replace")
        out.append(text)
        return text.strip()

    while await line() != "SSEREADY":
        pass
    meter = TreeMeter(meter_pids) if meter_pids is not None else None  # None: a warm-up, nothing to count
    if meter is not None:
        meter.start()
    proc.stdin.write(b"GO\n")
    await proc.stdin.drain()
    while not (text := await line()).startswith("SSEJSON "):
        pass
    r = json.loads(text.removeprefix("SSEJSON "))
    if meter is not None:
        meter.stop(r["cpu"])
    await proc.wait()
    return Window(r["streams"], r["seconds"], r["p50"], r["p99"], r["ttfc_p50"], r["ttfc_p99"], r["errors"],
                  meter.used if meter is not None else {}, r["cpu"])


class Cell(NamedTuple):
    p50: float  # median of the rounds'
    p99: float
    ttfc_p50: float
    ttfc_p99: float
    rate: float  # requests (streams) over all rounds / their seconds
    cpu_ms: float  # the system's own CPU per request (the upstream's excluded)
    per_process: dict[str, float]  # ms per request, the upstream's included (key "upstream")
    client_cores: float
    other: float
    errors: int
    requests: int
    p50s: list[float]
    ttfc_p50s: list[float]


def cell(windows: list[Window], others: list[float]) -> Cell:
    requests = sum(w.requests for w in windows)
    seconds = sum(w.seconds for w in windows)
    per = {n: 1000 * sum(w.cpu[n] for w in windows) / max(requests, 1) for n in windows[0].cpu}
    return Cell(
        p50=statistics.median(w.p50 for w in windows), p99=statistics.median(w.p99 for w in windows),
        ttfc_p50=statistics.median(w.ttfc_p50 for w in windows),
        ttfc_p99=statistics.median(w.ttfc_p99 for w in windows),
        rate=requests / seconds if seconds else 0.0,
        cpu_ms=sum(v for n, v in per.items() if n != "upstream"), per_process=per,
        client_cores=sum(w.client_cpu for w in windows) / seconds if seconds else 0.0,
        other=statistics.mean(others) if others else 0.0,
        errors=sum(w.errors for w in windows), requests=requests,
        p50s=[w.p50 for w in windows], ttfc_p50s=[w.ttfc_p50 for w in windows],
    )


def na(reason: str) -> str:
    """A table cell for what could not be measured (one line, no column breaks)."""
    return "not available: " + " ".join(reason.split()).replace("|", "/")[:240]


def ms(s: float, digits: int = 2) -> str:
    return f"{s * 1000:.{digits}f} ms"


TITLES = {
    "targets": "Against the issue's targets",
    "json": "Non-streaming (max_tokens 16), wrk: p50 / p99 / req/s",
    "stream": "Streaming (32 chunks), SSE client: streams/s; time to first chunk p50 / p99; full stream p50 / p99",
    "cpu": "CPU per request by process (ms)",
    "memory": "Memory after the load",
    "failover": "Failover with the breaker open (InferBus, c=1, non-streaming)",
}


class Run:
    """The systems that started, why the others did not, and the cells measured."""

    def __init__(self, cfg: dict[str, Any], rep: Report) -> None:
        self.cfg = cfg
        self.rep = rep
        self.systems: dict[str, System] = {}
        self.missing: dict[str, str] = {}  # system -> why it is not available
        self.upstream_pid = 0
        self.cells: dict[tuple[str, str, int], Cell] = {}
        self.rss: dict[str, tuple[float, int]] = {}  # system -> (MiB, processes)
        self.failover: dict[str, Any] = {}

    def meter_pids(self, name: str) -> dict[str, int]:
        pids = dict(self.systems[name].pids)
        if name != "upstream":
            pids["upstream"] = self.upstream_pid
        return pids

    def order(self, r: int) -> list[str]:
        names = [s for s in SYSTEMS if s in self.systems]
        k = r % max(len(names), 1)
        order = names[k:] + names[:k]
        return order[::-1] if r % 2 else order

    async def warm_up(self) -> None:
        for name in self.order(0):
            s = self.systems[name]
            say(f"warm-up {LABELS[name]}: {self.cfg['warmup']} s non-streaming at c=16, then streaming")
            await wrk(s.url, s.script, 16, self.cfg["warmup"])
            await sse_window(s, None, 16, self.cfg["warmup"])

    async def measure(self) -> None:
        cfg = self.cfg
        for mode, concs in (("json", JSON_CONC), ("stream", STREAM_CONC)):
            for conc in concs:
                say(f"{'non-streaming' if mode == 'json' else 'streaming'}, c={conc}: {cfg['rounds']} round(s) of "
                    f"{cfg['seconds']} s per system, order rotating")
                got: dict[str, list[Window]] = {s: [] for s in self.systems}
                others: dict[str, list[float]] = {s: [] for s in self.systems}
                for r in range(cfg["rounds"]):
                    for name in self.order(r):
                        s = self.systems[name]
                        n0 = len(TreeMeter.others)
                        if mode == "json":
                            w = await wrk_window(s, self.meter_pids(name), conc, cfg["seconds"])
                        else:
                            w = await sse_window(s, self.meter_pids(name), conc, cfg["seconds"])
                        got[name].append(w)
                        others[name] += TreeMeter.others[n0:]
                        own = sum(v for k, v in w.cpu.items() if k != "upstream")
                        ttfc = f"  first chunk {ms(w.ttfc_p50)}" if mode == "stream" else ""
                        say(f"    round {r + 1} {name:9s} p50 {ms(w.p50)}  p99 {ms(w.p99)}{ttfc}  {w.rate:,.0f}/s  "
                            f"CPU {1000 * own / max(w.requests, 1):.3f} ms/req  errors {w.errors}  "
                            f"other {TreeMeter.others[-1]:.2f} cores")
                for name in self.systems:
                    self.cells[(name, mode, conc)] = cell(got[name], others[name])
                self._rows(mode, conc)
        for name in self.systems:
            self.rss[name] = rss(self.systems[name].pids)

    def _rows(self, mode: str, conc: int) -> None:
        cells = []
        for name in SYSTEMS:
            c = self.cells.get((name, mode, conc))
            if c is None:
                cells.append(na(self.missing[name]) if name in self.missing else "—")
            elif mode == "json":
                errors = f" ({c.errors} errors)" if c.errors else ""
                cells.append(f"{ms(c.p50)} / {ms(c.p99)} / {c.rate:,.0f}{errors}")
            else:
                cells.append(f"{c.rate:,.0f}/s; {ms(c.ttfc_p50)} / {ms(c.ttfc_p99)}; {ms(c.p50)} / {ms(c.p99)}"
                             + (f" ({c.errors} errors)" if c.errors else ""))
        self.rep.row(mode, str(conc), *cells)
        for name in SYSTEMS:
            c = self.cells.get((name, mode, conc))
            if c is None:
                continue
            self.rep.row("cpu", "non-streaming" if mode == "json" else "streaming", str(conc), LABELS[name],
                         ", ".join(f"{n} {v:.3f}" for n, v in c.per_process.items() if n != "upstream"),
                         f"{c.cpu_ms:.3f}", f"{c.per_process['upstream']:.3f}" if "upstream" in c.per_process
                         else "(the system)", f"{c.client_cores:.2f}",
                         f"{c.other:.2f}")


def rss(pids: dict[str, int]) -> tuple[float, int]:
    """Resident memory (MiB) and number of the processes in the trees of `pids`."""
    total, count = 0, 0
    for pid in pids.values():
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
                    count += 1
    return total / 2**20, count


# ---- failover with the breaker open ------------------------------------------------------------------------


async def breaker_state(nats_url: str, identity: bus.Identity) -> str:
    """The breaker bucket's entries, shortened; 'unknown' when it cannot be read."""
    from contracts import subjects

    bucket = getattr(subjects, "BREAKER_BUCKET", "")
    if not bucket:
        return "unknown (no breaker bucket in contracts.subjects)"
    nc = await bus.connect(nats_url, "bench-breakers", identity=identity)
    try:
        kv = await nc.jetstream().key_value(bucket)
        entries = []
        for key in await kv.keys():
            entry = await kv.get(key)
            value = (entry.value or b"").decode(errors="replace")
            entries.append(f"{key}={value[:160]}")
        return "; ".join(entries) or "(no entries)"
    except Exception as exc:  # no bucket yet, no keys, no permission: say so, measure anyway
        return f"unknown ({type(exc).__name__}: {str(exc)[:120]})"
    finally:
        await nc.close()


async def failover(run: Run, infra: EmbeddedStack, ib: InferBus, root: Path) -> None:
    reason = ib.failover
    if reason is None:
        try:
            await measure_failover(run, infra, ib, root)
            return
        except Exception as exc:
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            say(f"failover: {reason}")
    run.failover = {"missing": reason}
    run.rep.row("failover", na(reason), "—", "—", "—")


async def measure_failover(run: Run, infra: EmbeddedStack, ib: InferBus, root: Path) -> None:
    rep, cfg = run.rep, run.cfg
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    url = ib.base + "/v1/chat/completions"
    primary = System(PRIMARY, url, PRIMARY, headers, ib.pids, wrk_script(root, "primary", PRIMARY, headers))
    direct = run.systems["inferbus"]
    say(f"failover: {BREAKER_OPENERS} sequential requests to {PRIMARY} (dead upstream) to open its breaker")
    took = []
    async with aiohttp.ClientSession() as http:
        for _ in range(BREAKER_OPENERS):
            t0 = time.perf_counter()
            async with http.post(url, data=body(PRIMARY, False), headers={**headers, "Content-Type":
                                                                           "application/json"}) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{PRIMARY}: HTTP {resp.status} while opening its breaker")
            took.append(time.perf_counter() - t0)
    state = await breaker_state(infra.nats_url, infra.identity())
    say(f"failover: latencies while opening {', '.join(f'{t * 1000:.1f}' for t in took)} ms; breakers: {state}")
    p: dict[str, list[float]] = {PRIMARY: [], MODEL: []}
    for r in range(cfg["failover_rounds"]):
        for s in ([primary, direct] if r % 2 == 0 else [direct, primary]):
            w = await wrk_window(s, ib.pids, 1, cfg["failover_seconds"])
            p[s.model].append(w.p50)
            say(f"    round {r + 1} {s.model:12s} p50 {ms(w.p50)}  p99 {ms(w.p99)}  {w.rate:,.0f}/s  errors {w.errors}")
    paired = [a - b for a, b in zip(p[PRIMARY], p[MODEL], strict=True)]
    added = statistics.median(paired)
    after = await breaker_state(infra.nats_url, infra.identity())
    run.failover = {"added": added, "paired": paired, "primary": statistics.median(p[PRIMARY]),
                    "direct": statistics.median(p[MODEL]), "opening": took, "state": state, "after": after}
    rep.row("failover", f"{ms(statistics.median(p[PRIMARY]), 3)}", f"{ms(statistics.median(p[MODEL]), 3)}",
            f"{added * 1000:+.3f} ms (rounds: {', '.join(f'{d * 1000:+.3f}' for d in paired)})",
            f"{took[0] * 1000:.1f} ms first, {statistics.median(took[-3:]) * 1000:.1f} ms last 3")


# ---- targets ---------------------------------------------------------------------------------------------


def verdicts(run: Run) -> list[str]:
    """The targets' rows; also returns the one-line PASS/MISS summary of each."""
    rep, cells = run.rep, run.cells
    rep.table("targets", ["Target", "This run", "Goal", "Result"])
    summary = []

    def row(what: str, value: str, goal: str, met: bool | None) -> None:
        verdict = "n/a" if met is None else ("PASS" if met else "MISS")
        rep.row("targets", what, value, goal, verdict if met is not False else f"**{verdict}**")
        summary.append(f"{verdict}: {what}: {value} (goal {goal})")

    def need(*names: str) -> str | None:
        gone = [n for n in names if n not in run.systems]
        return "; ".join(f"{LABELS[n]} " + na(run.missing.get(n, "?")) for n in gone) or None

    for conc in (16, 64):
        why = need("inferbus", "portkey")
        if why:
            row(f"req/s at c={conc}, non-streaming: InferBus / Portkey", why, f">= {TARGET_RPS_X:g}x", None)
            continue
        i, p = cells[("inferbus", "json", conc)], cells[("portkey", "json", conc)]
        row(f"req/s at c={conc}, non-streaming: InferBus / Portkey",
            f"{i.rate / p.rate:.2f}x ({i.rate:,.0f} vs {p.rate:,.0f})", f">= {TARGET_RPS_X:g}x",
            i.rate >= TARGET_RPS_X * p.rate)
    why = need("inferbus", "portkey")
    if why:
        row("streams/s at c=16: InferBus / Portkey", why, f">= {TARGET_STREAMS_X:g}x", None)
        row("c=1 p50, non-streaming: InferBus vs Portkey", why, f"<= Portkey + {TARGET_C1_SLACK * 1000:g} ms", None)
    else:
        i, p = cells[("inferbus", "stream", 16)], cells[("portkey", "stream", 16)]
        row("streams/s at c=16: InferBus / Portkey", f"{i.rate / max(p.rate, 1e-9):.2f}x ({i.rate:,.0f} vs "
            f"{p.rate:,.0f})", f">= {TARGET_STREAMS_X:g}x", i.rate >= TARGET_STREAMS_X * p.rate)
        i, p = cells[("inferbus", "json", 1)], cells[("portkey", "json", 1)]
        row("c=1 p50, non-streaming: InferBus vs Portkey", f"{ms(i.p50, 3)} vs {ms(p.p50, 3)} "
            f"({(i.p50 - p.p50) * 1000:+.3f} ms)", f"<= Portkey + {TARGET_C1_SLACK * 1000:g} ms",
            i.p50 <= p.p50 + TARGET_C1_SLACK)
    why = need("inferbus", "upstream")
    if why:
        row("time to first chunk added by InferBus, c=1, p50", why, f"<= {TARGET_TTFC_ADDED * 1000:g} ms", None)
    else:
        i, u = cells[("inferbus", "stream", 1)], cells[("upstream", "stream", 1)]
        paired = [a - b for a, b in zip(i.ttfc_p50s, u.ttfc_p50s, strict=True)]
        added = statistics.median(paired)
        row("time to first chunk added by InferBus, c=1, p50", f"{added * 1000:+.3f} ms ({ms(i.ttfc_p50, 3)} vs "
            f"{ms(u.ttfc_p50, 3)} direct; rounds {', '.join(f'{d * 1000:+.3f}' for d in paired)})",
            f"<= {TARGET_TTFC_ADDED * 1000:g} ms", added <= TARGET_TTFC_ADDED)
    f = run.failover
    if "added" in f:
        row(f"failover with the breaker open: c=1 p50 added ({PRIMARY} via fallback vs {MODEL})",
            f"{f['added'] * 1000:+.3f} ms ({ms(f['primary'], 3)} vs {ms(f['direct'], 3)})",
            f"<= {TARGET_FAILOVER_ADDED * 1000:g} ms", f["added"] <= TARGET_FAILOVER_ADDED)
    else:
        why = need("inferbus") or na(f.get("missing", "not measured"))
        row(f"failover with the breaker open: c=1 p50 added ({PRIMARY} via fallback vs {MODEL})", why,
            f"<= {TARGET_FAILOVER_ADDED * 1000:g} ms", None)
    return summary


# ---- the run -------------------------------------------------------------------------------------------


async def bench(run: Run, wanted: list[str], infra: EmbeddedStack, procs: list[ServiceProcess], about: list[str]
                ) -> None:
    wrk_binary()
    rep, root = run.rep, infra.root
    run.missing.update({s: "not selected (--systems)" for s in SYSTEMS if s not in wanted})
    code = fingerprint()
    say(f"code under test: {code}")
    peers: list[Command] = []
    installs: dict[str, str] = {}
    ib: InferBus | None = None
    try:
        upstream, run.upstream_pid = await start_upstream(root, procs)
        say(f"mock upstream {upstream} (pid {run.upstream_pid}, {loop_of(run.upstream_pid)})")
        if "upstream" in wanted:
            h = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
            run.systems["upstream"] = System("upstream", upstream + "/v1/chat/completions", UPSTREAM_MODEL, h,
                                             {"mock": run.upstream_pid}, wrk_script(root, "upstream",
                                                                                        UPSTREAM_MODEL, h))
        starting: dict[str, tuple[Command, str]] = {}
        for peer in ("litellm", "portkey"):
            if peer not in wanted:
                continue
            failed, installs[peer] = install_peer(peer)
            if failed:
                run.missing[peer] = failed
                continue
            proc, base = start_litellm(root, upstream) if peer == "litellm" else start_portkey(root)
            peers.append(proc)
            starting[peer] = (proc, base)
        if "inferbus" in wanted:
            missing = inferbus_missing()
            if missing:
                run.missing["inferbus"] = missing
            else:
                n0 = len(procs)
                try:
                    ib = await start_inferbus(infra, procs, upstream)
                except Exception as exc:
                    say(f"InferBus did not start: {exc!r}")
                    run.missing["inferbus"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    for proc in procs[n0:]:  # nothing of it may load the machine while the others are measured
                        say(f"--- {proc.name} log tail ---\n{proc.log()[-1500:]}")
                        proc.stop()
                else:
                    h = {"Authorization": f"Bearer {ADMIN_KEY}"}
                    run.systems["inferbus"] = System("inferbus", ib.base + "/v1/chat/completions", MODEL, h, ib.pids,
                                                     wrk_script(root, "inferbus", MODEL, h))
        for peer, (proc, base) in starting.items():
            try:
                if peer == "litellm":
                    await wait_ready(base + "/health/liveliness", proc, 120)
                    h = {"Authorization": f"Bearer {LITELLM_KEY}"}
                    run.systems[peer] = System(peer, base + "/v1/chat/completions", MODEL, h, {"litellm": proc.pid},
                                               wrk_script(root, peer, MODEL, h))
                else:
                    await wait_ready(base + "/", proc, 60, ok=(200, 404))
                    h = {"Authorization": f"Bearer {UPSTREAM_KEY}", "x-portkey-provider": "openai",
                         "x-portkey-custom-host": upstream + "/v1"}
                    run.systems[peer] = System(peer, base + "/v1/chat/completions", UPSTREAM_MODEL, h,
                                               {"portkey": proc.pid}, wrk_script(root, peer, UPSTREAM_MODEL, h))
                say(f"{LABELS[peer]} ready at {base} (pid {proc.pid})")
            except Exception as exc:
                run.missing[peer] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                say(f"{LABELS[peer]} did not start: {exc}")
        shapes = []
        async with aiohttp.ClientSession() as http:
            for name in list(run.systems):
                try:
                    for stream in (False, True):
                        shapes.append(f"{LABELS[name]} {'stream' if stream else 'json'}: "
                                      f"{await check(http, run.systems[name], stream)}")
                except Exception as exc:
                    run.missing[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    del run.systems[name]
                    say(f"{LABELS[name]} answers wrong, left out: {exc}")
        say("responses checked: " + "; ".join(shapes))
        if not run.systems:
            raise RuntimeError("no system is available: " + "; ".join(f"{k}: {v}" for k, v in run.missing.items()))
        rep.table("json", ["c", *[LABELS[s] for s in SYSTEMS]])
        rep.table("stream", ["c", *[LABELS[s] for s in SYSTEMS]])
        rep.table("cpu", ["Mode", "c", "System", "Per process (ms/request)", "System total (ms/request)",
                          "mock upstream (ms/request)", "client (cores)", "other load (cores)"])
        rep.table("failover", [f"{PRIMARY} p50 (fallback, breaker open)", f"{MODEL} p50", "added (median of rounds)",
                               "while the breaker opened"])
        await run.warm_up()
        await run.measure()
        if "inferbus" in run.systems and ib is not None:
            await failover(run, infra, ib, root)
        else:
            run.failover = {"missing": run.missing.get("inferbus", "not run")}
            rep.row("failover", na(f"InferBus: {run.failover['missing']}"), "—", "—", "—")
        rep.table("memory", ["System", "RSS after the load (MiB)", "processes"])
        for name in SYSTEMS:
            if name in run.rss:
                mib, n = run.rss[name]
                rep.row("memory", LABELS[name], f"{mib:,.0f}", str(n))
            elif name in run.missing:
                rep.row("memory", LABELS[name], na(run.missing[name]), "—")
        for line in verdicts(run):
            say(line)
        loops = {"mock upstream": loop_of(run.upstream_pid)}
        if ib is not None:
            loops |= {"gateway": loop_of(ib.gateway.pid), "provider host": loop_of(ib.providers.pid)}
        about += [
            f"Code under test: {code}.",
            "Peers: " + ", ".join(f"{LABELS[k]} {v}" for k, v in installs.items()) + " (bench/peers.sh, under "
            "bench/.peers/)." if installs else "Peers: not run.",
            "Event loops: " + ", ".join(f"{k} {v}" for k, v in loops.items()) + ".",
            "Responses (one request each, checked before the load): " + "; ".join(shapes) + ".",
        ]
        if "state" in run.failover:
            rep.note(f"Failover: the breaker bucket's entries after the {BREAKER_OPENERS} requests that opened "
                     f"{PRIMARY}'s breaker: {run.failover['state']}; after the measurement: {run.failover['after']}. "
                     "The breaker lets a probe through after each cooldown (which doubles when the probe fails), "
                     "so a few measured requests try the dead upstream first.")
    finally:
        for p in peers:
            with contextlib.suppress(Exception):
                p.stop()
        if sys.exc_info()[0] is not None:
            for p in peers:
                with contextlib.suppress(OSError):
                    say(f"--- {p.name} log tail ---\n{p.log()[-2000:]}")


def write_results(run: Run, quick: bool, outcome: harness.Outcome, note: str, about: list[str]) -> None:
    cfg = run.cfg
    head = [
        "Systems: **upstream** = bench/mock_upstream.py directly (raw asyncio, HTTP/1.1 keep-alive, pre-encoded "
        "answers; it requires the provider API key, so every system proves it delivers it); **InferBus** = gateway "
        "-> NATS -> provider host (`openai` engine) -> upstream, with the registry and metering on the embedded "
        "secure stack, admin key, defaults; **LiteLLM** = `litellm[proxy]==1.106.2`, one uvicorn worker, master "
        "key, no database; **Portkey** = `@portkey-ai/gateway@1.15.2` (Node "
        f"{node_version()}, `@hono/node-server` 1.13.5), `x-portkey-provider: openai`, custom host.",
        f"Load: non-streaming with wrk (one thread, keep-alive), streaming with an aiohttp SSE client in its own "
        f"process; per cell and system {cfg['rounds']} round(s) of {cfg['seconds']} s, the order of the systems "
        "rotated (and reversed) between rounds; p50/p99: median over rounds; rates: requests over all rounds / "
        "their seconds. Time to first chunk: until the first SSE event with content arrives. CPU per request: "
        "user+system CPU of every process of the system (process trees) during its windows / the requests "
        "completed; the mock upstream's is shown apart. The load generators run **on the same 2 cores**.",
        *about,
        *harness.noise(TreeMeter.others, outcome, note),
    ]
    tables = "\n".join(run.rep.section(k) for k in ("targets", "json", "stream", "cpu", "memory", "failover"))
    text = harness.markdown("Providers: InferBus vs LiteLLM vs Portkey, one mock OpenAI upstream",
                            "bench_providers.py", quick, outcome, head, tables, run.rep.notes)
    text = text.replace("bench_providers.py" + (" --quick`" if quick else "`"),
                        "bench_providers.py" + (" --quick" if quick else "") + " --write`", 1)
    write_section(RESULTS_PATH, SECTION, text)


def node_version() -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(["node", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    return "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round per cell (a smoke run, ~2 min)")
    parser.add_argument("--write", action="store_true", help=f"rewrite section `{SECTION}` of bench/RESULTS.md")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ", ".join(SYSTEMS))
    parser.add_argument("--seconds", type=int, help="seconds per window (default 5, --quick 2)")
    parser.add_argument("--rounds", type=int, help="windows per cell and system (default 2, --quick 1)")
    parser.add_argument("--note", default="", help="free text for the section's header (e.g. what else ran)")
    args = parser.parse_args()
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    if unknown := set(wanted) - set(SYSTEMS):
        parser.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    if shutil.which("wrk") is None:
        print(f"[bench] wrk is not installed; this benchmark drives the HTTP load with it. Install: {WRK_INSTALL}",
              file=sys.stderr)
        return 2
    cfg = dict(QUICK if args.quick else FULL)
    cfg.update({k: v for k, v in (("seconds", args.seconds), ("rounds", args.rounds)) if v})
    rep = Report(TITLES)
    run = Run(cfg, rep)
    about: list[str] = []
    outcome = harness.run("providers", lambda infra, procs: bench(run, wanted, infra, procs, about),
                          quick=args.quick, machine=machine())
    if outcome is None:
        return 1
    print()
    print(rep.titled())
    for finding in outcome.findings:
        say(f"service log: {finding}")
    if args.write:
        write_results(run, args.quick, outcome, args.note, about)
        say(f"wrote section {SECTION} of {RESULTS_PATH.name}")
    say(f"done in {outcome.elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
