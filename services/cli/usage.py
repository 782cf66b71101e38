"""`inferbus usage ...` and `inferbus prices ...`: reports from the usage ledger, its dead letters, the price table."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import getpass
import io
import time
from typing import Any

import msgspec

from contracts import usage
from contracts.usage import GROUPS, ListDeadLetters, ListPrices, SetPrice, UsageQuery
from services.cli import admin
from services.cli.admin import table

COUNTS = ("requests", "cancelled", "failed", "prompt_tokens", "completion_tokens")
MEDIA = ("audio_seconds_in", "audio_seconds_out", "characters", "images")
DIMS = {
    "tenant": "tenant_id",
    "key": "key_id",
    "model": "model",
    "kind": "kind",
    "day": "day",
    "hour": "hour",
    "minute": "minute",
    "batch": "batch",
}
FLAGS = ("batch", "shadow")  # booleans: lower case in CSV


def add_parser(sub: Any) -> None:
    """Both commands: `usage` (reports) and `prices` (the price table)."""
    p = sub.add_parser("usage", help="usage from the ledger: requests, tokens and cost, grouped as you like")
    p.add_argument("--by", default="", help=f"group by, comma-separated: {','.join(GROUPS)} (default: totals only)")
    p.add_argument("--since", default="24h", help="start: a duration ago (90m, 24h, 30d) or a UTC date[/time]")
    p.add_argument("--until", help="end (default now): a duration ago or a UTC date[/time]")
    p.add_argument("--tenant", help="only this tenant")
    p.add_argument("--key", help="only this API key id")
    p.add_argument("--model", help="only this model")
    p.add_argument("--shadow", action="store_true", help="also list shadow copies (never billed, not in totals)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--csv", action="store_true", help="print the rows as CSV")
    out.add_argument("--json", action="store_true", help="print the metering service's reply as JSON")
    us = p.add_subparsers(dest="usage_command")
    d = us.add_parser("dead-letters", help="usage messages the ledger could not take (newest first), and why")
    d.add_argument("--limit", type=int, default=100, help="how many (default 100, at most 1000)")
    d.add_argument("--json", action="store_true", help="print the metering service's reply as JSON")

    p = sub.add_parser("prices", help="the USD price table usage is billed with")
    p.add_argument("--json", action="store_true", help="print the metering service's reply as JSON")
    ps = p.add_subparsers(dest="prices_command", required=True)
    s = ps.add_parser("set", help="price MODEL VERSION ('*' = every version without a price of its own)")
    s.add_argument("model")
    s.add_argument("version")
    s.add_argument("--input", type=float, default=0.0, help="USD per million prompt tokens")
    s.add_argument("--output", type=float, default=0.0, help="USD per million completion tokens")
    s.add_argument("--audio-second", type=float, default=0.0, help="USD per second of audio (in or out)")
    s.add_argument("--image", type=float, default=0.0, help="USD per image")
    s.add_argument("--batch-discount", type=float, default=0.0, help="fraction off for batch lines (0.5: half price)")
    s = ps.add_parser("list", help="every price")
    s.add_argument("--model", help="only this model's prices")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        subject, body = build(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.command == "usage" and getattr(args, "usage_command", None) == "dead-letters":
        return admin.run(subject, body, render_dead_letters, args.json, "metering service")
    if args.command == "usage":
        render = render_csv if args.csv else render_usage
        return admin.run(subject, body, render, args.json, "metering service")
    return admin.run(subject, body, render_prices, args.json, "metering service")


def build(args: argparse.Namespace, now: float | None = None) -> tuple[str, msgspec.Struct]:
    """The subject and typed request for parsed arguments (argument errors raise ValueError)."""
    now = time.time() if now is None else now
    if args.command == "usage" and getattr(args, "usage_command", None) == "dead-letters":
        return usage.DEAD_LETTERS, ListDeadLetters(limit=args.limit)
    if args.command == "usage":
        group_by = [g.strip() for g in args.by.split(",") if g.strip()]
        return usage.USAGE_QUERY, UsageQuery(
            since=moment(args.since, now),
            until=moment(args.until, now) if args.until else None,
            tenant_id=args.tenant,
            key_id=args.key,
            model=args.model,
            group_by=group_by,
            include_shadow=args.shadow,
        )
    if args.prices_command == "set":
        return usage.PRICES_SET, SetPrice(
            model=args.model,
            version=args.version,
            input_per_1m=args.input,
            output_per_1m=args.output,
            per_audio_second=args.audio_second,
            per_image=args.image,
            batch_discount=args.batch_discount,
            actor=f"cli:{getpass.getuser()}",
        )
    return usage.PRICES_LIST, ListPrices(model=args.model)


def moment(text: str, now: float) -> float:
    """A duration ago ('24h'), or an ISO date / date-time (UTC unless it says otherwise), as unix seconds."""
    try:
        return now - admin.duration(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not a time: {text!r} (use e.g. 24h, 30d, 2026-11-01 or 2026-11-01T12:00)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


# ---- rendering -------------------------------------------------------------------------------


def _stamp(unix: float) -> str:
    return dt.datetime.fromtimestamp(unix, dt.UTC).strftime("%Y-%m-%d %H:%M")


def _number(value: float) -> str:
    return f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"


def render_usage(report: dict[str, Any]) -> str:
    rows = report["rows"]
    head = f"usage {_stamp(report['since'])} .. {_stamp(report['until'])} UTC, cost in {report['currency']}"
    if not rows:
        return head + "\nno usage in this window"
    dims = [DIMS[g] for g in report["group_by"]]
    values = [*COUNTS, *(m for m in MEDIA if any(r[m] for r in rows))]
    shadow = any(r["shadow"] for r in rows)
    header = [d.removesuffix("_id").upper() for d in dims] or [""]
    header += ["SHADOW"] if shadow else []
    header += [*(c.replace("_", " ").upper() for c in values), "COST"]

    def figures(r: dict[str, Any]) -> list[str]:
        return [*(_number(r[c]) for c in values), f"{r['cost_usd']:.6f}"]

    body = []
    for r in rows:
        label = [_label(d, r[d]) for d in dims] or [""]
        body.append([*label, *(["yes" if r["shadow"] else ""] if shadow else []), *figures(r)])
    labels = len(header) - len(values) - 1
    total = ["TOTAL", *[""] * (labels - 1), *figures(report["totals"])]
    return head + "\n" + table([header, *body, total])


def _label(dim: str, value: Any) -> str:
    if dim == "batch":
        return "batch" if value else "interactive"
    return str(value) if value != "" else "-"


def render_csv(report: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    dims = [DIMS[g] for g in report["group_by"]]
    columns = [*dims, "shadow", *COUNTS, *MEDIA, "cost_usd"]
    writer.writerow(columns)
    for r in report["rows"]:
        writer.writerow([str(r[c]).lower() if c in FLAGS else r[c] for c in columns])
    return out.getvalue().rstrip("\n")


def render_prices(result: Any) -> str:
    if isinstance(result, dict):
        result = [result]
    if not result:
        return "no prices set: usage is recorded at cost 0"
    rows = [
        ["MODEL", "VERSION", "INPUT /1M", "OUTPUT /1M", "AUDIO /S", "IMAGE", "BATCH OFF", "CURRENCY", "UPDATED", "BY"]
    ]
    for p in result:
        rows.append(
            [
                p["model"],
                p["version"],
                f"{p['input_per_1m']:g}",
                f"{p['output_per_1m']:g}",
                f"{p['per_audio_second']:g}",
                f"{p['per_image']:g}",
                f"{p.get('batch_discount', 0.0):.0%}",
                p["currency"],
                p["updated_at"][:19],
                p["updated_by"],
            ]
        )
    return table(rows)


def render_dead_letters(report: dict[str, Any]) -> str:
    letters = report["letters"]
    if not letters:
        return "no dead letters: every usage message reached the ledger"
    rows = [["TIME", "REASON", "SUBJECT", "STREAM SEQ", "REQUEST", "DETAIL"]]
    for d in letters:
        detail = d["detail"] if len(d["detail"]) <= 80 else d["detail"][:77] + "..."
        rows.append(
            [d["time"][:19], d["reason"], d["subject"], str(d["stream_seq"]), d.get("request_id") or "-", detail]
        )
    shown = f"{len(letters)} of {report['total']}" if report["total"] > len(letters) else str(len(letters))
    return f"{shown} dead letters in {usage.DLQ_STREAM} (newest first)\n" + table(rows)
