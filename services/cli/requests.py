"""`inferbus requests ...`: the request log, newest first, a page at a time."""

from __future__ import annotations

import argparse
import time
from typing import Any

from contracts.requestlog import MAX_LIMIT, REQUESTS_QUERY, RequestQuery
from services.cli import admin
from services.cli.admin import table
from services.cli.usage import moment


def add_parser(sub: Any) -> None:
    p = sub.add_parser("requests", help="the request log: one row per request the edge served, newest first")
    p.add_argument("--key", help="only this API key id")
    p.add_argument("--tenant", help="only this tenant")
    p.add_argument("--model", help="only this model (as the client asked for it)")
    p.add_argument("--status", choices=("ok", "error"), help="only requests that ended so")
    p.add_argument("--code", help="only requests that failed with this error code")
    p.add_argument("--since", help="start: a duration ago (90m, 24h) or a UTC date[/time]")
    p.add_argument("--until", help="end: a duration ago or a UTC date[/time]")
    p.add_argument("--limit", type=int, default=50, help=f"rows per page (default 50, at most {MAX_LIMIT})")
    p.add_argument("--cursor", help="the next page: the cursor the previous page printed")
    p.add_argument("--bodies", action="store_true", help="show the stored request and response bodies")
    p.add_argument("--json", action="store_true", help="print the metering service's reply as JSON")


def build(args: argparse.Namespace, now: float | None = None) -> RequestQuery:
    """The query for parsed arguments (argument errors raise ValueError)."""
    now = time.time() if now is None else now
    if not 1 <= args.limit <= MAX_LIMIT:
        raise ValueError(f"--limit must be between 1 and {MAX_LIMIT}")
    return RequestQuery(
        key_id=args.key,
        tenant_id=args.tenant,
        model=args.model,
        status=args.status,
        error_code=args.code,
        since=moment(args.since, now) if args.since else None,
        until=moment(args.until, now) if args.until else None,
        limit=args.limit,
        cursor=args.cursor,
        include_bodies=args.bodies,
    )


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        body = build(args)
    except ValueError as exc:
        parser.error(str(exc))
    return admin.run(REQUESTS_QUERY, body, render, args.json, "metering service")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _served(r: dict[str, Any]) -> str:
    target = f"{r['model']}:{r['version']}" if r["version"] else r["model"]
    tried = [f"{f['target']}({f['code']})" for f in r["fallbacks"]]
    return " <- ".join([target, *tried])


def render(page: dict[str, Any]) -> str:
    rows = page["data"]
    if not rows:
        return "no requests logged match"
    header = ["TIME", "REQUEST", "KEY", "MODEL (<- FALLBACKS)", "PROVIDER", "STATUS", "HTTP", "TRIES", "MS", "TTFT",
              "TOKENS", "STREAM"]
    body = []
    for r in rows:
        status = r["status"] if r["status"] == "ok" else r["error_code"] or "error"
        body.append([
            r["time"][:23].replace("T", " "), r["request_id"], r["key_id"] or "-", _served(r), r["provider"] or "-",
            status, str(r["http_status"]), str(r["attempts"]), _ms(r["latency_ms"]), _ms(r["ttft_ms"]),
            f"{r['prompt_tokens']}/{r['completion_tokens']}", "yes" if r["streamed"] else "",
        ])
    out = [table([header, *body])]
    for r in rows:
        if r.get("request_body") is not None or r.get("response_body") is not None:
            cut = " (truncated)" if r["bodies_truncated"] else ""
            out.append(f"\n{r['request_id']} request{cut}:\n{r['request_body'] or '-'}")
            out.append(f"{r['request_id']} response{cut}:\n{r['response_body'] or '-'}")
    cursor = page.get("next_cursor")
    out.append(f"\nnext page: --cursor {cursor}" if cursor else f"\n{len(rows)} requests (last page)")
    return "\n".join(out)
