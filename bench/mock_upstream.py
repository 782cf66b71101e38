#!/usr/bin/env python
"""A fast mock OpenAI upstream for bench/bench_providers.py: raw asyncio, HTTP/1.1 keep-alive, no framework.

    python bench/mock_upstream.py --port 8100 [--api-key sk-mock] [--writes 1]

Answers
  - POST /v1/chat/completions: a fixed chat.completion of `max_tokens` tokens (16 by default) with usage, or,
    with `"stream": true`, one chat.completion.chunk event per token (`max_tokens` of them, 32 by default; the
    first with the role), a finish chunk, a usage chunk when `stream_options.include_usage` is set (as OpenAI
    does), and `data: [DONE]`, as SSE in chunked transfer encoding, written in `--writes` writes (1: the whole
    response at once);
  - GET /v1/models: one model, `mock`;
  - anything else: 404 with an OpenAI error body; 401 when `--api-key` is set and the request lacks it.

Requests are parsed from a buffer, so pipelined requests and requests split over many reads both work;
Content-Length and chunked request bodies are read; `Connection: close` (and HTTP/1.0 without keep-alive) close
after the response. Answers are pre-encoded: the server does as little as a server can per request. uvloop when
importable. One JSON line on stdout when listening.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from typing import Any, cast

try:
    import uvloop
except ImportError:  # asyncio's own loop then
    uvloop = None  # type: ignore[assignment]

STREAM_PIECES = 32
MAX_HEAD = 64 * 1024
MAX_BODY = 8 * 1024 * 1024
CREATED = int(time.time())
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
           413: "Payload Too Large"}


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def response(status: int, body: bytes, content_type: bytes = b"application/json", close: bool = False) -> bytes:
    return b"".join([
        b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, "Error").encode()),
        b"Content-Type: " + content_type + b"\r\n",
        b"Content-Length: %d\r\n" % len(body),
        b"Connection: close\r\n" if close else b"",
        b"\r\n",
        body,
    ])


def error(status: int, message: str, code: str) -> bytes:
    return _json({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}})


def completion(model: str, tokens: int) -> bytes:
    return _json({
        "id": "chatcmpl-mock", "object": "chat.completion", "created": CREATED, "model": model,
        "system_fingerprint": "mock",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": " tok" * tokens}, "logprobs": None,
                     "finish_reason": "length"}],
        "usage": {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens},
    })


def _event(payload: bytes) -> bytes:
    data = b"data: " + payload + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)  # one SSE event, one HTTP chunk


def stream_events(model: str, tokens: int, usage: bool) -> list[bytes]:
    """The SSE events of one stream, each already framed as an HTTP chunk, then the last chunk."""

    def chunk(choices: list[Any], **extra: Any) -> bytes:
        return _json({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": CREATED, "model": model,
                      "system_fingerprint": "mock", "choices": choices, **extra})

    events = []
    for i in range(tokens):
        delta = {"role": "assistant", "content": " tok"} if i == 0 else {"content": " tok"}
        events.append(_event(chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])))
    events.append(_event(chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}])))
    if usage:
        events.append(_event(chunk([], usage={"prompt_tokens": 8, "completion_tokens": tokens,
                                             "total_tokens": 8 + tokens})))
    events.append(_event(b"[DONE]"))
    events.append(b"0\r\n\r\n")
    return events


STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
               b"Transfer-Encoding: chunked\r\n")


class Answers:
    """Every answer the server gives, encoded once (per model name and write split)."""

    def __init__(self, api_key: str, writes: int) -> None:
        self.auth = b"bearer " + api_key.encode().lower() if api_key else b""
        self.writes = max(1, writes)
        self._json: dict[tuple[str, int], bytes] = {}
        self._streams: dict[tuple[str, int, bool, bool], list[bytes]] = {}
        self.models = response(200, _json({"object": "list", "data": [
            {"id": "mock", "object": "model", "created": CREATED, "owned_by": "mock"}]}))

    def completion(self, model: str, tokens: int, close: bool) -> list[bytes]:
        key = (model, tokens)
        body = self._json.get(key)
        if body is None:
            body = self._json[key] = completion(model, tokens) if len(self._json) < 1024 else completion(model, 16)
        return [response(200, body, close=close)]

    def stream(self, model: str, tokens: int, usage: bool, close: bool) -> list[bytes]:
        key = (model, tokens, usage, close)
        parts = self._streams.get(key)
        if parts is None:
            head = STREAM_HEAD + (b"Connection: close\r\n" if close else b"") + b"\r\n"
            events = stream_events(model, tokens, usage)
            n = min(self.writes, len(events))
            step = -(-len(events) // n)
            parts = [b"".join(events[i:i + step]) for i in range(0, len(events), step)]
            parts[0] = head + parts[0]
            if len(self._streams) < 1024:
                self._streams[key] = parts
        return parts


class Request:
    __slots__ = ("body", "close", "headers", "method", "path")

    def __init__(self, method: bytes, path: bytes, headers: dict[bytes, bytes], body: bytes, close: bool) -> None:
        self.method, self.path, self.headers, self.body, self.close = method, path, headers, body, close


class BadRequest(Exception):
    pass


def parse(buf: bytearray) -> tuple[Request, int] | None:
    """The first whole request in `buf` and its length in bytes; None while it is incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise BadRequest("request head too large")
        return None
    lines = bytes(buf[:end]).split(b"\r\n")
    try:
        method, path, version = lines[0].split(b" ", 2)
    except ValueError:
        raise BadRequest("malformed request line") from None
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise BadRequest("malformed header line")
        headers[name.strip().lower()] = value.strip()
    conn = headers.get(b"connection", b"").lower()
    close = conn == b"close" or (version == b"HTTP/1.0" and conn != b"keep-alive")
    start = end + 4
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        body, used = dechunk(buf, start)
        if body is None:
            return None
        return Request(method, path, headers, body, close), used
    try:
        length = int(headers.get(b"content-length", b"0"))
    except ValueError:
        raise BadRequest("malformed Content-Length") from None
    if length < 0 or length > MAX_BODY:
        raise BadRequest("bad Content-Length")
    if len(buf) < start + length:
        return None
    return Request(method, path, headers, bytes(buf[start:start + length]), close), start + length


def dechunk(buf: bytearray, pos: int) -> tuple[bytes | None, int]:
    """A chunked body starting at `pos`: (body, end offset), or (None, 0) while incomplete."""
    parts: list[bytes] = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None, 0
        try:
            size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
        except ValueError:
            raise BadRequest("malformed chunk size") from None
        if size == 0:
            trailer_end = buf.find(b"\r\n\r\n", eol)  # trailers (usually none) end with an empty line
            if buf[eol:eol + 4] == b"\r\n\r\n":
                return b"".join(parts), eol + 4
            if trailer_end < 0:
                return None, 0
            return b"".join(parts), trailer_end + 4
        if len(buf) < eol + 2 + size + 2:
            return None, 0
        parts.append(bytes(buf[eol + 2:eol + 2 + size]))
        pos = eol + 2 + size + 2
        if sum(map(len, parts)) > MAX_BODY:
            raise BadRequest("body too large")


class Upstream(asyncio.Protocol):
    answers: Answers

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.continued = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.transport is not None and self.buf:
            try:
                got = parse(self.buf)
            except BadRequest as exc:
                self.transport.write(response(400, error(400, str(exc), "bad_request"), close=True))
                self.transport.close()
                return
            if got is None:
                self._maybe_continue()
                return
            req, used = got
            del self.buf[:used]
            self.continued = False
            for part in self.answer(req):
                self.transport.write(part)
            if req.close:
                self.transport.close()
                return

    def _maybe_continue(self) -> None:
        if self.continued or self.transport is None:
            return
        end = self.buf.find(b"\r\n\r\n")
        if end >= 0 and b"expect: 100-continue" in bytes(self.buf[:end]).lower():
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.continued = True

    def answer(self, req: Request) -> list[bytes]:
        a = self.answers
        path = req.path.split(b"?", 1)[0].rstrip(b"/")
        if a.auth and req.headers.get(b"authorization", b"").lower() != a.auth:
            return [response(401, error(401, "Incorrect API key provided", "invalid_api_key"), close=req.close)]
        if path == b"/v1/chat/completions":
            if req.method != b"POST":
                return [response(405, error(405, "use POST", "method_not_allowed"), close=req.close)]
            try:
                body = json.loads(req.body)
                if not isinstance(body, dict):
                    raise ValueError("not an object")
            except ValueError:
                return [response(400, error(400, "the body is not a JSON object", "invalid_json"), close=req.close)]
            model = str(body.get("model") or "mock")[:200]
            stream = bool(body.get("stream"))
            tokens = body.get("max_tokens") or body.get("max_completion_tokens")
            if not (isinstance(tokens, int) and 0 < tokens <= 4096):
                tokens = STREAM_PIECES if stream else 16
            if stream:
                usage = bool((body.get("stream_options") or {}).get("include_usage"))
                return a.stream(model, tokens, usage, req.close)
            return a.completion(model, tokens, req.close)
        if path == b"/v1/models" and req.method == b"GET":
            return [a.models]
        return [response(404, error(404, f"no route {req.method.decode()} {req.path.decode()}", "not_found"),
                         close=req.close)]


async def serve(host: str, port: int, answers: Answers) -> None:
    Upstream.answers = answers
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Upstream, host, port, backlog=1024, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"level": "info", "event": "mock_upstream_listening", "host": host, "port": port,
                      "pid": os.getpid(), "loop": "uvloop" if uvloop is not None else "asyncio"}), flush=True)
    async with server:
        await stop.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--api-key", default="", help="require `Authorization: Bearer KEY` (default: any)")
    parser.add_argument("--writes", type=int, default=1, help="writes per streamed response (default 1: at once)")
    args = parser.parse_args()
    answers = Answers(args.api_key, args.writes)
    run = uvloop.run if uvloop is not None else asyncio.run
    run(serve(args.host, args.port, answers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
