"""The seams ARCHITECTURE.md fixes, checked on the source: one door to NATS."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
NATS_IMPORT = re.compile(r"^\s*(import nats\b|from nats[\w.]* import)", re.M)


def test_only_the_bus_package_imports_nats_py() -> None:
    offenders = []
    for path in sorted([*ROOT.joinpath("services").rglob("*.py"), *ROOT.joinpath("contracts").rglob("*.py")]):
        if ROOT.joinpath("services", "runtime", "bus") in path.parents:
            continue
        if NATS_IMPORT.search(path.read_text()):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == [], f"import NATS types from services.runtime.bus instead: {offenders}"
