"""What every benchmark run does around its measurements: an embedded stack, processes, cleanup, findings.

    outcome = harness.run("registry", lambda infra, procs: bench(cfg, infra, procs, report))
    if outcome is None: return 1

The stack (nats-server, PostgreSQL, Redis from the wheels) lives in a fresh temporary folder; every
process the benchmark appends to `procs` is stopped at the end, on failure too (SIGTERM included);
the folder is removed after a clean run and kept, with log tails printed, after a failed one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NamedTuple

from services.runtime.local import EmbeddedStack, ServiceProcess

Bench = Callable[[EmbeddedStack, list[ServiceProcess]], Awaitable[None]]


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
