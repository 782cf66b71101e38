"""The Files and Batch APIs end to end: the openai SDK, validation, tenants, cancel, expiry, kills, webhooks, CLI.

The module runs a platform of its own (it kills nats-server): benchmark workers (two paced), a
gateway, metering and the batch service, with short timings (ack wait, sync, webhook backoff) so the
kill, cancel and expiry tests take seconds. An embedding worker and an image moderation worker start
only for the test of those endpoints' batches (fixture `other_kinds`).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import io
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
import openai
import pytest
from aiohttp import web
from openai import AsyncOpenAI

from contracts import subjects, usage
from contracts.batch import BATCH_HEADER, KeyRef, ListDeliveries, SetWebhook
from contracts.control import Reply, load_decoder
from contracts.errors import InferBusError
from contracts.llm import GenerateRequest
from contracts.usage import SetPrice
from services.batch.webhooks import check_url, verify
from services.runtime import bus
from services.runtime.embedded import free_port
from services.runtime.local import EmbeddedStack, ServiceProcess, settings_env, wait_service, wait_worker
from services.runtime.resp import Resp
from services.runtime.streaming import StreamClient
from tests.conftest import ADMIN_KEY, Gateway, running_gateway, stack_in_tempdir, start_gateway, start_worker

FAST = "batch-fast"  # benchmark engine, no pacing
SLOW = "batch-slow"  # benchmark engine, 50 tokens/s
NARROW = "batch-narrow"  # benchmark engine, 50 tokens/s, two slots: a batch line only while it is idle
BATCH_SETTINGS = {
    "ack_wait_s": 3.0, "sync_s": 0.3, "stop_grace_s": 0.3, "exec_silence_s": 2.0, "drain_s": 1.0,
    "completion_windows": ["24h", "4s"], "webhook_allow_private": True, "webhook_backoff_s": [0.3, 0.6, 1.0],
    "max_file_bytes": 4_000_000,
}
TERMINAL = ("completed", "failed", "cancelled", "expired")


class Platform:
    def __init__(self, stack: EmbeddedStack, nc: bus.Connection, gateway: Gateway) -> None:
        self.stack = stack
        self.nc = nc
        self.gateway = gateway
        self.procs: dict[str, ServiceProcess] = {}

    def api(self, key: str = ADMIN_KEY) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=self.gateway.url + "/v1", api_key=key, max_retries=0)

    def start_batch(self) -> ServiceProcess:
        env = self.stack.env(**settings_env(**BATCH_SETTINGS))
        self.procs["batch"] = ServiceProcess("batch", "services.batch", env, self.stack.root)
        return self.procs["batch"]

    async def admin(self, op: str, body: msgspec.Struct) -> Any:
        msg = await self.nc.request(subjects.batch_admin(op), msgspec.json.encode(body), timeout=5)
        reply = msgspec.json.decode(msg.data, type=Reply)
        assert reply.error is None, reply.error
        return reply.result

    async def new_key(
        self, tenant: str = "default", scopes: list[str] | None = None, budget: dict[str, float] | None = None
    ) -> tuple[str, str]:
        """A new API key (in `tenant`, made if missing): (key, key id)."""
        async with aiohttp.ClientSession(headers=self.gateway.headers) as http:
            if tenant != "default":
                async with http.post(self.gateway.url + "/v1/admin/tenants", json={"name": tenant}) as resp:
                    assert resp.status in (201, 409), await resp.text()
            body: dict[str, Any] = {"name": f"batch-test-{tenant}", "tenant": tenant, "scopes": scopes or ["inference"]}
            if budget is not None:
                body["budget"] = budget
            async with http.post(self.gateway.url + "/v1/admin/keys", json=body) as resp:
                assert resp.status == 201, await resp.text()
                made = await resp.json()
        return made["key"], made["info"]["id"]

    async def ledger(self, batch_id: str, prefix: str = "chatcmpl-") -> dict[str, int]:
        """Usage rows per request id of one batch's lines (`prefix`: the endpoint's request id prefix)."""
        db = await asyncpg.connect(self.stack.database_url)
        try:
            rows = await db.fetch("SELECT request_id, count(*) AS n FROM usage_events WHERE request_id LIKE $1"
                                  " AND batch_id = $2 GROUP BY request_id", f"{prefix}{batch_id}-%", batch_id)
        finally:
            await db.close()
        return {r["request_id"]: r["n"] for r in rows}


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[EmbeddedStack]:
    with stack_in_tempdir("inferbus-batch-", keep=lambda: bool(request.session.testsfailed)) as servers:
        yield servers


@pytest.fixture(scope="module")
async def platform(stack: EmbeddedStack) -> AsyncIterator[Platform]:
    conn = await bus.connect(stack.nats_url, "tests", identity=stack.identity())
    procs: dict[str, ServiceProcess] = {}
    try:
        procs["fast"] = start_worker(stack, FAST)
        procs["slow"] = start_worker(stack, SLOW, engine_options={"tokens_per_s": 50})
        procs["narrow"] = start_worker(stack, NARROW, engine_options={"tokens_per_s": 50, "capacity": 2})
        procs["metering"] = ServiceProcess("metering", "services.metering", stack.env(), stack.root)
        async with running_gateway(stack) as gw:
            plat = Platform(stack, conn, gw)
            plat.procs = procs
            plat.start_batch()
            await wait_worker(conn, FAST, procs["fast"])
            await wait_worker(conn, SLOW, procs["slow"])
            await wait_worker(conn, NARROW, procs["narrow"])
            await wait_service(conn, "inferbus-metering", procs["metering"])
            await wait_service(conn, "inferbus-batch", procs["batch"])
            yield plat
    finally:
        for proc in procs.values():
            proc.stop()
        await conn.close()


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def chat_lines(n: int, model: str = FAST, max_tokens: int = 8, prefix: str = "req") -> list[dict[str, Any]]:
    return [{"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": f"q {i}"}]}}
            for i in range(n)]


async def until(check: Callable[[], Awaitable[Any]], limit_s: float, what: str) -> Any:
    """Poll `check` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{what} after {limit_s} s")


async def retrieve(api: AsyncOpenAI, batch_id: str) -> Any:
    """The batch, or None while the API is briefly away (a 5xx: nats-server restarting, services reconnecting)."""
    try:
        return await api.batches.retrieve(batch_id)
    except (openai.InternalServerError, openai.APIConnectionError):
        return None


async def finished(api: AsyncOpenAI, batch_id: str, limit_s: float = 60) -> Any:
    async def check() -> Any:
        batch = await retrieve(api, batch_id)
        return batch if batch is not None and batch.status in TERMINAL else None

    return await until(check, limit_s, f"batch {batch_id} not finished")


async def progressed(api: AsyncOpenAI, batch_id: str, lines: int, limit_s: float = 30) -> Any:
    async def check() -> Any:
        batch = await retrieve(api, batch_id)
        counts = batch.request_counts if batch is not None else None
        return batch if counts is not None and counts.completed >= lines else None

    return await until(check, limit_s, f"batch {batch_id} did not answer {lines} lines")


async def records(api: AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = await api.files.content(file_id)
    return [json.loads(line) for line in content.content.splitlines() if line.strip()]


async def answered(api: AsyncOpenAI, batch: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(output records, error records) of a finished batch."""
    return await records(api, batch.output_file_id), await records(api, batch.error_file_id)


async def submit(api: AsyncOpenAI, lines: list[dict[str, Any]], window: str = "24h", **options: Any) -> Any:
    uploaded = await api.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    return await api.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                    completion_window=window, **options)  # type: ignore[arg-type]


def exactly_once(lines: list[dict[str, Any]], out: list[dict[str, Any]], errors: list[dict[str, Any]]) -> None:
    seen = [r["custom_id"] for r in out + errors]
    assert len(seen) == len(set(seen)), "a custom_id was answered twice"
    assert sorted(seen) == sorted(line["custom_id"] for line in lines)


# ---- the API -------------------------------------------------------------------------------------------


async def test_the_openai_sdk_runs_a_batch_end_to_end(platform: Platform) -> None:
    api = platform.api()
    lines = chat_lines(40)
    uploaded = await api.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(lines)) and uploaded.filename == "requests.jsonl"
    assert (await api.files.retrieve(uploaded.id)).id == uploaded.id
    assert (await api.files.content(uploaded.id)).content == jsonl(lines)
    assert uploaded.id in [f.id async for f in api.files.list(purpose="batch")]
    batch = await api.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                     completion_window="24h", metadata={"job": "nightly"})
    assert batch.status == "validating" and batch.metadata == {"job": "nightly"}
    done = await finished(api, batch.id)
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (40, 40, 0)
    assert done.error_file_id is None and done.output_file_id is not None
    assert done.completed_at and done.in_progress_at and done.finalizing_at and done.model == FAST
    assert done.usage is not None and done.usage.output_tokens == 40 * 8
    out = await records(api, done.output_file_id)
    exactly_once(lines, out, [])
    first = out[0]
    assert first["error"] is None and first["response"]["status_code"] == 200
    assert first["id"].startswith("batch_req_")
    body = first["response"]["body"]
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] == 8 and body["id"] == first["response"]["request_id"]
    assert (await api.files.retrieve(done.output_file_id)).purpose == "batch_output"
    assert batch.id in [b.id async for b in api.batches.list(limit=5)]
    # Usage: one row per line, under the line's request id (metering writes them a moment later).
    ledger = await until(lambda: _complete(platform, batch.id, 40), 30, "usage rows for every line")
    assert set(ledger.values()) == {1}
    deleted = await api.files.delete(uploaded.id)
    assert deleted.deleted and deleted.id == uploaded.id
    with pytest.raises(openai.NotFoundError):
        await api.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        await api.files.content(uploaded.id)


async def _complete(platform: Platform, batch_id: str, lines: int) -> dict[str, int] | None:
    ledger = await platform.ledger(batch_id)
    return ledger if len(ledger) >= lines else None


async def set_batch_price(platform: Platform) -> None:
    """FAST at $2 / $10 per million prompt / completion tokens, batch lines at half price."""
    price = SetPrice(model=FAST, version="*", input_per_1m=2.0, output_per_1m=10.0, batch_discount=0.5)
    msg = await platform.nc.request(usage.PRICES_SET, msgspec.json.encode(price), timeout=5)
    assert msgspec.json.decode(msg.data, type=Reply).error is None


async def key_rows(platform: Platform, key_id: str, count: int, images: bool = False) -> list[asyncpg.Record]:
    """The key's usage rows, once there are `count` of them (`images`: `count` rows for judged images)."""
    db = await asyncpg.connect(platform.stack.database_url)
    try:
        async def metered() -> list[asyncpg.Record] | None:
            rows = await db.fetch("SELECT * FROM usage_events WHERE key_id = $1", key_id)
            return rows if sum(1 for r in rows if r["images"] or not images) >= count else None

        rows: list[asyncpg.Record] = await until(metered, 30, "usage rows for the lines and the interactive request")
        return rows
    finally:
        await db.close()


async def test_a_batch_line_is_metered_as_batch_at_the_batch_discount(platform: Platform) -> None:
    await set_batch_price(platform)
    key, key_id = await platform.new_key()
    api = platform.api(key)
    lines = chat_lines(3, prefix="priced")
    batch = await submit(api, lines)
    assert (await finished(api, batch.id)).status == "completed"
    chat = await api.chat.completions.create(model=FAST, max_tokens=8, messages=[{"role": "user", "content": "q 0"}])
    rows = await key_rows(platform, key_id, 4)
    assert len(rows) == 4 and len({r["request_id"] for r in rows}) == 4  # one row per line, one for the chat
    by_id = {r["request_id"]: r for r in rows}
    interactive = by_id.pop(chat.id)
    assert interactive["batch_id"] is None
    assert interactive["cost_usd"] == price_of(interactive) > 0
    assert sorted(by_id) == sorted(f"chatcmpl-{batch.id}-{line}" for line in (1, 2, 3))  # by line number
    for row in by_id.values():
        assert row["batch_id"] == batch.id and row["model"] == FAST and row["completion_tokens"] == 8
        assert row["cost_usd"] == price_of(row) / 2 > 0
    # The usage API splits batch from interactive traffic, and its costs are the ledger's.
    async with aiohttp.ClientSession(headers=platform.gateway.headers) as http, \
            http.get(platform.gateway.url + "/v1/usage", params={"key_id": key_id, "group_by": "batch"}) as resp:
        assert resp.status == 200, await resp.text()
        report = await resp.json()
    split = {r["batch"]: (r["requests"], r["cost_usd"]) for r in report["rows"]}
    assert split == {
        False: (1, pytest.approx(float(interactive["cost_usd"]))),
        True: (3, pytest.approx(float(sum(r["cost_usd"] for r in by_id.values())))),
    }


async def test_a_batch_line_counts_against_a_usd_budget_at_its_discount(platform: Platform) -> None:
    """The gateway's budget counter (Redis) charges a batch line what the ledger charges: the discounted price."""
    await set_batch_price(platform)
    key, key_id = await platform.new_key(budget={"usd_per_month": 100.0})
    api = platform.api(key)
    batch = await submit(api, chat_lines(2, prefix="budgeted"))
    assert (await finished(api, batch.id)).status == "completed"
    await api.chat.completions.create(model=FAST, max_tokens=8, messages=[{"role": "user", "content": "q 1"}])
    rows = await key_rows(platform, key_id, 3)
    assert sum(r["batch_id"] is not None for r in rows) == 2
    # The ledger's costs, at most one micro-dollar each above them. At full price the two lines would add
    # their discount, ~28 micro-dollars each, on top.
    await budget_settled(platform, key_id, rows)


async def budget_settled(platform: Platform, key_id: str, rows: list[asyncpg.Record]) -> None:
    """The key's monthly USD counter (Redis) reaches what the ledger charged for `rows`: each request settles
    to its cost in micro-dollars, rounded up (in floating point, so an exact cost may round up once more)."""
    expected = sum(math.ceil(r["cost_usd"] * 1_000_000) for r in rows)
    redis = Resp(platform.stack.redis_url)
    counter = f"ib:bud:key:{key_id}:usd:m{dt.datetime.now(dt.UTC):%Y-%m}"
    seen: list[int | None] = []
    try:
        async def settled() -> bool:
            spent = await redis.call("GET", counter)
            seen.append(int(spent) if spent is not None else None)
            return seen[-1] is not None and expected <= seen[-1] <= expected + len(rows)

        try:
            await until(settled, 10, f"the budget counter to reach {expected} micro-USD")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}: it holds {seen[-1] if seen else None}") from None
    finally:
        await redis.close()


def price_of(row: asyncpg.Record) -> Decimal:
    """A row's full price at $2 per million prompt tokens and $10 per million completion tokens."""
    return (Decimal(row["prompt_tokens"]) * 2 + Decimal(row["completion_tokens"]) * 10) / 1_000_000


async def worker_stats(platform: Platform, name: str) -> dict[str, Any]:
    pid = platform.procs[name].pid
    for data in await bus.service_stats(platform.nc, "inferbus-llm", wait=0.2):
        if data.get("pid") == pid:
            return data
    raise AssertionError(f"the {name} worker did not answer STATS")


async def test_a_busy_worker_keeps_its_room_for_interactive_requests(platform: Platform) -> None:
    """A worker tells the batch service how many of its slots batch lines may use, turns away a batch line that
    would take the room it keeps for interactive requests (before accepting it: nothing runs, nothing is
    billed), and the batch completes once the worker is idle."""
    heartbeat = await platform.nc.subscribe(subjects.heartbeat("llm", NARROW, "v1", "w").rsplit(".", 1)[0] + ".*")
    try:
        load = load_decoder.decode((await heartbeat.next_msg(timeout=5)).data)
    finally:
        await heartbeat.unsubscribe()
    assert (load.capacity, load.batch_capacity) == (2, 1)  # one slot kept for interactive requests
    before = (await worker_stats(platform, "narrow"))["batch_deferred"]
    api = platform.api()
    interactive = await api.chat.completions.create(
        model=NARROW, max_tokens=5000, stream=True, messages=[{"role": "user", "content": "a long answer"}])
    client = StreamClient(platform.nc)
    await client.start()
    try:
        first = await anext(aiter(interactive))  # the worker is busy with it now (100 s of tokens)
        assert first.choices
        line = GenerateRequest(request_id="turned-away-1", model=NARROW, max_tokens=4, prompt="q")
        with pytest.raises(InferBusError) as refused:
            async for _ in client.stream(subjects.infer("llm", NARROW, "v1"), line,
                                         extra_headers={BATCH_HEADER: "batch_turned_away"}):
                pass
        assert refused.value.code == "deferred" and refused.value.retry_after is not None
        assert (await worker_stats(platform, "narrow"))["batch_deferred"] == before + 1
        batch = await submit(api, chat_lines(2, model=NARROW, max_tokens=4, prefix="waits"))
    finally:
        await interactive.close()  # the worker is idle again: the lines run
    done = await finished(api, batch.id)
    out, errors = await answered(api, done)
    assert done.status == "completed" and errors == [] and len(out) == 2
    # One usage row per line, once metering has taken them in (asynchronously: they may land after completion).
    ledger = await until(lambda: _complete(platform, batch.id, 2), 30, "usage rows for both lines")
    assert sorted(ledger.values()) == [1, 1]
    db = await asyncpg.connect(platform.stack.database_url)
    try:  # the turned-away request left no usage row
        assert await db.fetchval("SELECT count(*) FROM usage_events WHERE request_id = 'turned-away-1'") == 0
    finally:
        await db.close()


async def test_a_completions_batch_and_a_line_the_model_refuses(platform: Platform) -> None:
    api = platform.api()
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": FAST, "prompt": "once upon", "max_tokens": 5}} for i in range(5)]
    uploaded = await api.files.create(file=("c.jsonl", jsonl(lines)), purpose="batch")
    batch = await api.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
    done = await finished(api, batch.id)
    out, errors = await answered(api, done)
    exactly_once(lines, out, errors)
    assert {r["response"]["body"]["object"] for r in out} == {"text_completion"}


# ---- embeddings, responses and moderations -------------------------------------------------------------

EMBED = "all-minilm-l6-v2"  # sentence-transformers, 384 dimensions
EMBED_DIM = 384
NSFW = "open-nsfw"  # what /v1/moderations judges images with


async def _ready(nc: bus.Connection, service: str, proc: ServiceProcess, gateway: Gateway, model: str) -> None:
    """Wait until a worker reports ready in its micro stats and the gateway routes to its model."""
    async def ready() -> bool:
        proc.check_alive()
        return any(d.get("pid") == proc.pid and d.get("ready") for d in await bus.service_stats(nc, service, wait=0.2))

    await until(ready, 120, f"the {model} worker ready")

    async def routable() -> bool:
        async with aiohttp.ClientSession(headers=gateway.headers) as http, \
                http.get(f"{gateway.url}/v1/models/{model}") as resp:
            return resp.status == 200 and (await resp.json())["workers"] >= 1

    await until(routable, 10, f"the gateway routing to {model}")


@pytest.fixture(scope="module")
async def other_kinds(platform: Platform) -> AsyncIterator[None]:
    """An embedding worker and an image moderation worker, for the batches of those endpoints only."""
    stack = platform.stack
    procs = {
        "embed": ServiceProcess("embed", "services.embed", stack.env(**settings_env(
            model=EMBED, version="v1", engine="sentence-transformers", max_wait_ms=5)), stack.root),
        "vision": ServiceProcess("vision", "services.vision", stack.env(**settings_env(
            model=NSFW, version="v1", engine_options={"threads": 1})), stack.root),
    }
    platform.procs.update(procs)
    try:
        await _ready(platform.nc, "inferbus-embed", procs["embed"], platform.gateway, EMBED)
        await _ready(platform.nc, "inferbus-vision", procs["vision"], platform.gateway, NSFW)
        yield
    finally:
        for name, proc in procs.items():
            proc.stop()
            platform.procs.pop(name, None)


def png_data_url(color: str) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def run_endpoint(platform: Platform, endpoint: str, bodies: list[dict[str, Any]], prefix: str) -> Any:
    """A batch of `bodies` for `endpoint`, finished: (batch, output records by custom_id, request id prefix)."""
    api = platform.api()
    lines = [{"custom_id": f"{prefix}-{i}", "method": "POST", "url": endpoint, "body": body}
             for i, body in enumerate(bodies)]
    uploaded = await api.files.create(file=(f"{prefix}.jsonl", jsonl(lines)), purpose="batch")
    batch = await api.batches.create(input_file_id=uploaded.id, endpoint=endpoint,  # type: ignore[arg-type]
                                     completion_window="24h")
    done = await finished(api, batch.id)
    assert done.status == "completed", done
    out, errors = await answered(api, done)
    exactly_once(lines, out, errors)
    assert errors == [] and done.request_counts is not None and done.request_counts.completed == len(lines)
    for record in out:
        assert record["error"] is None and record["response"]["status_code"] == 200, record
    return done, {r["custom_id"]: r for r in out}


async def one_row_per_line(platform: Platform, batch_id: str, prefix: str, lines: int) -> None:
    """The ledger holds one usage row per line, each marked with the batch, under `<prefix><batch>-<line>`."""
    async def complete() -> dict[str, int] | None:
        ledger = await platform.ledger(batch_id, prefix)
        return ledger if len(ledger) >= lines else None

    ledger = await until(complete, 30, f"usage rows for every line of {batch_id}")
    assert ledger == {f"{prefix}{batch_id}-{line}": 1 for line in range(1, lines + 1)}


async def test_batches_of_embeddings_responses_and_moderations(platform: Platform, other_kinds: None) -> None:
    """A small batch per endpoint (run at once): every line answered once with what the endpoint returns, and
    one usage row per line in the ledger, marked as batch."""
    embeddings: list[dict[str, Any]] = [
        {"model": EMBED, "input": "The quick brown fox."},
        {"model": EMBED, "input": ["Two inputs,", "two vectors."]},
        {"model": EMBED, "input": "base64 this", "encoding_format": "base64"},
    ]
    responses: list[dict[str, Any]] = [
        {"model": FAST, "input": "Say something.", "max_output_tokens": 6},
        {"model": FAST, "instructions": "Be brief.", "input": [{"role": "user", "content": "Hi"}],
         "max_output_tokens": 6, "store": False},
    ]
    moderations: list[dict[str, Any]] = [
        {"input": [{"type": "image_url", "image_url": {"url": png_data_url(color)}}]} for color in ("white", "navy")
    ]
    (emb, emb_out), (resp, resp_out), (mod, mod_out) = await asyncio.gather(
        run_endpoint(platform, "/v1/embeddings", embeddings, "emb"),
        run_endpoint(platform, "/v1/responses", responses, "resp"),
        run_endpoint(platform, "/v1/moderations", moderations, "mod"),
    )
    # Embeddings: OpenAI's list of vectors of the model's dimension, float or base64 as asked.
    for i, want in enumerate([1, 2, 1]):
        record = emb_out[f"emb-{i}"]
        assert record["response"]["request_id"] == f"embd-{emb.id}-{i + 1}"
        body = record["response"]["body"]
        assert body["object"] == "list" and body["model"] == EMBED and len(body["data"]) == want
        assert body["usage"]["prompt_tokens"] > 0
        for j, item in enumerate(body["data"]):
            assert item["object"] == "embedding" and item["index"] == j
            vector = item["embedding"]
            if i == 2:
                assert len(base64.b64decode(vector)) == 4 * EMBED_DIM
            else:
                assert len(vector) == EMBED_DIM and math.isclose(sum(x * x for x in vector), 1.0, rel_tol=1e-3)
    # Responses: a response object with its output text, under the line's request id.
    async with aiohttp.ClientSession(headers=platform.gateway.headers) as http:
        for i in range(2):
            record = resp_out[f"resp-{i}"]
            body = record["response"]["body"]
            assert body["object"] == "response" and body["status"] == "incomplete" and body["model"] == FAST
            assert body["id"] == record["response"]["request_id"] == f"resp_{resp.id}-{i + 1}"
            assert body["output"][0]["type"] == "message" and body["output"][0]["content"][0]["text"]
            assert body["usage"]["output_tokens"] == 6
            # Stored as the endpoint stores a response (store defaults to true): previous_response_id finds it.
            async with http.get(f"{platform.gateway.url}/v1/responses/{body['id']}") as got:
                assert got.status == (200 if i == 0 else 404), await got.text()
                if i == 0:
                    assert (await got.json())["output"] == body["output"]
    # Moderations: one result per image, with the categories Open-NSFW judges.
    for i in range(2):
        record = mod_out[f"mod-{i}"]
        body = record["response"]["body"]
        assert body["id"] == record["response"]["request_id"] == f"modr-{mod.id}-{i + 1}" and body["model"] == NSFW
        [result] = body["results"]
        assert result["flagged"] is False and set(result["category_scores"]) == {"sexual"}
        assert result["category_applied_input_types"] == {"sexual": ["image"]}
    await one_row_per_line(platform, emb.id, "embd-", 3)
    await one_row_per_line(platform, resp.id, "resp_", 2)
    await one_row_per_line(platform, mod.id, "modr-", 2)


async def test_an_image_costs_its_price_in_usd_budgets_and_a_batch_line_its_discounted_price(
    platform: Platform, other_kinds: None
) -> None:
    """Moderation: the budget counter charges each judged image the ledger's per_image price, a batch line's at
    the batch discount (a refused image costs nothing)."""
    price = SetPrice(model=NSFW, version="*", per_image=0.01, batch_discount=0.5)
    msg = await platform.nc.request(usage.PRICES_SET, msgspec.json.encode(price), timeout=5)
    assert msgspec.json.decode(msg.data, type=Reply).error is None
    key, key_id = await platform.new_key(budget={"usd_per_month": 100.0})
    api = platform.api(key)
    body = {"input": [{"type": "image_url", "image_url": {"url": png_data_url("white")}}]}
    lines = [{"custom_id": "img-0", "method": "POST", "url": "/v1/moderations", "body": body}]
    uploaded = await api.files.create(file=("images.jsonl", jsonl(lines)), purpose="batch")
    batch = await api.batches.create(input_file_id=uploaded.id, endpoint="/v1/moderations",  # type: ignore[arg-type]
                                     completion_window="24h")
    assert (await finished(api, batch.id)).status == "completed"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
        async with http.post(platform.gateway.url + "/v1/moderations", json=body) as resp:
            assert resp.status == 200, await resp.text()
        refused = {"input": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGEgcG5n"}}]}
        async with http.post(platform.gateway.url + "/v1/moderations", json=refused) as resp:
            assert resp.status == 400, await resp.text()
    rows = await key_rows(platform, key_id, 2, images=True)
    judged = sorted((r["batch_id"] is not None, r["images"], r["cost_usd"]) for r in rows if r["images"])
    assert judged == [(False, 1, Decimal("0.01")), (True, 1, Decimal("0.005"))]
    assert all(r["cost_usd"] == 0 for r in rows if not r["images"])  # the refused image's row, if it has one
    await budget_settled(platform, key_id, rows)


async def test_malformed_embeddings_responses_and_moderations_lines_fail_their_batch(platform: Platform) -> None:
    """Each body is checked as its endpoint checks it, and the key's scopes for the endpoint's kind; the errors
    name their lines (nothing here needs a worker: every line is refused before its model is looked up)."""
    llm_only, _ = await platform.new_key(scopes=["kind:llm"])

    async def failed(endpoint: str, bodies: list[dict[str, Any]], key: str = ADMIN_KEY) -> dict[int, Any]:
        api = platform.api(key)
        lines = [{"custom_id": f"x{i}", "method": "POST", "url": endpoint, "body": body}
                 for i, body in enumerate(bodies)]
        uploaded = await api.files.create(file=("bad.jsonl", jsonl(lines)), purpose="batch")
        batch = await api.batches.create(input_file_id=uploaded.id, endpoint=endpoint,  # type: ignore[arg-type]
                                         completion_window="24h")
        done = await finished(api, batch.id)
        assert done.status == "failed" and done.errors is not None, done
        assert done.output_file_id is None and done.error_file_id is None
        return {e.line: e for e in done.errors.data}

    embeddings, responses = await asyncio.gather(
        failed("/v1/embeddings", [
            {"model": EMBED, "input": ""},                           # 1 an empty input
            {"model": EMBED},                                        # 2 no input
            {"model": EMBED, "input": "x", "encoding_format": "hex"},  # 3 no such format
            {"model": EMBED, "input": [1, "mixed"]},                 # 4 neither texts nor tokens
        ]),
        failed("/v1/responses", [
            {"model": FAST, "input": "fine"},                        # 1 fine
            {"model": FAST, "input": "x", "temperature": "hot"},     # 2 a bad field
            {"model": FAST, "input": "x", "background": True},       # 3 not supported
            {"model": FAST, "input": "x", "stream": True},           # 4 no streams in a batch
            {"model": FAST, "input": "x", "colour": "blue"},         # 5 unknown field
        ]),
    )
    moderations, scoped = await asyncio.gather(
        failed("/v1/moderations", [
            {"input": "text only"},                                                          # 1 images only
            {"input": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]},  # 2 not allowed
            {"input": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]},  # 3 bad base64
            {"input": [{"type": "image_url", "image_url": {"url": png_data_url("red")}}], "model": 7},  # 4 bad model
        ]),
        failed("/v1/embeddings", [{"model": EMBED, "input": "no embed scope"}], llm_only),
    )
    assert {line: (e.code, e.param) for line, e in moderations.items()} == {
        1: ("invalid_request", "body.input"), 2: ("invalid_request", "body.input[0].image_url.url"),
        3: ("invalid_request", "body.input[0].image_url.url"), 4: ("invalid_request", "body.model")}
    assert "not allowed" in moderations[2].message
    assert {line: (e.code, e.param) for line, e in scoped.items()} == {1: ("permission_denied", "body.model")}
    assert {line: (e.code, e.param) for line, e in embeddings.items()} == {
        1: ("invalid_request", "body.input"), 2: ("invalid_request", "body.input"),
        3: ("invalid_request", "body.encoding_format"), 4: ("invalid_request", "body.input")}
    assert {line: (e.code, e.param) for line, e in responses.items()} == {
        2: ("invalid_request", "body.temperature"), 3: ("unsupported_parameter", "body.background"),
        4: ("invalid_request", "body.stream"), 5: ("invalid_request", "body.colour")}


async def test_malformed_input_fails_the_batch_naming_every_bad_line(platform: Platform) -> None:
    key, _ = await platform.new_key(scopes=["kind:llm", f"model:{FAST}"])
    api = platform.api(key)
    good = chat_lines(1)[0]
    raw = b"\n".join([
        json.dumps(good).encode(),                                                   # 1 fine
        b"{not json",                                                                # 2
        json.dumps({**good, "custom_id": "b", "url": "/v1/embeddings"}).encode(),    # 3 wrong url
        json.dumps({**good, "custom_id": "c", "method": "GET"}).encode(),            # 4 wrong method
        json.dumps(good).encode(),                                                   # 5 duplicate custom_id
        json.dumps({**good, "custom_id": "d", "body": {**good["body"], "model": SLOW}}).encode(),   # 6 not allowed
        json.dumps({**good, "custom_id": "e", "body": {**good["body"], "stream": True}}).encode(),  # 7 stream
        json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": good["body"]}).encode(),  # 8 no id
        json.dumps({**good, "custom_id": "f", "body": {"model": FAST}}).encode(),   # 9 no messages
        b"",
    ])
    uploaded = await api.files.create(file=("bad.jsonl", raw), purpose="batch")
    batch = await api.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                     completion_window="24h")
    done = await finished(api, batch.id)
    assert done.status == "failed" and done.failed_at and done.errors is not None and done.errors.data
    by_line = {e.line: e for e in done.errors.data}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert by_line[2].code == "invalid_json_line"
    assert by_line[3].code == "invalid_url" and by_line[3].param == "url"
    assert by_line[4].code == "invalid_method"
    assert by_line[5].code == "duplicate_custom_id"
    assert by_line[6].code == "permission_denied" and by_line[6].param == "body.model"
    assert by_line[7].param == "body.stream"
    assert by_line[8].param == "custom_id"
    assert by_line[9].param == "body.messages"
    assert done.output_file_id is None and done.error_file_id is None
    assert await platform.ledger(batch.id) == {}  # nothing was half-started
    # Refused at once: an unknown endpoint or window, a missing file.
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        await api.batches.create(input_file_id=uploaded.id, endpoint="/v1/audio/speech",  # type: ignore[arg-type]
                                 completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        await api.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                 completion_window="48h")  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        await api.batches.create(input_file_id="file-missing", endpoint="/v1/chat/completions",
                                 completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        await api.files.create(file=("x.jsonl", b"{}\n"), purpose="assistants")
    with pytest.raises(openai.APIStatusError) as too_big:  # over max_file_bytes: refused while it streams in
        await api.files.create(file=("big.jsonl", b"x" * 5_000_000), purpose="batch")
    assert too_big.value.status_code == 413


async def test_files_and_batches_belong_to_their_tenant(platform: Platform) -> None:
    key_a, _ = await platform.new_key("batch-tenant-a")
    key_b, _ = await platform.new_key("batch-tenant-b")
    a, b = platform.api(key_a), platform.api(key_b)
    batch = await submit(a, chat_lines(3))
    file_id = batch.input_file_id
    for call in (b.files.retrieve(file_id), b.files.content(file_id), b.files.delete(file_id),
                 b.batches.retrieve(batch.id), b.batches.cancel(batch.id),
                 b.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            await call
    assert file_id not in [f.id async for f in b.files.list()]
    assert batch.id not in [x.id async for x in b.batches.list()]
    done = await finished(a, batch.id)
    assert done.status == "completed"
    with pytest.raises(openai.NotFoundError):
        await b.files.content(done.output_file_id)


async def test_cancel_stops_new_lines_and_answers_every_line_once(platform: Platform) -> None:
    api = platform.api()
    lines = chat_lines(300, SLOW, max_tokens=25, prefix="cancel")  # 0.5 s each, 64 at a time: ~2.5 s
    batch = await submit(api, lines)
    await progressed(api, batch.id, 1)
    asked = time.monotonic()
    cancelling = await api.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = await finished(api, batch.id, limit_s=10)
    assert done.status == "cancelled" and done.cancelled_at and done.cancelling_at
    assert time.monotonic() - asked < 5
    out, errors = await answered(api, done)
    exactly_once(lines, out, errors)
    assert 1 <= len(out) < len(lines)
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert all(e["response"] is None for e in errors)
    assert done.request_counts is not None and done.request_counts.completed == len(out)
    assert done.request_counts.failed == len(errors) and done.request_counts.total == len(lines)
    # Cancelling a finished batch changes nothing.
    assert (await api.batches.cancel(batch.id)).status == "cancelled"


async def test_lines_left_when_the_window_closes_are_batch_expired(platform: Platform) -> None:
    api = platform.api()
    lines = chat_lines(300, SLOW, max_tokens=100, prefix="exp")  # 2 s each, 64 at a time: ~10 s > 4 s window
    batch = await submit(api, lines, window="4s")
    done = await finished(api, batch.id, limit_s=20)
    assert done.status == "expired" and done.expired_at
    out, errors = await answered(api, done)
    exactly_once(lines, out, errors)
    assert 0 < len(out) < len(lines)
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}


# ---- webhooks ------------------------------------------------------------------------------------------


async def test_a_signed_webhook_is_retried_until_the_receiver_takes_it(platform: Platform) -> None:
    heard: list[tuple[dict[str, str], bytes]] = []

    async def receive(request: web.Request) -> web.Response:
        heard.append(({k.lower(): v for k, v in request.headers.items()}, await request.read()))
        return web.Response(status=500 if len(heard) == 1 else 204)  # the first attempt fails

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        key, key_id = await platform.new_key()
        made = await platform.admin("webhooks.set", SetWebhook(key_id=key_id))
        secret = made["secret"]
        assert secret.startswith("whsec_")
        api = platform.api(key)
        batch = await submit(api, chat_lines(3), metadata={"webhook_url": f"http://127.0.0.1:{port}/hook"})
        assert (await finished(api, batch.id)).status == "completed"
        await until(lambda: _async(len(heard) >= 2), 15, "the webhook retried and delivered")
        headers, body = heard[-1]
        assert verify(secret, headers, body)
        assert not verify(secret, {**headers, "webhook-signature": "v1,AAAA"}, body)
        event = json.loads(body)
        assert event["type"] == "batch.completed" and event["data"] == {"id": batch.id}
        assert event["object"] == "event" and headers["webhook-id"] == event["id"] == heard[0][0]["webhook-id"]
        log = await platform.admin("deliveries.list", ListDeliveries(batch_id=batch.id))
        assert [(d["status"], d["attempts"], d["last_status"]) for d in log] == [("delivered", 2, 204)]
        views = await platform.admin("webhooks.list", KeyRef(key_id=key_id))
        assert views[0]["key_id"] == key_id and "secret" not in views[0]  # shown once only
        # Without a secret for the key, a webhook_url is refused at creation.
        other, _ = await platform.new_key()
        with pytest.raises(openai.BadRequestError, match="webhook"):
            await submit(platform.api(other), chat_lines(1), metadata={"webhook_url": "http://127.0.0.1:1/x"})
    finally:
        await runner.cleanup()


async def _async(value: Any) -> Any:
    return value


def test_webhook_urls_may_not_reach_private_addresses_unless_allowed() -> None:
    for url in ("http://127.0.0.1/x", "http://10.1.2.3/x", "http://[::1]/x", "http://localhost:80/x",
                "http://169.254.169.254/latest/meta-data", "http://192.168.0.1/", "ftp://example.com/x",
                "http://user:pw@example.com/x"):
        with pytest.raises(InferBusError):
            check_url(url, allow_private=False)
    assert check_url("https://example.com/hook", allow_private=False)
    assert check_url("http://127.0.0.1:8080/hook", allow_private=True)


# ---- durability ----------------------------------------------------------------------------------------


async def _killed_mid_batch(platform: Platform, kill: Callable[[], Awaitable[None]], prefix: str,
                            lines_n: int = 300) -> None:
    """Run a batch on the paced worker, `kill` something after some lines, and check what it promises."""
    api = platform.api()
    lines = chat_lines(lines_n, SLOW, max_tokens=20, prefix=prefix)  # 0.4 s each
    batch = await submit(api, lines)
    seen = await progressed(api, batch.id, 40)
    assert seen.request_counts.completed < lines_n, "the batch ended before anything was killed"
    await kill()
    done = await finished(api, batch.id, limit_s=90)
    assert done.status == "completed", done
    out, errors = await answered(api, done)
    exactly_once(lines, out, errors)
    assert errors == [] and done.request_counts.completed == lines_n
    ledger = await until(lambda: _complete(platform, batch.id, lines_n), 60, "usage rows for every line")
    assert len(ledger) == lines_n and set(ledger.values()) == {1}, "a line has more than one usage row"


async def test_killing_the_batch_service_mid_batch_answers_every_line_once(platform: Platform) -> None:
    async def kill() -> None:
        platform.procs["batch"].kill()
        await wait_service(platform.nc, "inferbus-batch", platform.start_batch())

    await _killed_mid_batch(platform, kill, "kill-batch")


async def metric(nc: bus.Connection, service: str, name: str, where: Callable[[dict[str, str]], bool]) -> float:
    """A metric's value (summed over labels) on the instance of `service` whose micro metadata `where` picks."""
    for svc in await bus.discover(nc, "INFO", service, wait=0.3):
        meta = svc.get("metadata") or {}
        if where(meta):
            async with aiohttp.ClientSession() as http, \
                    http.get(f"http://127.0.0.1:{meta['metrics_port']}/metrics") as resp:
                text = await resp.text()
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith(name) and not line.startswith(name + "_created"))
    return 0.0


async def test_killing_a_gateway_mid_batch_answers_every_line_once(platform: Platform) -> None:
    extra = start_gateway(platform.stack)  # lines run on both gateways (queue group); this one dies
    this_one: Callable[[dict[str, str]], bool] = lambda meta: meta.get("http") == extra.url  # noqa: E731
    lost = "inferbus_batch_retries_total{reason=\"lost\"}"
    try:
        await wait_service(platform.nc, "inferbus-gateway", extra.proc)

        async def ready() -> bool:
            return await metric(platform.nc, "inferbus-gateway", "inferbus_gateway_batch_exec_ready", this_one) == 1

        await until(ready, 20, "the second gateway taking batch lines")
        before = await metric(platform.nc, "inferbus-batch", lost, lambda _: True)

        async def kill() -> None:
            async def busy() -> bool:
                return await metric(platform.nc, "inferbus-gateway", "inferbus_gateway_batch_lines_total", this_one) > 0

            await until(busy, 10, "the second gateway running lines")
            extra.proc.kill()

        await _killed_mid_batch(platform, kill, "kill-gw")
        assert await metric(platform.nc, "inferbus-batch", lost, lambda _: True) > before  # lines it held re-ran
    finally:
        extra.proc.stop()


async def test_killing_the_worker_mid_batch_answers_every_line_once(platform: Platform) -> None:
    async def kill() -> None:
        platform.procs["slow"].kill()
        platform.procs["slow"] = start_worker(platform.stack, SLOW, engine_options={"tokens_per_s": 50})

    await _killed_mid_batch(platform, kill, "kill-worker")


async def test_killing_nats_server_mid_batch_answers_every_line_once(platform: Platform) -> None:
    async def kill() -> None:
        server = platform.stack.nats
        assert server.proc is not None
        server.proc.kill()
        server.proc.wait()

        async def noticed() -> bool:  # the outage lasts until clients have seen it
            return not platform.nc.is_connected

        await until(noticed, 10, "the test's NATS client noticing the outage")
        server.start()

    await _killed_mid_batch(platform, kill, "kill-nats")


# ---- scale and the CLI -----------------------------------------------------------------------------------


async def test_ten_thousand_lines_on_the_benchmark_engine(platform: Platform) -> None:
    api = platform.api()
    lines = chat_lines(10_000, FAST, max_tokens=4, prefix="big")
    batch = await submit(api, lines)
    done = await finished(api, batch.id, limit_s=180)
    assert done.status == "completed" and done.request_counts.completed == 10_000
    out, errors = await answered(api, done)
    exactly_once(lines, out, errors)


def test_the_cli_submits_waits_and_fetches_results(platform: Platform, tmp_path: Path) -> None:
    source = tmp_path / "requests.jsonl"
    source.write_bytes(jsonl(chat_lines(12, prefix="cli")))
    env = {**os.environ, "INFERBUS_GATEWAY_URL": platform.gateway.url, "INFERBUS_API_KEY": ADMIN_KEY}
    out = tmp_path / "out.jsonl"
    submitted = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "batch", "submit", str(source), "--wait", "-o", str(out)],
        env=env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.strip()
    assert batch_id.startswith("batch_")
    assert "12/12 done (0 failed)" in submitted.stderr and "lines/s" in submitted.stderr
    assert sorted(json.loads(line)["custom_id"] for line in out.read_text().splitlines()) == \
        sorted(f"cli-{i}" for i in range(12))
    shown = subprocess.run([sys.executable, "-m", "services.cli.main", "batch", "show", batch_id],
                           env=env, capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0 and "completed" in shown.stdout and "12 completed" in shown.stdout
    listed = subprocess.run([sys.executable, "-m", "services.cli.main", "batches", "list"],
                            env=env, capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0 and batch_id in listed.stdout
    results = subprocess.run([sys.executable, "-m", "services.cli.main", "batch", "results", batch_id],
                             env=env, capture_output=True, text=True, timeout=30)
    assert results.returncode == 0 and len(results.stdout.splitlines()) == 12
    missing = subprocess.run([sys.executable, "-m", "services.cli.main", "batch", "show", "batch_nope"],
                             env=env, capture_output=True, text=True, timeout=30)
    assert missing.returncode == 1 and "not_found" in missing.stderr


# ---- the batch service's identity on the bus -----------------------------------------------------------


async def test_the_batch_role_holds_least_privilege(platform: Platform) -> None:
    errors: list[str] = []
    heard = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))
        heard.set()

    forbidden = ["infer.llm.m", "usage.llm.m", "admin.keys.create", "$KV.INFERBUS_ROUTING.llm.m",
                 "$JS.API.STREAM.PURGE.USAGE", "$JS.API.CONSUMER.CREATE.USAGE", "registry.admin.deploy"]
    import nats  # the tests' own client, to see the server's permission errors

    nc = await nats.connect(platform.stack.nats_url, error_cb=on_error, **platform.stack.identity("batch").options())
    try:
        for subject in forbidden:
            await nc.publish(subject, b"x")
        await nc.flush()
        async with asyncio.timeout(5):
            while True:
                heard.clear()
                if len(errors) >= len(forbidden):
                    break
                await heard.wait()
        for subject in forbidden:
            assert any(subject.lower() in e.lower() for e in errors), (subject, errors)
    finally:
        await nc.close()
