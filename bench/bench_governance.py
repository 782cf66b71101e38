#!/usr/bin/env python
"""Benchmark what tenancy governance costs per request: auth + rate limits + budget, on vs off.

    python bench/bench_governance.py [--quick]

Starts its own embedded nats-server, PostgreSQL and Redis on free loopback ports, one benchmark-engine
LLM worker and two gateways: one with governance on (the default), one with INFERBUS_GOVERNANCE=false.
Then measures, interleaved in rounds so drift hits every way alike:

  1. 1-token non-streaming completions at concurrency 1 through
     - the governance-off gateway,
     - the governance-on gateway with a key that has no limits (auth only: no Redis round trip),
     - the governance-on gateway with a key limited in requests/min and tokens/min (the common case),
     - the governance-on gateway with a key under every kind of limit: requests/min, tokens/min and
       concurrency on the key, the key on this model and its tenant, plus a daily token budget on the
       key and on the tenant (nothing is ever refused: the limits are high) - one admit and one
       settle script per request;
  2. the same four at concurrency 32 (req/s);
  3. the admit + settle scripts alone, from this process (Redis round trips, no HTTP).

Prints "[bench] ..." progress and a table, and writes section `governance` of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import msgspec  # noqa: E402

from bench import harness  # noqa: E402
from bench.bench_spine import machine, pct, run_load, say, side_by_side  # noqa: E402
from bench.results import write_section  # noqa: E402
from contracts import subjects  # noqa: E402
from contracts.control import Reply  # noqa: E402
from contracts.llm import GenerateRequest  # noqa: E402
from contracts.tenancy import Budget, Limits  # noqa: E402
from services.gateway.auth import KeyRecord  # noqa: E402
from services.gateway.governance import Governor  # noqa: E402
from services.runtime import bus  # noqa: E402
from services.runtime.embedded import free_port  # noqa: E402
from services.runtime.local import EmbeddedStack, ServiceProcess, settings_env, wait_http, wait_worker  # noqa: E402

MODEL = "bench-fast"
ADMIN_KEY = "ib-bench-admin-" + secrets.token_hex(16)
RESULTS_PATH = ROOT / "bench" / "RESULTS.md"
HIGH = 10_000_000
FULL = {"c1": 3000, "c1_rounds": 6, "c32": 6000, "c32_rounds": 3, "script": 5000}
QUICK = {"c1": 600, "c1_rounds": 3, "c32": 1500, "c32_rounds": 2, "script": 1000}


async def admin(nc: bus.Connection, op: str, **body: Any) -> Any:
    msg = await nc.request(subjects.admin(op), msgspec.json.encode(body), timeout=10)
    reply = msgspec.json.decode(msg.data, type=Reply)
    if reply.error is not None:
        raise RuntimeError(f"{op}: {reply.error}")
    return reply.result


def gateway(infra: EmbeddedStack, procs: list[ServiceProcess], name: str, **settings: Any) -> str:
    port = free_port()
    env = infra.env(**settings_env(port=str(port), admin_key=ADMIN_KEY,
                                   models=[{"name": MODEL, "version": "v1"}], **settings))
    procs.append(ServiceProcess(name, "services.gateway", env, infra.root))
    return f"http://127.0.0.1:{port}"


async def bench(cfg: dict[str, int], infra: EmbeddedStack, procs: list[ServiceProcess], rows: list[list[str]]) -> None:
    worker = ServiceProcess("llm", "services.llm", infra.env(**settings_env(model=MODEL, version="v1",
                                                                             engine="benchmark")), infra.root)
    procs.append(worker)
    on_url = gateway(infra, procs, "gateway-on")
    off_url = gateway(infra, procs, "gateway-off", governance=False)
    nc = await bus.connect(infra.nats_url, "bench", identity=infra.identity())
    try:
        await wait_worker(nc, MODEL, worker)
        for url, proc in ((on_url, procs[-2]), (off_url, procs[-1])):
            await wait_http(url, proc)
        say("services ready; creating a tenant and keys")
        tenant = await admin(nc, "tenants.create", name="bench-tenant",
                             limits={"rpm": HIGH, "tpm": HIGH, "concurrency": 10_000},
                             budget={"tokens_per_day": HIGH * 100})
        limited = (await admin(nc, "keys.create", name="limited", tenant=tenant["id"],
                               limits={"rpm": HIGH, "tpm": HIGH, "concurrency": 10_000},
                               model_limits={MODEL: {"rpm": HIGH}},
                               budget={"tokens_per_day": HIGH * 100}))["key"]
        plain = (await admin(nc, "keys.create", name="plain"))["key"]
        typical = (await admin(nc, "keys.create", name="typical", limits={"rpm": HIGH, "tpm": HIGH}))["key"]
        body = msgspec.json.encode({"model": MODEL, "prompt": "hi", "max_tokens": 1})

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:

            def way(url: str, key: str) -> Any:
                headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

                async def once() -> float:
                    t0 = time.perf_counter()
                    async with http.post(url + "/v1/completions", data=body, headers=headers) as resp:
                        data = await resp.read()
                        if resp.status != 200:
                            raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
                    return time.perf_counter() - t0

                return once

            ways = {
                "governance off": way(off_url, limited),
                "governance on, key without limits (auth only)": way(on_url, plain),
                "governance on, key with requests/min + tokens/min": way(on_url, typical),
                "governance on, key with every limit + budgets": way(on_url, limited),
            }
            say("warming up")
            for fn in ways.values():
                await run_load(fn, 200, 8)
            say(f"concurrency 1: {cfg['c1']} requests per way in {cfg['c1_rounds']} interleaved rounds")
            c1 = await side_by_side(ways, cfg["c1"], 1, cfg["c1_rounds"])
            say(f"concurrency 32: {cfg['c32']} requests per way in {cfg['c32_rounds']} interleaved rounds")
            c32 = await side_by_side(ways, cfg["c32"], 32, cfg["c32_rounds"])

        base = pct(c1["governance off"]["lat"], 0.5)
        for name, data in c1.items():
            p50, p99 = pct(data["lat"], 0.5), pct(data["lat"], 0.99)
            added = "—" if name == "governance off" else f"{(p50 - base) * 1000:+.3f} ms"
            met = "—" if name == "governance off" else ("yes" if (p50 - base) * 1000 <= 0.3 else "no")
            rows.append([f"c=1 p50 / p99: {name}", f"{p50 * 1000:.3f} / {p99 * 1000:.3f} ms", added,
                         "added p50 <= 0.3 ms" if name != "governance off" else "—", met])
        for name, data in c32.items():
            rate = len(data["lat"]) / data["wall"] if data["wall"] else float("nan")
            rows.append([f"c=32 req/s: {name}", f"{rate:,.0f}", f"p50 {pct(data['lat'], 0.5) * 1000:.2f} ms",
                         "—", "—"])

        say(f"admit + settle scripts alone: {cfg['script']} pairs")
        gov = Governor(infra.redis_url)
        key = KeyRecord(id="key_bench", name="bench", scopes=["inference"], tenant_id="bench",
                        limits=Limits(rpm=HIGH, tpm=HIGH, concurrency=10_000),
                        model_limits={MODEL: Limits(rpm=HIGH)},
                        budget=Budget(tokens_per_day=HIGH * 100),
                        tenant_limits=Limits(rpm=HIGH, tpm=HIGH, concurrency=10_000),
                        tenant_budget=Budget(tokens_per_day=HIGH * 100))
        admits, settles = [], []
        try:
            for i in range(cfg["script"]):
                request = GenerateRequest(request_id=f"b{i}", model=MODEL, max_tokens=1, prompt="hi")
                t0 = time.perf_counter()
                grant = await gov.admit(key, "/v1/completions", request)
                t1 = time.perf_counter()
                await gov.settle(grant, 1, 1, MODEL)
                admits.append(t1 - t0)
                settles.append(time.perf_counter() - t1)
        finally:
            await gov.close()
        rows.append([f"admit script ({len(grant.rates)} rates, {len(grant.slots)} slots, {len(grant.caps)} budgets)",
                     f"p50 {pct(admits, 0.5) * 1000:.3f} ms / p99 {pct(admits, 0.99) * 1000:.3f} ms", "—", "—", "—"])
        rows.append(["settle script", f"p50 {pct(settles, 0.5) * 1000:.3f} ms / p99 {pct(settles, 0.99) * 1000:.3f} ms",
                     "—", "—", "—"])
    finally:
        await nc.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    cfg = QUICK if args.quick else FULL
    rows: list[list[str]] = []
    outcome = harness.run(
        "governance", lambda infra, procs: bench(cfg, infra, procs, rows), quick=args.quick, machine=machine()
    )
    if outcome is None:
        return 1
    started, elapsed, _, findings = outcome
    table = ["| Measurement | Result | Added vs off | Target | Met? |", "|---|---|---|---|---|"]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join([
        "# Governance cost (auth, rate limits, budgets)",
        "",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M UTC')} ({'--quick' if args.quick else 'full'} run, "
        f"{elapsed:.0f} s)",
        f"- Machine: {machine()}; load average at the end {os.getloadavg()[0]:.2f}",
        "- Command: `python bench/bench_governance.py" + (" --quick" if args.quick else "") + "`",
        "- The four ways run interleaved in rounds in one run, through real gateways, Redis and a "
        "benchmark-engine worker; the aiohttp load generator shares the 2 cores with all of them.",
        "- 'every limit' = requests/min, tokens/min and concurrency on the key and on its tenant, requests/min "
        "on the key for this model, daily token budgets on key and tenant: 9 counters checked and committed "
        "in one admit script, corrected in one settle script.",
        "",
        *table,
        "",
        "Warnings and errors the services logged: " + ("; ".join(findings) or "none"),
        "",
    ])
    print(text)
    write_section(RESULTS_PATH, "governance", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
