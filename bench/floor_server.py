"""The floor for bench/bench_floor.py: a bare aiohttp handler in front of a bare nats-py responder.

    FLOOR_ROLE=handler FLOOR_NATS_URL=nats://... FLOOR_PORT=8099 python -m bench.floor_server
    FLOOR_ROLE=responder FLOOR_NATS_URL=nats://... python -m bench.floor_server

What our own stack needs at the least for one OpenAI-style request: the handler reads the POSTed JSON body,
decodes it, and makes one nats-py request/reply to the responder (`nc.request`, nats-py's muxed reply inbox);
the responder decodes the body and answers with a chat.completion JSON of about InferBus's size, which the
handler returns as the HTTP response. With `"stream": true` the handler publishes the body with a reply subject
on one wildcard inbox subscription of its own (requests told apart by the last token), the responder sends 32
chat.completion.chunk messages and an empty end marker to it, and the handler writes each chunk as an SSE event,
then `data: [DONE]`. No auth, no routing, no governance, no metering, no logging per request.

Both use uvloop when it is importable (say so in their start line). One JSON line at start, one at exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
import time
from typing import Any

import msgspec
import nats
from aiohttp import web

try:
    import uvloop
except ImportError:  # the floor runs on asyncio's own loop then
    uvloop = None  # type: ignore[assignment]

COMPLETE = "floor.complete"
STREAM = "floor.stream"
STREAM_PIECES = 32

_decode = msgspec.json.decode
_encode = msgspec.json.encode


def log(event: str, **fields: Any) -> None:
    print(json.dumps({"level": "info", "event": event, **fields}), flush=True)


# ---- the responder ------------------------------------------------------------------------------


def completion(req: dict[str, Any]) -> bytes:
    n = int(req.get("max_tokens") or 16)
    return _encode({
        "id": "chatcmpl-floor" + os.urandom(8).hex(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.get("model", ""),
        "system_fingerprint": "floor",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": " tok" * n},
            "logprobs": None,
            "finish_reason": "length",
        }],
        "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1},
    })


def chunk(rid: str, model: str, created: int, content: str, finish: str | None) -> bytes:
    return _encode({
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": "floor",
        "choices": [{"index": 0, "delta": {"content": content}, "logprobs": None, "finish_reason": finish}],
    })


async def responder(url: str, stop: asyncio.Event) -> None:
    nc = await nats.connect(url, name="floor-responder")

    async def on_complete(msg: Any) -> None:
        await msg.respond(completion(_decode(msg.data)))

    async def on_stream(msg: Any) -> None:
        req = _decode(msg.data)
        rid, model, created = "chatcmpl-floor" + os.urandom(8).hex(), req.get("model", ""), int(time.time())
        for i in range(STREAM_PIECES):
            finish = "length" if i == STREAM_PIECES - 1 else None
            await nc.publish(msg.reply, chunk(rid, model, created, " tok", finish))
        await nc.publish(msg.reply, b"")  # the end

    await nc.subscribe(COMPLETE, cb=on_complete)
    await nc.subscribe(STREAM, cb=on_stream)
    await nc.flush()
    log("floor responder ready", loop=loop_name(), pid=os.getpid())
    await stop.wait()
    await nc.drain()


# ---- the handler --------------------------------------------------------------------------------


async def handler(url: str, port: int, stop: asyncio.Event) -> None:
    nc = await nats.connect(url, name="floor-handler")
    prefix = nc.new_inbox() + "."
    streams: dict[str, asyncio.Queue[bytes]] = {}
    tokens = itertools.count()

    async def on_chunk(msg: Any) -> None:
        q = streams.get(msg.subject[len(prefix) :])
        if q is not None:
            q.put_nowait(msg.data)

    await nc.subscribe(prefix + "*", cb=on_chunk)

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        req = _decode(body)
        if not req.get("stream"):
            msg = await nc.request(COMPLETE, body, timeout=30)
            return web.Response(body=msg.data, content_type="application/json")
        token = str(next(tokens))
        q: asyncio.Queue[bytes] = asyncio.Queue()
        streams[token] = q
        try:
            await nc.publish(STREAM, body, reply=prefix + token)
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            try:
                await resp.prepare(request)
                async with asyncio.timeout(30):
                    while data := await q.get():
                        await resp.write(b"data: " + data + b"\n\n")
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
            except ConnectionResetError:  # the client left (wrk closes its connections at the end of a run)
                pass
            return resp
        finally:
            del streams[token]

    async def readyz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    log("floor handler ready", loop=loop_name(), pid=os.getpid(), port=port)
    await stop.wait()
    await runner.cleanup()
    await nc.drain()


def loop_name() -> str:
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


async def main() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    url = os.environ["FLOOR_NATS_URL"]
    role = os.environ["FLOOR_ROLE"]
    if role == "handler":
        await handler(url, int(os.environ["FLOOR_PORT"]), stop)
    elif role == "responder":
        await responder(url, stop)
    else:
        raise SystemExit(f"FLOOR_ROLE must be handler or responder, not {role!r}")
    log("floor stopped", role=role)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        if uvloop is not None:
            uvloop.run(main())
        else:
            asyncio.run(main())
    sys.exit(0)
