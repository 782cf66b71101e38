"""What every benchmark run does around its measurements: an embedded stack, processes, cleanup, findings.

    outcome = harness.run("registry", lambda infra, procs: bench(cfg, infra, procs, report))
    if outcome is None: return 1

The stack (nats-server, PostgreSQL, Redis from the wheels) lives in a fresh temporary folder; every
process the benchmark appends to `procs` is stopped at the end, on failure too (SIGTERM included);
the folder is removed after a clean run and kept, with log tails printed, after a failed one.

The HTTP load generator the benchmarks share is wrk (`wrk_script`, `wrk`: keep-alive connections, POST bodies,
percentiles through a Lua script), and their CPU accounting `TreeMeter` (CPU seconds of process trees over a
window, and what the rest of the machine used meanwhile).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import psutil

from services.runtime.local import EmbeddedStack, ServiceProcess

Bench = Callable[[EmbeddedStack, list[ServiceProcess]], Coroutine[Any, Any, None]]


class Outcome(NamedTuple):
    started: dt.datetime
    elapsed: float
    load: tuple[str, str]  # load average at the start and at the end
    findings: list[str]  # warnings and errors the services logged


def say(text: str) -> None:
    print(f"[bench] {text}", flush=True)


def load_average() -> str:
    return "{:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())


def run(name: str, bench: Bench, *, quick: bool, machine: str) -> Outcome | None:
    """Run `bench` on a fresh embedded stack; None when it failed (the reason is printed)."""
    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    load0 = load_average()

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    root = Path(tempfile.mkdtemp(prefix=f"inferbus-bench-{name}-"))
    root.chmod(0o755)
    infra = EmbeddedStack(root)
    procs: list[ServiceProcess] = []
    ok = False
    try:
        say(f"{'quick' if quick else 'full'} run; machine: {machine}; load average {load0}")
        say(f"starting nats-server, PostgreSQL, Redis under {root}")
        infra.start()
        say(f"nats {infra.nats_url}, postgres {infra.database_url}, redis {infra.redis_url}")
        asyncio.run(bench(infra, procs))
        ok = True
    except BaseException:
        say("FAILED:\n" + traceback.format_exc())
        for p in procs:
            with contextlib.suppress(OSError):
                say(f"--- {p.name} log tail ---\n{p.log()[-2000:]}")
    finally:
        say("stopping services")
        for p in reversed(procs):
            with contextlib.suppress(Exception):
                p.stop()
        try:
            infra.stop()
        except RuntimeError as exc:
            say(str(exc))
        findings = log_findings(procs)
        if ok:
            shutil.rmtree(root, ignore_errors=True)
        else:
            say(f"logs kept under {root}")
    if not ok:
        return None
    return Outcome(started, time.perf_counter() - t0, (load0, load_average()), findings)


def log_findings(procs: list[ServiceProcess]) -> list[str]:
    """Warnings and errors the services logged during the run."""
    found = []
    for p in procs:
        with contextlib.suppress(OSError):
            counts: dict[str, int] = {}
            for line in p.log().splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    if line.strip():
                        counts["(non-JSON line)"] = counts.get("(non-JSON line)", 0) + 1
                    continue
                if event.get("level") in ("warning", "error", "critical"):
                    key = f"{event.get('level')}: {event.get('event')}"
                    counts[key] = counts.get(key, 0) + 1
            for key, n in counts.items():
                found.append(f"{p.name}: {key} x{n}")
    return found


def arguments(doc: str | None, quick_help: str, *, note: bool = False) -> argparse.Namespace:
    """The command line every benchmark takes: --quick (and --note where the report has a header note)."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    if note:
        parser.add_argument("--note", default="", help="free text for the section's header (e.g. what else ran)")
    return parser.parse_args()


class Report:
    """A benchmark's markdown tables (by key) and notes, each row and note printed as it comes."""

    def __init__(self, titles: dict[str, str]) -> None:
        self.titles = titles  # table key -> its title
        self.tables: dict[str, list[str]] = {}
        self.notes: list[str] = []

    def table(self, key: str, header: list[str]) -> None:
        self.tables[key] = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def row(self, key: str, *cells: str) -> None:
        self.tables[key].append("| " + " | ".join(cells) + " |")
        say("  " + " | ".join(cells))

    def note(self, text: str) -> None:
        self.notes.append(text)
        say(f"  note: {text}")

    def markdown(self, key: str) -> str:
        return "\n".join(self.tables[key]) + "\n"

    def section(self, key: str) -> str:
        """The table as a RESULTS.md section: its title as a heading, then the table."""
        return f"## {self.titles[key]}\n\n{self.markdown(key)}"

    def titled(self) -> str:
        """Every table under its title, for the console."""
        return "\n\n".join(f"{title}\n\n{self.markdown(key)}" for key, title in self.titles.items())


def noise(others: list[float], outcome: Outcome, note: str = "") -> list[str]:
    """The about-lines on the run's conditions: the cores that processes outside the bench used during the
    measured windows (`others`, one figure a window), the load average, and the --note."""
    others = others or [0.0]
    other_mean, other_max = sum(others) / len(others), max(others)
    load = outcome.load
    return [
        f"Noise: processes outside the bench used {other_mean:.2f} cores on average (max {other_max:.2f}) during "
        f"the measured windows (load average {load[0]} at start, {load[1]} at the end)."
        + (" Figures taken with other load present are noisy." if other_max > 0.2 else ""),
        *([f"Note: {note}"] if note else []),
    ]


def report(section: str, table: str, outcome: Outcome, results_path: Path) -> None:
    """Print the table and the services' warnings; say where the section was written."""
    print()
    print(table)
    for finding in outcome.findings:
        say(f"service log: {finding}")
    say(f"wrote section {section} of {results_path.name} in {outcome.elapsed:.0f} s")


def markdown(
    title: str, script: str, quick: bool, outcome: Outcome, about: list[str], table: str, notes: list[str]
) -> str:
    """A RESULTS.md section: title, date/machine/command, what was measured, the table, notes, findings."""
    from bench.bench_spine import machine  # the machine line every section shares

    return "\n".join([
        f"# {title}",
        "",
        f"- Date: {outcome.started.strftime('%Y-%m-%d %H:%M UTC')} ({'--quick' if quick else 'full'} run, "
        f"{outcome.elapsed:.0f} s)",
        f"- Machine: {machine()}",
        f"- Command: `python bench/{script}" + (" --quick" if quick else "") + "`",
        *[f"- {line}" for line in about],
        "",
        table,
        "## Notes",
        "",
        *[f"- {n}" for n in notes],
        "",
        "## Warnings and errors the services logged",
        "",
        *([f"- {f}" for f in outcome.findings] or ["- none"]),
        "",
    ])


WRK_INSTALL = "make bench-deps  (or: sudo apt-get install -y wrk)"


# ---- wrk ------------------------------------------------------------------------------------------


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise SystemExit(f"[bench] wrk is not installed; this benchmark drives the HTTP load with it. Install: "
                         f"{WRK_INSTALL}")
    return found


LUA = """\
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(key)s"
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\\"requests\\": %%d, \\"duration_us\\": %%d, \\"bytes\\": %%d, \\"connect\\": %%d, \\"read\\": %%d, " ..
    "\\"write\\": %%d, \\"status\\": %%d, \\"timeout\\": %%d, \\"p50\\": %%d, \\"p90\\": %%d, \\"p99\\": %%d, " ..
    "\\"max\\": %%d, \\"mean\\": %%.1f}\\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""

# wrk connects every thread to the URL's address; this sends thread i to port i (round-robin over the list), so
# one wrk (one latency histogram) spreads its connections evenly over several servers.
LUA_PORTS = """\
local ports = {%(ports)s}
local threads = 0
function setup(thread)
  thread.addr = wrk.lookup(wrk.host, tostring(ports[threads %% #ports + 1]))[1]
  threads = threads + 1
end
"""


def wrk_script(path: Path, body: bytes, key: str, ports: Sequence[int] = ()) -> Path:
    """A wrk script at `path` that POSTs `body` with bearer `key`; with `ports`, thread i goes to port i (wrap)."""
    text = LUA % {"body": body.decode(), "key": key}
    if ports:
        text += LUA_PORTS % {"ports": ", ".join(str(p) for p in ports)}
    path.write_text(text)
    return path


class Wrk(NamedTuple):
    requests: int
    seconds: float
    p50: float  # seconds
    p99: float
    errors: int
    bytes: int
    cpu: float  # wrk's own CPU seconds

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


async def wrk(url: str, script: Path, concurrency: int, seconds: int, threads: int = 1) -> Wrk:
    """One wrk run: `threads` threads, `concurrency` keep-alive connections over them, `seconds` long (wrk's CPU:
    from the children's rusage, so run one at a time)."""
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = await asyncio.create_subprocess_exec(
        wrk_binary(), f"-t{threads}", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "10s", "-s", str(script), url,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = out.decode(errors="replace")
    m = re.search(r"^WRKJSON (\{.*\})$", text, re.M)
    if proc.returncode != 0 or m is None:
        raise RuntimeError(f"wrk failed (exit {proc.returncode}):\n{text[-2000:]}")
    r = msgspec.json.decode(m.group(1))
    errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return Wrk(r["requests"], r["duration_us"] / 1e6, r["p50"] / 1e6, r["p99"] / 1e6, errors, r["bytes"], cpu)


# ---- CPU of whole process trees ---------------------------------------------------------------------


class TreeMeter:
    """CPU seconds of named process trees (a process and its descendants, e.g. PostgreSQL's backends; a name may
    stand for several, e.g. "gateways") over a window, and the cores everything else on the machine used
    meanwhile."""

    others: list[float] = []  # cores used outside the bench, one entry per window

    def __init__(self, pids: Mapping[str, int | Sequence[int]]) -> None:
        self.roots = {name: [p] if isinstance(p, int) else list(p) for name, p in pids.items()}

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))

    def _sample(self) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for name, pids in self.roots.items():
            per: dict[int, float] = {}
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    root = psutil.Process(pid)
                    for p in [root, *root.children(recursive=True)]:
                        with contextlib.suppress(psutil.Error):
                            c = p.cpu_times()
                            per[p.pid] = c.user + c.system
            out[name] = per
        return out

    def start(self) -> None:
        self.t0, self.busy0, self.s0 = time.perf_counter(), self._busy(), self._sample()

    def stop(self, client_cpu: float) -> None:
        self.wall = time.perf_counter() - self.t0
        busy = self._busy() - self.busy0
        s1 = self._sample()
        # A process that ended within the window loses its CPU time here; one that started counts from zero.
        self.used = {n: sum(t - self.s0[n].get(pid, 0.0) for pid, t in s1[n].items()) for n in self.roots}
        self.client = client_cpu
        self.other = max(0.0, busy - sum(self.used.values()) - client_cpu) / self.wall
        TreeMeter.others.append(self.other)
