"""Frame fuzz on /v1/ws and /v1/realtime: every bad frame gets an error event or a close, nothing crashes.

Seeded and bounded (a few hundred frames): random bytes and text, binary frames, deep nesting, frames over
the size limit, bad base64 audio, and every client event type with each of its fields given a wrong type
or value. Afterwards the gateway's log holds no unhandled exception and both endpoints still serve.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import random
import string
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from services.runtime.local import EmbeddedStack
from tests.conftest import ADMIN_KEY, BENCH_MODEL, Gateway, running_gateway

SEED = 20_240_611
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
CRASH_MARKS = ("Traceback", "Task exception was never retrieved", "Error handling request", "unhandled_error")

WS_REQUEST: dict[str, Any] = {
    "type": "request", "id": "r1", "endpoint": "chat.completions",
    "body": {"model": BENCH_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
}
# Values each field of WS_REQUEST must refuse (its own type's wrong values come from `wrong_values`).
WS_BAD: dict[str, list[Any]] = {
    "type": ["bogus", None], "endpoint": ["embeddings"], "body.messages": [[]],
    "body.messages.0.role": ["wizard"], "body.max_tokens": [0, -3, 10**30], "body.seed": [10**30, -(10**30)],
}

TURN_DETECTION = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500,
                  "create_response": True, "interrupt_response": True}
PCM_FORMAT = {"type": "audio/pcm", "rate": 24000}
REALTIME_EVENTS: dict[str, dict[str, Any]] = {
    "session.update": {"session": {
        "type": "realtime", "instructions": "Be brief.", "output_modalities": ["text"], "max_output_tokens": 10,
        "audio": {
            "input": {"format": PCM_FORMAT, "transcription": {"model": "whisper-1", "language": "en", "prompt": "p"},
                      "turn_detection": TURN_DETECTION},
            "output": {"format": PCM_FORMAT, "voice": "alloy", "model": "hibari"},
        },
    }},
    "input_audio_buffer.append": {"audio": base64.b64encode(bytes(960)).decode()},
    "input_audio_buffer.commit": {},
    "input_audio_buffer.clear": {},
    "conversation.item.create": {"item": {"id": "item_1", "type": "message", "role": "user",
                                          "content": [{"type": "input_text", "text": "hi"}]}},
    "response.create": {"response": {"output_modalities": ["text"], "instructions": "x", "max_output_tokens": 5,
                                     "conversation": "auto"}},
    "response.cancel": {"response_id": "resp_1"},
}
REALTIME_BAD: dict[str, list[Any]] = {
    "session.max_output_tokens": [0, 5000, "infinite"], "session.type": ["bogus"],
    "session.output_modalities": [[], ["video"]], "session.audio.input.turn_detection.threshold": [1.5, -1],
    "session.audio.input.turn_detection.prefix_padding_ms": [-1], "session.audio.input.format.type": ["audio/pcmu"],
    "session.audio.input.format.rate": [16000], "item.role": ["wizard"], "item.type": ["function_call"],
    "item.content.0.type": ["video"], "response.max_output_tokens": [0, "infinite"],
    "audio": ["%%% not base64", "YWJj=", base64.b64encode(b"odd").decode()],
}


def wrong_values(value: Any) -> list[Any]:
    """JSON values of another type than `value` (never null: many fields may be null)."""
    if isinstance(value, bool):
        return ["true", 1, [], {}]
    if isinstance(value, int):
        return ["1", True, 1.5, [], {}]
    if isinstance(value, float):
        return ["0.5", True, [], {}]
    if isinstance(value, str):
        return [1, 2.5, False, [], {"a": 1}, ["x"]]
    if isinstance(value, list):
        return ["x", 1, {}, True]
    return ["x", 1, [], True]


def leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from leaves(v, f"{path}.{k}" if path else k)
    elif isinstance(value, list) and value:
        for i, v in enumerate(value):
            yield from leaves(v, f"{path}.{i}")
    if path:
        yield path, value


def with_value(event: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(event)
    *parents, last = path.split(".")
    node: Any = out
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


def mutations(event: dict[str, Any], bad: dict[str, list[Any]], rnd: random.Random) -> Iterator[dict[str, Any]]:
    """`event` with one field wrong, for every field: a wrong type, and the listed bad values."""
    for path, value in leaves(event):
        if path == "type":
            continue
        picks = rnd.sample(wrong_values(value), 3) + bad.get(path, [])
        for wrong in picks:
            yield with_value(event, path, wrong)


def noise(rnd: random.Random) -> Iterator[str | bytes]:
    alphabet = string.printable + "é€😀\u0000\u2028{}[]\":,"
    for _ in range(40):
        yield rnd.randbytes(rnd.randint(1, 3000))
        yield "".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 400)))
    for depth in (64, 1_000, 100_000):
        yield "[" * depth + "]" * depth
        yield '{"type": "session.update", "session": ' + '{"a": ' * depth + "1" + "}" * depth + "}"
        yield '{"type": "request", "id": "deep", "body": ' + "[" * depth + "]" * depth + "}"
    yield json.dumps({"type": "request", "id": "big", "body": {"model": "m", "max_tokens": 10**400}})
    yield "null"
    yield "[]"
    yield '{"type": 7}'
    yield "{}"


@pytest.fixture(scope="module")
async def fuzzed(infra: EmbeddedStack) -> AsyncIterator[Gateway]:
    """A gateway of this module's own, so its log holds only what the fuzz did to it."""
    async with running_gateway(infra) as gw:
        yield gw


class Prober:
    """One endpoint: send a frame, expect an error event or a close (then open a fresh socket)."""

    def __init__(
        self, http: aiohttp.ClientSession, url: str, greeting: str | None, key: str | None = ADMIN_KEY
    ) -> None:
        self.http = http
        self.url = url
        self.greeting = greeting
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.errors = self.closes = 0

    async def socket(self) -> aiohttp.ClientWebSocketResponse:
        if self.ws is None or self.ws.closed:
            self.ws = await self.http.ws_connect(self.url, headers=self.headers, max_msg_size=0)
            if self.greeting:
                first = await self.ws.receive_json(timeout=10)
                assert first["type"] == self.greeting, first
        return self.ws

    async def probe(self, frame: str | bytes | dict[str, Any]) -> None:
        ws = await self.socket()
        try:
            if isinstance(frame, dict):
                await ws.send_json(frame)
            elif isinstance(frame, bytes):
                await ws.send_bytes(frame)
            else:
                await ws.send_str(frame)
        except ConnectionError:  # the server closed it while the frame went out: that is an answer too
            self.closes += 1
            await ws.close()
            return
        msg = await ws.receive(timeout=10)
        if msg.type == aiohttp.WSMsgType.TEXT:
            event = json.loads(msg.data)
            assert event["type"] == "error", (str(frame)[:300], event)
            self.errors += 1
        else:
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), (str(frame)[:300], msg)
            self.closes += 1
            await ws.close()


async def test_fuzzed_frames_get_errors_or_closes_and_the_gateway_keeps_serving(
    fuzzed: Gateway, bench_worker: dict[str, Any]
) -> None:
    rnd = random.Random(SEED)
    log_start = len(fuzzed.proc.log())
    ws_url = fuzzed.url.replace("http", "ws", 1)
    async with aiohttp.ClientSession() as http:
        chat = Prober(http, f"{ws_url}/v1/ws", None)
        voice = Prober(http, f"{ws_url}/v1/realtime?model={BENCH_MODEL}", "session.created")
        anonymous = Prober(http, f"{ws_url}/v1/ws", None, key=None)  # not authenticated (yet)
        frames: list[tuple[Prober, Any]] = []
        for frame in noise(rnd):
            frames += [(chat, frame), (voice, frame), (anonymous, frame)]
        for m in mutations(WS_REQUEST, WS_BAD, rnd):
            frames += [(chat, m), (anonymous, m)]
        frames += [(anonymous, {"type": "auth", "api_key": "ib-wrong-" + str(i)}) for i in range(7)]
        frames += [(chat, {"type": "cancel", "id": "nothing-running"}), (chat, {"type": "auth", "api_key": 42})]
        for kind, fields in REALTIME_EVENTS.items():
            event = {"type": kind, **fields}
            frames += [(voice, m) for m in mutations(event, REALTIME_BAD, rnd)]
            frames += [(voice, {**event, "event_id": wrong}) for wrong in (7, ["e"], "e" * 500)]
        frames += [(voice, {"type": "input_audio_buffer.commit"}), (voice, {"type": "response.cancel"})]
        over = "x" * (5 << 20)  # over both endpoints' frame limit
        frames += [(chat, over), (voice, over), (voice, json.dumps({"type": "input_audio_buffer.append",
                                                                    "audio": "A" * (5 << 20)}))]
        rnd.shuffle(frames)
        for prober, frame in frames:
            await prober.probe(frame)
        assert chat.errors > 100 and voice.errors > 200 and anonymous.errors > 100
        assert chat.closes >= 1 and voice.closes >= 1 and anonymous.closes >= 2  # over the size / auth limits
        assert len(frames) < 1000  # bounded: the module stays well under a minute

        # Still serving: a chat request on /v1/ws, and a text response on /v1/realtime.
        ws = await http.ws_connect(f"{ws_url}/v1/ws", headers=AUTH)
        await ws.send_json({**WS_REQUEST, "id": "after"})
        async with asyncio.timeout(10):
            while (event := await ws.receive_json())["type"] != "done":
                assert event["type"] in ("accepted", "delta"), event
        await ws.close()
        rt = await http.ws_connect(f"{ws_url}/v1/realtime?model={BENCH_MODEL}", headers=AUTH)
        assert (await rt.receive_json(timeout=10))["type"] == "session.created"
        await rt.send_json({"type": "conversation.item.create", **REALTIME_EVENTS["conversation.item.create"]})
        await rt.send_json({"type": "response.create", **REALTIME_EVENTS["response.create"]})
        async with asyncio.timeout(10):
            while (event := await rt.receive_json())["type"] != "response.done":
                assert event["type"] != "error", event
        assert event["response"]["status"] == "completed", event
        await rt.close()
    log = fuzzed.proc.log()[log_start:]
    for mark in CRASH_MARKS:
        assert mark not in log, log[max(log.find(mark) - 2000, 0) : log.find(mark) + 2000]
