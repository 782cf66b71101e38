#!/usr/bin/env python
"""Profile the hot path under load: py-spy on the gateway and the worker while wrk drives the same stack as
bench/bench_floor.py.

    python bench/profile_hot_path.py [--seconds 20] [--concurrency 64] [--mode json|stream] [--key admin|limits]
                                     [--rate 200] [--lines] [--out DIR] [--label NAME]

Starts the embedded stack (secure bus, PostgreSQL, Redis), the gateway and the benchmark-engine workers
exactly as bench_floor.py does, warms up, then runs wrk (`--concurrency` connections, non-streaming
`max_tokens` 16 or streaming 32 chunks, admin key or a key with requests/min and tokens/min limits) while
`py-spy record --nonblocking --function --format raw` samples the gateway and the worker that serves the
mode. Prints, per process, its CPU use during the window and the top functions by self time (the leaf frame
of each sample) and by inclusive time (every frame on the sampled stack, once), as % of the process's
samples (py-spy drops samples where the process sits idle in the kernel, e.g. in epoll_wait).
With --lines, py-spy keeps each frame's current line (no --function) and the summary adds a third table: our
own lines (services/, contracts/), each sample charged to the deepest of them on its stack, so the library
calls a line makes count to it; what runs under no frame of ours (the event loop, aiohttp, nats-py's reads)
is one row.

Keeps the raw stacks (`<process>.txt`, one `frame;frame;...;leaf count` line per distinct stack; flamegraph.pl
and speedscope read them) and the summary (`summary.md`) under --out (default: a new folder under /tmp).
With --label NAME it also writes the summary as section `floor-profile-NAME` of bench/RESULTS.md.

Needs py-spy (`pip install py-spy`, in the dev extra) and ptrace rights on the services (root, or
kernel.yama.ptrace_scope=0 for processes of the same user), and wrk (`make bench-deps`).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from bench import harness  # noqa: E402
from bench.bench_floor import (  # noqa: E402
    ADMIN_KEY,
    MODEL,
    STREAM_MODEL,
    create_limits_key,
    fingerprint,
    loop_of,
    script,
    start_inferbus,
)
from bench.bench_spine import machine  # noqa: E402
from bench.harness import WRK_INSTALL, TreeMeter, say, wrk  # noqa: E402
from bench.results import write_section  # noqa: E402
from services.runtime.local import EmbeddedStack, ServiceProcess  # noqa: E402

RESULTS_PATH = ROOT / "bench" / "RESULTS.md"
TOP = 20
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
# Frames on (nearly) every stack: the event loop, thread and module entry points (by their last name part).
SKIP_INCLUSIVE = {"<module>", "run", "run_forever", "run_until_complete", "_run_once", "_run", "main",
                  "_run_module_as_main", "_run_code", "run_module", "_bootstrap", "_bootstrap_inner", "_worker"}


def py_spy() -> str:
    for candidate in (Path(sys.executable).parent / "py-spy", shutil.which("py-spy")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise SystemExit("[bench] py-spy is not installed: pip install py-spy (it is in the dev extra: "
                     "pip install -e '.[dev]')")


def short(path: str) -> str:
    """A frame's file, relative to the repository or to site-packages / the standard library."""
    for marker in ("/site-packages/", "/lib/python3."):
        i = path.find(marker)
        if i >= 0:
            rest = path[i + len(marker):]
            return rest.split("/", 1)[1] if marker == "/lib/python3." and "/" in rest else rest
    with_root = str(ROOT) + "/"
    return path[len(with_root):] if path.startswith(with_root) else path


def frame_name(frame: str) -> str:
    m = FRAME.match(frame)
    if not m:
        return frame
    return f"{m['func']} ({short(m['file'])})"


def frame_line(frame: str) -> str | None:
    """`func (file:line)` for a frame of our own code (services/, contracts/), else None."""
    m = FRAME.match(frame)
    if not m or not m["line"]:
        return None
    file = short(m["file"])
    return f"{m['func']} ({file}:{m['line']})" if file.startswith(("services/", "contracts/")) else None


def read_stacks(raw: Path) -> list[tuple[list[str], int]]:
    """py-spy's raw output (collapsed stacks): each distinct stack's frames, outermost first, and its samples."""
    stacks = []
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append(([f for f in stack.split(";") if f], int(count)))
    return stacks


def our_lines(stacks: list[tuple[list[str], int]]) -> list[tuple[str, int]]:
    """Top lines of our code, each sample charged to the deepest frame of ours on its stack (--lines)."""
    charged: Counter[str] = Counter()
    for frames, n in stacks:
        ours = [name for f in frames if (name := frame_line(f))]
        deepest = ours[-1] if ours else ""
        if deepest.startswith("run (services/runtime/service.py:"):  # the loop itself: under no frame of ours
            deepest = ""
        charged[deepest or "(under no frame of ours: event loop, aiohttp, nats-py)"] += n
    return charged.most_common(TOP)


def summarize(stacks: list[tuple[list[str], int]]) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """(samples, top self, top inclusive) from the stacks."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for raw_frames, n in stacks:
        total += n
        frames = [frame_name(f) for f in raw_frames]
        if not frames:
            continue
        self_time[frames[-1]] += n
        for name in set(frames):
            if name.split(" (", 1)[0].rsplit(".", 1)[-1] not in SKIP_INCLUSIVE:
                inclusive[name] += n
    return total, self_time.most_common(TOP), inclusive.most_common(TOP)


def table(title: str, total: int, rows: list[tuple[str, int]], column: str = "Function (file)") -> str:
    lines = [f"{title}", "", f"| # | {column} | Samples | % |", "|---|---|---|---|"]
    for i, (name, n) in enumerate(rows, 1):
        lines.append(f"| {i} | `{name}` | {n} | {100 * n / total:.1f} % |" if total else f"| {i} | `{name}` | {n} | |")
    return "\n".join(lines) + "\n"


async def profile(args: argparse.Namespace, infra: EmbeddedStack, procs: list[ServiceProcess], out: Path,
                  parts: list[str]) -> None:
    spy = py_spy()
    platform = await start_inferbus(infra, procs)
    key = ADMIN_KEY
    if args.key == "limits":
        async with aiohttp.ClientSession() as http:
            key, key_id = await create_limits_key(http, platform.base)
        say(f"created the limits key {key_id}")
    stream = args.mode == "stream"
    lua = script(infra.root, f"profile-{args.mode}", STREAM_MODEL if stream else MODEL, stream, key)
    url = platform.base + "/v1/chat/completions"
    worker = platform.stream_worker if stream else platform.worker
    targets = {"gateway": platform.gateway.pid, "worker": worker.pid}
    say("warm-up: 3 s")
    await wrk(url, lua, args.concurrency, 3)
    say(f"profiling: wrk c={args.concurrency} {args.mode} ({args.key} key) for {args.seconds + 2} s; py-spy at "
        f"{args.rate} Hz for {args.seconds} s on " + ", ".join(f"{k} (pid {v})" for k, v in targets.items()))
    load = asyncio.create_task(wrk(url, lua, args.concurrency, args.seconds + 2))
    await asyncio.sleep(1.0)
    meter = TreeMeter(platform.pids)
    meter.start()
    spies = {
        name: await asyncio.create_subprocess_exec(
            spy, "record", "--pid", str(pid), "--duration", str(args.seconds), "--rate", str(args.rate),
            "--nonblocking", *([] if args.lines else ["--function"]), "--format", "raw",
            "-o", str(out / f"{name}.txt"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        for name, pid in targets.items()
    }
    logs = {name: (await p.communicate())[0].decode(errors="replace") for name, p in spies.items()}
    meter.stop(0.0)
    run = await load
    for name, p in spies.items():
        if p.returncode != 0 or not (out / f"{name}.txt").exists():
            raise RuntimeError(f"py-spy on the {name} failed (exit {p.returncode}); ptrace rights? Output:\n"
                               f"{logs[name][-2000:]}")
    cores = {n: meter.used[n] / meter.wall for n in meter.used}
    say(f"wrk: {run.rps:,.0f} req/s, p50 {run.p50 * 1000:.2f} ms, p99 {run.p99 * 1000:.2f} ms, {run.errors} errors "
        f"(py-spy running)")
    say("cores busy during the profile: " + ", ".join(f"{n} {c:.2f}" for n, c in cores.items()))
    parts += [
        f"- Profile: `python bench/profile_hot_path.py --seconds {args.seconds} --concurrency {args.concurrency} "
        f"--mode {args.mode} --key {args.key} --rate {args.rate}" + (" --lines" if args.lines else "")
        + (f" --label {args.label}" if args.label else "")
        + "`",
        *([f"- Note: {args.note}"] if args.note else []),
        f"- Code under test: {fingerprint()}; event loops: gateway {loop_of(platform.gateway.pid)}, "
        f"worker {loop_of(worker.pid)}.",
        f"- Load during the profile: wrk c={args.concurrency}, {args.mode}, {args.key} key: {run.rps:,.0f} req/s, "
        f"p50 {run.p50 * 1000:.2f} ms, p99 {run.p99 * 1000:.2f} ms, {run.errors} errors (py-spy --nonblocking "
        "sampling alongside).",
        "- Cores busy during the profile window: " + ", ".join(f"{n} {c:.2f}" for n, c in cores.items())
        + f"; everything else on the machine {meter.other:.2f}.",
        f"- Raw stacks: {out} (collapsed-stack lines: flamegraph.pl, speedscope).",
        "",
    ]
    for name in targets:
        stacks = read_stacks(out / f"{name}.txt")
        total, top_self, top_incl = summarize(stacks)
        say(f"{name}: {total} samples (non-idle)")
        busy = cores["gateway" if name == "gateway" else ("stream worker" if stream else "worker")]
        parts.append(f"### {name} (pid {targets[name]}, {busy:.2f} cores busy, {total} non-idle samples at "
                     f"{args.rate} Hz)\n")
        parts.append(table(f"Top {TOP} by self time ({name})", total, top_self))
        parts.append(table(f"Top {TOP} by inclusive time ({name}; event-loop and entry frames left out)", total,
                           top_incl))
        if args.lines:
            parts.append(table(f"Top {TOP} of our lines ({name}; each sample charged to the deepest line of ours on "
                               "its stack)", total, our_lines(stacks), "Line (file:line)"))


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=20, help="py-spy's sampling window (default 20)")
    parser.add_argument("--concurrency", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--mode", choices=("json", "stream"), default="json",
                        help="non-streaming max_tokens 16 (json, default) or streaming 32 chunks")
    parser.add_argument("--key", choices=("admin", "limits"), default="admin", help="the API key (default admin)")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second (default 200)")
    parser.add_argument("--lines", action="store_true",
                        help="sample lines, not functions, and add a table of our own lines")
    parser.add_argument("--out", default="", help="folder for the raw stacks and the summary (default: new, /tmp)")
    parser.add_argument("--note", default="", help="free text for the summary's header (e.g. which code ran)")
    parser.add_argument("--label", default="", help="also write section floor-profile-LABEL of bench/RESULTS.md")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print(f"[bench] wrk is not installed. Install it with: {WRK_INSTALL}", file=sys.stderr)
        return 2
    py_spy()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="inferbus-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    parts: list[str] = []
    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    outcome = harness.run("profile", lambda infra, procs: profile(args, infra, procs, out, parts), quick=False,
                          machine=machine())
    if outcome is None:
        return 1
    head = [
        f"# Hot-path profile{f' ({args.label})' if args.label else ''}",
        "",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M UTC')} ({time.perf_counter() - t0:.0f} s)",
        f"- Machine: {machine()}; load average {outcome.load[0]} at start, {outcome.load[1]} at the end",
    ]
    text = "\n".join(head + parts)
    (out / "summary.md").write_text(text + "\n")
    print()
    print(text)
    say(f"raw stacks and summary.md under {out}")
    if args.label:
        write_section(RESULTS_PATH, f"floor-profile-{args.label}", text)
        say(f"wrote section floor-profile-{args.label} of {RESULTS_PATH.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
