"""`inferbus batch ...`: submit a JSONL file and watch it run, list, show, cancel, fetch results; webhooks.

Batches belong to an API key's tenant, so these speak the gateway's OpenAI API (the key: `--api-key`,
INFERBUS_API_KEY, or the admin key `inferbus up` keeps in its data directory; the URL: INFERBUS_GATEWAY_URL
or `inferbus up`'s). Webhook secrets and the delivery log are the operator's: over NATS, as the admin role.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import aiohttp

from contracts import subjects
from contracts.batch import ENDPOINTS, TERMINAL, KeyRef, ListDeliveries, SetWebhook
from services.cli import admin, state
from services.cli.admin import table


class ApiError(Exception):
    pass


def add_parser(sub: Any) -> None:
    p = sub.add_parser("batch", aliases=["batches"], help="batch jobs: submit JSONL files, watch, fetch results")
    p.add_argument("--api-key", help="the key batches run under (default: INFERBUS_API_KEY, else the admin key)")
    ops = p.add_subparsers(dest="batch_command", required=True)
    s = ops.add_parser("submit", help="upload a JSONL file of requests and start a batch")
    s.add_argument("file", help="the requests, one JSON object per line (OpenAI's batch input format)")
    s.add_argument("--endpoint", default="/v1/chat/completions", choices=ENDPOINTS)
    s.add_argument("--window", default="24h", help="completion window (default 24h)")
    s.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                   help="batch metadata (repeatable); webhook_url=URL sends its webhook there")
    s.add_argument("--wait", action="store_true", help="show progress until the batch ends")
    s.add_argument("-o", "--output", help="with --wait: write the output file here when it completes")
    lst = ops.add_parser("list", help="batches, newest first")
    lst.add_argument("--limit", type=int, default=20)
    lst.add_argument("--json", action="store_true")
    for name, text in (("show", "one batch"), ("cancel", "stop a batch (finished lines stay in its output)")):
        q = ops.add_parser(name, help=text)
        q.add_argument("batch_id")
        q.add_argument("--json", action="store_true")
    w = ops.add_parser("wait", help="show a batch's progress until it ends")
    w.add_argument("batch_id")
    r = ops.add_parser("results", help="a batch's output file (or --errors: its error file)")
    r.add_argument("batch_id")
    r.add_argument("-o", "--output", help="write it here (default: standard output)")
    r.add_argument("--errors", action="store_true")
    d = ops.add_parser("deliveries", help="webhook deliveries, newest first (operator)")
    d.add_argument("--batch", help="only this batch's")
    d.add_argument("--limit", type=int, default=50)
    d.add_argument("--json", action="store_true")
    hooks = ops.add_parser("webhooks", help="per-key webhook endpoints and signing secrets (operator)")
    hook_ops = hooks.add_subparsers(dest="webhook_command", required=True)
    hs = hook_ops.add_parser("set", help="set a key's webhook URL; makes its signing secret (shown once)")
    hs.add_argument("key_id")
    hs.add_argument("--url", help="where its batches' events go (a batch's metadata webhook_url overrides it)")
    hs.add_argument("--tenant", default="default", help="the key's tenant")
    hs.add_argument("--rotate", action="store_true", help="make a new signing secret")
    hl = hook_ops.add_parser("list", help="keys with webhooks")
    hl.add_argument("--key", help="only this key")
    hd = hook_ops.add_parser("delete", help="remove a key's webhook and secret")
    hd.add_argument("key_id")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    op = args.batch_command
    if op == "deliveries":
        if not 1 <= args.limit <= 1000:
            parser.error("--limit must be between 1 and 1000")
        body = ListDeliveries(batch_id=args.batch, limit=args.limit)
        return admin.run(subjects.batch_admin("deliveries.list"), body, render_deliveries, args.json, "batch service")
    if op == "webhooks":
        return _webhooks(args)
    try:
        with contextlib.ExitStack() as files:  # opened here: the async code only streams through them
            source = files.enter_context(Path(args.file).open("rb")) if op == "submit" else None
            out = getattr(args, "output", None)
            sink = files.enter_context(Path(out).open("wb")) if out else sys.stdout.buffer
            return asyncio.run(_http(args, source, sink))
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"error: no such file: {exc.filename}", file=sys.stderr)
        return 1
    except (aiohttp.ClientError, OSError) as exc:
        print(f"error: cannot reach the gateway ({exc}). Is `inferbus up` running?", file=sys.stderr)
        return 2


def _webhooks(args: argparse.Namespace) -> int:
    what = args.webhook_command
    subject = subjects.batch_admin(f"webhooks.{what}")
    if what == "set":
        body: Any = SetWebhook(key_id=args.key_id, tenant_id=args.tenant, url=args.url, rotate=args.rotate)
        return admin.run(subject, body, _render_hook, False, "batch service")
    if what == "list":
        return admin.run(subject, KeyRef(key_id=args.key), _render_hooks, False, "batch service")
    return admin.run(subject, KeyRef(key_id=args.key_id), lambda ok: "deleted" if ok else "no such webhook", False,
                     "batch service")


def _render_hook(view: dict[str, Any]) -> str:
    lines = [f"key {view['key_id']} (tenant {view['tenant_id']}): {view['url'] or 'no default URL'}"]
    if view.get("secret"):
        lines.append(f"signing secret (shown once): {view['secret']}")
    return "\n".join(lines)


def _render_hooks(views: list[dict[str, Any]]) -> str:
    if not views:
        return "no webhooks"
    return table([["KEY", "TENANT", "URL", "SINCE"]] +
                 [[v["key_id"], v["tenant_id"], v["url"] or "-", v["created_at"][:19]] for v in views])


def render_deliveries(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no webhook deliveries"
    body = [[r["created_at"][:19], r["event_id"], r["type"], r["batch_id"], r["status"], str(r["attempts"]),
             str(r["last_status"] or "-"), (r["last_error"] or "")[:60]] for r in rows]
    return table([["TIME", "EVENT", "TYPE", "BATCH", "STATUS", "TRIES", "HTTP", "LAST ERROR"], *body])


# ---- the OpenAI API, over HTTP --------------------------------------------------------------------


def _key(args: argparse.Namespace) -> str:
    key = args.api_key or os.environ.get("INFERBUS_API_KEY")
    if key:
        return str(key)
    path = state.data_dir() / "secrets" / "admin-key"
    if path.exists():
        return path.read_text().strip()
    raise ApiError("no API key: pass --api-key or set INFERBUS_API_KEY")


def _url() -> str:
    return (os.environ.get("INFERBUS_GATEWAY_URL") or state.read().get("gateway_url") or "http://127.0.0.1:8080")


class Client:
    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url.rstrip("/") + "/v1"

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        async with self.http.request(method, self.url + path, **kwargs) as resp:
            body = await resp.read()
            if resp.status >= 400:
                try:
                    error = json.loads(body)["error"]
                    raise ApiError(f"{error.get('message')} ({error.get('code')}, HTTP {resp.status})")
                except (ValueError, KeyError, TypeError):
                    raise ApiError(f"HTTP {resp.status}: {body[:200]!r}") from None
            return json.loads(body)

    async def download(self, file_id: str, sink: BinaryIO) -> int:
        async with self.http.get(f"{self.url}/files/{file_id}/content") as resp:
            if resp.status >= 400:
                raise ApiError(f"the file could not be read: HTTP {resp.status}")
            size = 0
            async for chunk in resp.content.iter_chunked(1 << 16):
                sink.write(chunk)
                size += len(chunk)
            sink.flush()
            return size


async def _http(args: argparse.Namespace, source: BinaryIO | None, sink: BinaryIO) -> int:
    headers = {"Authorization": f"Bearer {_key(args)}"}
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=None, sock_read=120)) as h:
        api = Client(h, _url())
        op = args.batch_command
        if op == "submit":
            assert source is not None
            return await _submit(api, args, source, sink)
        if op == "list":
            page = await api.call("GET", "/batches", params={"limit": str(args.limit)})
            print(json.dumps(page, indent=2) if args.json else render_batches(page["data"]))
            return 0
        if op == "show":
            batch = await api.call("GET", f"/batches/{args.batch_id}")
            print(json.dumps(batch, indent=2) if args.json else render_batch(batch))
            return 0
        if op == "cancel":
            batch = await api.call("POST", f"/batches/{args.batch_id}/cancel")
            print(json.dumps(batch, indent=2) if args.json else render_batch(batch))
            return 0
        if op == "wait":
            batch = await watch(api, args.batch_id, sys.stderr)
            print(render_batch(batch))
            return 0 if batch["status"] == "completed" else 1
        batch = await api.call("GET", f"/batches/{args.batch_id}")
        file_id = batch["error_file_id"] if args.errors else batch["output_file_id"]
        if not file_id:
            raise ApiError(f"batch {args.batch_id} has no {'error' if args.errors else 'output'} file"
                           f" (status {batch['status']})")
        size = await api.download(file_id, sink)
        if args.output:
            print(f"{size} bytes written to {args.output}", file=sys.stderr)
        return 0


async def _submit(api: Client, args: argparse.Namespace, source: BinaryIO, sink: BinaryIO) -> int:
    name = Path(args.file).name
    metadata: dict[str, str] = {}
    for item in args.metadata:
        key, sep, value = item.partition("=")
        if not sep:
            raise ApiError(f"--metadata takes KEY=VALUE, not {item!r}")
        metadata[key] = value
    form = aiohttp.FormData()  # the file is streamed from disk by aiohttp, never read whole
    form.add_field("purpose", "batch")
    form.add_field("file", source, filename=name, content_type="application/jsonl")
    uploaded = await api.call("POST", "/files", data=form)
    print(f"uploaded {name}: {uploaded['id']} ({uploaded['bytes']} bytes)", file=sys.stderr)
    body: dict[str, Any] = {"input_file_id": uploaded["id"], "endpoint": args.endpoint,
                            "completion_window": args.window}
    if metadata:
        body["metadata"] = metadata
    batch = await api.call("POST", "/batches", json=body)
    print(batch["id"])
    if not args.wait:
        return 0
    batch = await watch(api, batch["id"], sys.stderr)
    print(render_batch(batch), file=sys.stderr)
    if args.output and batch.get("output_file_id"):
        size = await api.download(batch["output_file_id"], sink)
        print(f"output: {size} bytes written to {args.output}", file=sys.stderr)
    return 0 if batch["status"] == "completed" else 1


async def watch(api: Client, batch_id: str, out: TextIO, every_s: float = 0.5) -> dict[str, Any]:
    """Poll until the batch ends, drawing a progress bar (in place on a terminal, a line every 5 s otherwise)."""
    progress = Progress(out)
    while True:
        batch = await api.call("GET", f"/batches/{batch_id}")
        progress.show(batch)
        if batch["status"] in TERMINAL:
            progress.close()
            return dict(batch)
        await asyncio.sleep(every_s)


class Progress:
    """Lines done and failed, the rate (moving average) and the time left."""

    WIDTH = 30

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.last: tuple[float, int] | None = None
        self.rate = 0.0
        self.printed = 0.0

    def show(self, batch: dict[str, Any]) -> None:
        counts = batch.get("request_counts") or {}
        total, ok, failed = counts.get("total", 0), counts.get("completed", 0), counts.get("failed", 0)
        done = ok + failed
        now = time.monotonic()
        if self.last is not None and now > self.last[0]:
            instant = (done - self.last[1]) / (now - self.last[0])
            self.rate = instant if self.rate == 0 else 0.7 * self.rate + 0.3 * instant
        self.last = (now, done)
        filled = int(self.WIDTH * done / total) if total else 0
        eta = f"{(total - done) / self.rate:,.0f}s" if self.rate > 0 and total > done else "-"
        line = (f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {batch['status']:<11} {done:,}/{total:,} done"
                f" ({failed:,} failed)  {self.rate:,.1f} lines/s  ETA {eta}")
        if self.tty:
            self.out.write("\r" + line + "\x1b[K")
            self.out.flush()
        elif now - self.printed >= 5.0 or batch["status"] in TERMINAL:
            self.printed = now
            print(line, file=self.out, flush=True)

    def close(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()


def _when(unix: int | None) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%S") if unix else "-"


def render_batches(batches: list[dict[str, Any]]) -> str:
    if not batches:
        return "no batches"
    rows = [["BATCH", "STATUS", "ENDPOINT", "DONE", "FAILED", "TOTAL", "CREATED (UTC)"]]
    for b in batches:
        c = b.get("request_counts") or {}
        rows.append([b["id"], b["status"], b["endpoint"], str(c.get("completed", 0)), str(c.get("failed", 0)),
                     str(c.get("total", 0)), _when(b["created_at"])])
    return table(rows)


def render_batch(b: dict[str, Any]) -> str:
    c = b.get("request_counts") or {}
    lines = [
        f"{b['id']}  {b['status']}  {b['endpoint']}  window {b['completion_window']}",
        f"  requests   {c.get('total', 0)} total, {c.get('completed', 0)} completed, {c.get('failed', 0)} failed",
        f"  input      {b['input_file_id']}",
        f"  output     {b.get('output_file_id') or '-'}",
        f"  errors     {b.get('error_file_id') or '-'}",
        f"  created    {_when(b['created_at'])}   expires {_when(b.get('expires_at'))}",
    ]
    for name in ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
                 "cancelled_at"):
        if b.get(name):
            lines.append(f"  {name[:-3]:<10} {_when(b[name])}")
    if b.get("usage"):
        u = b["usage"]
        lines.append(f"  tokens     {u['input_tokens']} in, {u['output_tokens']} out")
    if b.get("metadata"):
        lines.append(f"  metadata   {json.dumps(b['metadata'])}")
    for e in ((b.get("errors") or {}).get("data") or [])[:20]:
        where = f"line {e['line']}" if e.get("line") else "file"
        param = f" [{e['param']}]" if e.get("param") else ""
        lines.append(f"  error      {where}: {e['code']}: {e['message']}{param}")
    return "\n".join(lines)
