"""A service process runs with InferBus's collector thresholds (or the INFERBUS_GC_THRESHOLD override), and
`settle` takes what startup made out of the collector's generations. Real processes started through
`service.run`, as every service's entry point is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.runtime import service

ROOT = Path(__file__).resolve().parent.parent

# What a service's `main` sees: the thresholds `run` set, and the objects `settle` froze.
PROBE = """
import gc, json
from services.runtime import service

async def main(stop):
    before = gc.get_freeze_count()
    service.settle()
    print(json.dumps({"threshold": gc.get_threshold(), "frozen_before": before, "frozen": gc.get_freeze_count(),
                      "young": gc.get_count()[0]}))

service.run(main)
"""


def _probe(value: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERBUS_")}
    if value is not None:
        env["INFERBUS_GC_THRESHOLD"] = value
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("value", "expected"), [
    (None, list(service.GC_THRESHOLD)),
    ("20000,5,50", [20000, 5, 50]),
    ("python", [700, 10, 10]),  # Python's own, untouched
])
def test_a_service_runs_with_the_thresholds_and_settles_its_startup_heap(value: str | None,
                                                                         expected: list[int]) -> None:
    done = _probe(value)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["threshold"] == expected
    assert seen["frozen_before"] == 0 and seen["frozen"] > 1000  # every module's objects, at the least
    assert seen["young"] < 100  # collected before the freeze: nothing left over in the young generation


@pytest.mark.parametrize("value", ["fast", "0,10,10", "1,2,3,4", "50000,,1"])
def test_a_bad_threshold_stops_the_service_with_a_clear_error(value: str) -> None:
    done = _probe(value)
    assert done.returncode != 0
    assert "SettingsError: INFERBUS_GC_THRESHOLD must be 1-3 positive integers" in done.stderr
    assert repr(value) in done.stderr
