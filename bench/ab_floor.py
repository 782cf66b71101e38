#!/usr/bin/env python
"""Two versions of the code side by side under bench_floor's load: which one is cheaper per request.

    python bench/ab_floor.py BASE [CANDIDATE] [--rounds 10] [--seconds 4] [--mode json|stream]
                             [--concurrency 64] [--key admin|limits]

BASE and CANDIDATE are each a folder holding a checkout, or a git revision of this repository (checked out
into a temporary worktree, removed at the end); CANDIDATE defaults to this checkout as it is, uncommitted
changes included. Each version runs its own gateway and benchmark-engine worker, started from its own
folder, on one embedded stack (secure bus, PostgreSQL, Redis). wrk then drives them in turns: a warm-up
round, then `--rounds` rounds of one `--seconds` window per version, the order reversed every round, so
that drift in the machine's speed falls on both alike. Per version: req/s (median and mean over the rounds),
p50, and CPU per request of the gateway, the worker and nats-server (the shared server's CPU counts in the
windows of the version being driven); then CANDIDATE / BASE per round.

On a noisy 2-core machine a single full `bench floor` run cannot show a change of a few percent; this can.
It writes nothing to RESULTS.md: quote its table where you use it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from bench import fleet, harness  # noqa: E402
from bench.bench_floor import (  # noqa: E402
    ADMIN_KEY,
    STREAM_OPTIONS,
    check,
    create_limits_key,
    fingerprint,
    script,
)
from bench.bench_spine import machine  # noqa: E402
from bench.harness import TreeMeter, say, wrk  # noqa: E402
from services.runtime import bus  # noqa: E402
from services.runtime.local import EmbeddedStack, ServiceProcess, wait_http, wait_worker  # noqa: E402

NAMES = ("base", "candidate")


class Version(NamedTuple):
    name: str
    tree: Path
    base_url: str
    model: str
    pids: dict[str, int]


class Sample(NamedTuple):
    rps: float
    p50: float
    cpu_ms: dict[str, float]  # CPU ms per request by process
    errors: int


def checkout(spec: str, keep: list[Path]) -> Path:
    """A folder with the code: `spec` itself if it is one, else a temporary worktree of git revision `spec`."""
    if Path(spec).is_dir():
        return Path(spec).resolve()
    folder = Path(tempfile.mkdtemp(prefix="ab-floor-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), spec], check=True,
                   capture_output=True, text=True)
    keep.append(folder)
    return folder


def start(infra: EmbeddedStack, procs: list[ServiceProcess], name: str, tree: Path, stream: bool
          ) -> tuple[ServiceProcess, ServiceProcess, str, str]:
    """A gateway and a worker whose code is `tree`'s: `python -m` imports from the folder it starts in."""
    model = f"ab-{name}"
    here = os.getcwd()
    os.chdir(tree)
    try:
        gateway, base = fleet.start_gateway(infra, f"gateway-{name}", procs, ADMIN_KEY,
                                            models=[{"name": model, "version": "v1"}])
        options: dict[str, Any] = {"engine_options": STREAM_OPTIONS} if stream else {}
        worker = fleet.start_worker(infra, f"worker-{name}", model, "v1", procs, **options)
    finally:
        os.chdir(here)
    return gateway, worker, base, model


async def compare(args: argparse.Namespace, trees: dict[str, Path], infra: EmbeddedStack,
                  procs: list[ServiceProcess]) -> None:
    stream = args.mode == "stream"
    versions: dict[str, Version] = {}
    nc = await bus.connect(infra.nats_url, "ab-floor", identity=infra.identity())
    try:
        for name, tree in trees.items():
            gateway, worker, base, model = start(infra, procs, name, tree, stream)
            await wait_http(base, gateway)
            await wait_worker(nc, model, worker)
            versions[name] = Version(name, tree, base, model,
                                     {"gateway": gateway.pid, "worker": worker.pid, "nats": infra.nats_pid})
            say(f"{name}: {tree} (gateway {base})")
    finally:
        await nc.close()
    key = ADMIN_KEY
    async with aiohttp.ClientSession() as http:
        if args.key == "limits":
            key, _ = await create_limits_key(http, versions["base"].base_url)
        for v in versions.values():
            got = await check(http, v.base_url + "/v1/chat/completions", key, v.model, stream)
            say(f"{v.name} answers: {got['bytes']} B, {got['chunks']} content chunks")
    scripts = {n: script(infra.root, f"ab-{n}-{args.mode}", v.model, stream, key) for n, v in versions.items()}
    samples: dict[str, list[Sample]] = {n: [] for n in versions}
    for rnd in range(args.rounds + 1):
        order = NAMES if rnd % 2 == 0 else NAMES[::-1]
        for name in order:
            v = versions[name]
            meter = TreeMeter(v.pids)
            meter.start()
            run = await wrk(v.base_url + "/v1/chat/completions", scripts[name], args.concurrency, args.seconds)
            meter.stop(run.cpu)
            per = {p: 1000 * s / max(run.requests, 1) for p, s in meter.used.items()}
            label = "warm-up" if rnd == 0 else f"round {rnd}/{args.rounds}"
            say(f"{label} {name:9s} {run.rps:8,.0f} req/s  p50 {run.p50 * 1000:6.2f} ms  "
                f"CPU {sum(per.values()):.3f} ms/req  errors {run.errors}")
            if rnd:
                samples[name].append(Sample(run.rps, run.p50, per, run.errors))
    print(table(args, versions, samples))


def table(args: argparse.Namespace, versions: dict[str, Version], samples: dict[str, list[Sample]]) -> str:
    lines = [*(f"- {name}: {fingerprint(v.tree)}" for name, v in versions.items()),
             f"\nSide by side: {args.mode}, c={args.concurrency}, {args.key} key, {args.rounds} rounds of "
             f"{args.seconds} s per version\n",
             "| Version | req/s median (mean) | p50 | CPU ms/request: gateway, worker, nats = total | errors |",
             "|---|---|---|---|---|"]
    for name in versions:
        rows = samples[name]
        cpu = {p: statistics.mean(s.cpu_ms[p] for s in rows) for p in rows[0].cpu_ms}
        parts = ", ".join(f"{c:.3f}" for c in cpu.values())
        lines.append(f"| {name} | {statistics.median(s.rps for s in rows):,.0f} "
                     f"({statistics.mean(s.rps for s in rows):,.0f}) | "
                     f"{statistics.median(s.p50 for s in rows) * 1000:.2f} ms | {parts} = {sum(cpu.values()):.3f} | "
                     f"{sum(s.errors for s in rows)} |")
    ratios = [c.rps / b.rps for b, c in zip(samples["base"], samples["candidate"], strict=True)]
    lines.append(f"\ncandidate / base, req/s per round: {', '.join(f'{r:.3f}' for r in ratios)}; "
                 f"median {statistics.median(ratios):.3f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("base", help="a folder with a checkout, or a git revision")
    parser.add_argument("candidate", nargs="?", default=str(ROOT), help="the same (default: this checkout)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--mode", choices=("json", "stream"), default="json")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--key", choices=("admin", "limits"), default="admin")
    args = parser.parse_args()
    if args.rounds < 1 or args.seconds < 1 or args.concurrency < 1:
        parser.error("--rounds, --seconds and --concurrency must be at least 1")
    harness.wrk_binary()
    worktrees: list[Path] = []
    try:
        trees = {"base": checkout(args.base, worktrees), "candidate": checkout(args.candidate, worktrees)}
    except subprocess.CalledProcessError as exc:
        print(f"ab_floor: {exc.stderr.strip() or exc}", file=sys.stderr)
        return 2
    try:
        outcome = harness.run("ab-floor", lambda infra, procs: compare(args, trees, infra, procs), quick=False,
                              machine=machine())
    finally:
        for folder in worktrees:
            with contextlib.suppress(subprocess.CalledProcessError):
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder)], check=True,
                               capture_output=True)
    return 0 if outcome is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
