"""Admin requests from the command line: one request over NATS, a typed reply, an exit code."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Callable
from typing import Any

import msgspec

from contracts.control import Reply
from services.cli import state
from services.runtime import bus

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str) -> float:
    """'90s', '15m', '24h', '30d', '2w' (or plain seconds) in seconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 24h, 30d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


async def request(subject: str, body: msgspec.Struct, url: str | None = None, wait_s: float = 10.0) -> Reply:
    nc = await bus.connect(url or state.nats_url(), "inferbus-cli", connect_timeout=2,
                           identity=state.nats_identity(), reconnect=False)
    try:
        msg = await nc.request(subject, msgspec.json.encode(body), timeout=wait_s)
        return msgspec.json.decode(msg.data, type=Reply)
    finally:
        await nc.close()


def run(subject: str, body: msgspec.Struct, render: Callable[[Any], str], as_json: bool, service: str) -> int:
    """Send one admin request; print the result (rendered, or JSON) or the typed error. Exit code 0/1/2."""
    try:
        reply = asyncio.run(request(subject, body))
    except Exception as exc:
        print(f"error: the {service} did not answer ({type(exc).__name__}: {exc}). Is `inferbus up` running?",
              file=sys.stderr)
        return 2
    if reply.error is not None:
        where = f" [{reply.error.param}]" if reply.error.param else ""
        print(f"error ({reply.error.code}){where}: {reply.error.message}", file=sys.stderr)
        return 1
    print(json.dumps(reply.result, indent=2) if as_json else render(reply.result))
    return 0
