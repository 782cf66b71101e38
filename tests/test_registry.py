"""Registry, routing and progressive delivery end to end: real registry, router, gateway and workers.

Every model here is served by benchmark-engine workers (no weights): what is under test is where
requests go, not what the model says.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import math
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import aiohttp
import msgspec
import pytest

from contracts import subjects
from contracts.control import Reply
from contracts.llm import Accepted, ErrorChunk, Final, GenerateRequest, chunk_decoder, request_encoder
from contracts.tenancy import CreateKey
from services.runtime import bus
from services.runtime.local import EmbeddedStack, ServiceProcess, wait_worker
from tests.conftest import Gateway, Workers, start_worker


class AdminFailed(Exception):
    def __init__(self, code: str, message: str, param: str | None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.param = code, param


async def admin(nc: bus.Connection, op: str, **body: Any) -> Any:
    return await admin_raw(nc, op, msgspec.json.encode(body))


async def admin_raw(nc: bus.Connection, op: str, payload: bytes) -> Any:
    msg = await nc.request(subjects.registry_admin(op), payload, timeout=10)
    reply = msgspec.json.decode(msg.data, type=Reply)
    if reply.error is not None:
        raise AdminFailed(reply.error.code, reply.error.message, reply.error.param)
    return reply.result


def binomial_interval(n: int, p: float, confidence: float = 1 - 1e-6) -> tuple[int, int]:
    """The central interval holding `confidence` of Binomial(n, p), from its exact pmf.

    One in a million, not one in a thousand: a CI run draws this interval twice, and 0.999 failed a correct
    router once (134 of 1000 at 10%). For n=1000, p=0.1 it is 57..149, so a split of 3% or 20% still fails."""
    pmf = [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    tail = (1 - confidence) / 2
    low, acc = 0, 0.0
    while acc + pmf[low] < tail:
        acc += pmf[low]
        low += 1
    high, acc = n, 0.0
    while acc + pmf[high] < tail:
        acc += pmf[high]
        high -= 1
    return low, high


async def serve(
    infra: EmbeddedStack, nc: bus.Connection, started: Workers, model: str, **versions: dict[str, Any]
) -> dict[str, str]:
    """Register `model` with the given versions, start one benchmark worker each; return worker ids."""
    procs = {}
    for version, settings in versions.items():
        await admin(nc, "register", model=model, version=version, engine="benchmark")
        procs[version] = started[f"{model}-{version}"] = start_worker(infra, model, version=version, **settings)
    ids = {}
    for version, proc in procs.items():
        ids[version] = (await wait_worker(nc, model, proc))["worker_id"]
    return ids


async def model_view(http: aiohttp.ClientSession, gw: Gateway, model: str) -> dict[str, Any]:
    async with http.get(f"{gw.url}/v1/models/{model}", headers=gw.headers) as resp:
        body: dict[str, Any] = await resp.json()
        return body


async def until_gateway(
    http: aiohttp.ClientSession, gw: Gateway, model: str, revision: int, workers: int = 0, limit_s: float = 10
) -> dict[str, Any]:
    """Wait until the gateway routes `model` from at least `revision` and sees `workers` live workers."""
    deadline = time.monotonic() + limit_s
    while True:
        async with http.get(f"{gw.url}/v1/models/{model}", headers=gw.headers) as resp:
            if resp.status == 200:
                view: dict[str, Any] = await resp.json()
                ib = view["inferbus"]
                if (ib["revision"] or 0) >= revision and len(ib["live_workers"]) >= workers:
                    return view
        if time.monotonic() > deadline:
            raise TimeoutError(f"gateway never showed {model} at revision {revision} with {workers} workers")
        await asyncio.sleep(0.02)


async def completions(
    http: aiohttp.ClientSession, gw: Gateway, model: str, n: int, *, key: str | None = None,
    concurrency: int = 16, **fields: Any,
) -> list[tuple[int, str | None, dict[str, Any]]]:
    """n non-streaming completions; (status, served version header, body) each."""
    headers = {"Authorization": f"Bearer {key}"} if key else gw.headers
    gate = asyncio.Semaphore(concurrency)

    async def one() -> tuple[int, str | None, dict[str, Any]]:
        async with gate, http.post(
            f"{gw.url}/v1/completions", headers=headers,
            json={"model": model, "prompt": "hello", "max_tokens": 2, **fields},
        ) as resp:
            return resp.status, resp.headers.get("x-inferbus-model-version"), await resp.json()

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def nats_generate(
    nc: bus.Connection, subject: str, request: GenerateRequest, headers: dict[str, str] | None = None
) -> list[Any]:
    """A plain nats-py caller: own inbox, publish, read chunks until the terminal one."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish(subject, request_encoder.encode(request), reply=inbox, headers=headers)
        chunks = []
        while True:
            chunk = chunk_decoder.decode((await sub.next_msg(timeout=5)).data)
            chunks.append(chunk)
            if isinstance(chunk, Final | ErrorChunk):
                return chunks
    finally:
        await sub.unsubscribe()


# ---- canary, A/B, shadow ------------------------------------------------------------------------


async def test_canary_share_over_http_and_plain_nats(
    infra: EmbeddedStack, nc: bus.Connection, gateway: Gateway, router: ServiceProcess, workers: Workers
) -> None:
    model = "rollout-canary"
    await serve(infra, nc, workers, model, v1={}, v2={})
    await admin(nc, "deploy", model=model, version="v1")
    view = await admin(nc, "canary", model=model, version="v2", weight=10)
    assert view["policy"]["canary"] == "v2" and view["policy"]["canary_weight"] == 10
    low, high = binomial_interval(1000, 0.10)
    async with aiohttp.ClientSession() as http:
        await until_gateway(http, gateway, model, view["revision"], workers=2)
        results = await completions(http, gateway, model, 1000)
    assert {status for status, _, _ in results} == {200}
    served = Counter(version for _, version, _ in results)
    assert set(served) == {"v1", "v2"}
    assert low <= served["v2"] <= high, (served, (low, high))

    # A plain NATS publisher on the alias subject gets the same split through the router.
    async def via_alias(i: int) -> str:
        chunks = await nats_generate(
            nc, subjects.infer("llm", model), GenerateRequest(request_id=f"alias-{i}", model=model, max_tokens=2)
        )
        assert isinstance(chunks[0], Accepted) and isinstance(chunks[-1], Final), chunks
        return chunks[-1].version

    by_nats: Counter[str] = Counter()
    for batch in range(20):
        by_nats.update(await asyncio.gather(*(via_alias(batch * 50 + i) for i in range(50))))
    assert sum(by_nats.values()) == 1000
    assert low <= by_nats["v2"] <= high, (by_nats, (low, high))


async def test_alias_for_an_unknown_model_answers_an_error_chunk(nc: bus.Connection, router: ServiceProcess) -> None:
    chunks = await nats_generate(
        nc, subjects.infer("llm", "never-registered"), GenerateRequest(request_id="x", model="never-registered",
                                                                       max_tokens=1)
    )
    assert len(chunks) == 1 and isinstance(chunks[0], ErrorChunk) and chunks[0].code == "model_not_found"


async def new_key(nc: bus.Connection, name: str) -> str:
    msg = await nc.request(subjects.ADMIN_KEYS_CREATE, msgspec.json.encode(CreateKey(name=name)), timeout=5)
    reply = msgspec.json.decode(msg.data, type=Reply)
    assert reply.error is None, reply
    key: str = reply.result["key"]
    return key


async def test_ab_split_is_sticky_per_key_and_per_user(
    infra: EmbeddedStack, nc: bus.Connection, gateway: Gateway, registry: ServiceProcess, workers: Workers
) -> None:
    model = "rollout-ab"
    await serve(infra, nc, workers, model, a={}, b={})
    await admin(nc, "deploy", model=model, version="a")
    view = await admin(nc, "ab", model=model, groups={"a": 50, "b": 50}, sticky="key")
    keys = [await new_key(nc, f"ab-{i}") for i in range(16)]
    async with aiohttp.ClientSession() as http:
        await until_gateway(http, gateway, model, view["revision"], workers=2)
        per_key = {}
        for key in keys:
            results = await completions(http, gateway, model, 8, key=key)
            assert {status for status, _, _ in results} == {200}
            per_key[key] = {version for _, version, _ in results}
        assert all(len(versions) == 1 for versions in per_key.values()), per_key
        assert set().union(*per_key.values()) == {"a", "b"}  # 16 keys all on one side: p = 2^-15

        view = await admin(nc, "ab", model=model, groups={"a": 50, "b": 50}, sticky="user")
        await until_gateway(http, gateway, model, view["revision"])
        per_user = {}
        for i in range(16):
            results = await completions(http, gateway, model, 6, user=f"user-{i}")
            per_user[i] = {version for _, version, _ in results}
        assert all(len(versions) == 1 for versions in per_user.values()), per_user
        assert set().union(*per_user.values()) == {"a", "b"}


async def test_shadow_copies_are_compared_never_returned_and_tagged(
    infra: EmbeddedStack, nc: bus.Connection, gateway: Gateway, router: ServiceProcess, workers: Workers
) -> None:
    model = "rollout-shadow"
    ids = await serve(infra, nc, workers, model, live={}, candidate={"engine_options": {"token_text": " shadow"}})
    await admin(nc, "deploy", model=model, version="live")
    view = await admin(nc, "shadow", model=model, version="candidate", rate=100)
    async with aiohttp.ClientSession() as http:
        await until_gateway(http, gateway, model, view["revision"], workers=2)
        results = await completions(http, gateway, model, 20, max_tokens=3)
    for status, version, body in results:
        assert status == 200 and version == "live"
        assert body["choices"][0]["text"] == " tok tok tok"
        assert body["usage"]["completion_tokens"] == 3
    # Plain NATS callers through the router get shadowed too.
    for i in range(5):
        chunks = await nats_generate(
            nc, subjects.infer("llm", model), GenerateRequest(request_id=f"sh-{i}", model=model, max_tokens=3)
        )
        assert isinstance(chunks[-1], Final) and chunks[-1].version == "live"

    deadline = time.monotonic() + 10
    while True:
        report = await admin(nc, "comparisons", model=model, limit=50)
        if report["count"] >= 25 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert report["count"] == 25
    for record in report["records"]:
        assert (record["version"], record["shadow_version"]) == ("live", "candidate")
        assert record["error"] is None and record["shadow_error"] is None
        assert record["output_chars"] == len(" tok tok tok") and record["shadow_output_chars"] == len(" shadow" * 3)
        assert 0 < record["similarity"] < 1
    stats = {s["worker_id"]: s for s in await bus.service_stats(nc, "inferbus-llm", wait=0.3)}
    shadow_worker, live_worker = stats[ids["candidate"]], stats[ids["live"]]
    assert shadow_worker["shadow_served"] == 25 and shadow_worker["shadow_tokens"] > 0
    assert live_worker["shadow_served"] == 0 and live_worker["served"] == 25


# ---- automatic rollback and promotion ---------------------------------------------------------


async def drive_until(
    http: aiohttp.ClientSession, gw: Gateway, model: str, done: Any, limit_s: float = 40
) -> list[tuple[int, str | None, dict[str, Any]]]:
    """Send traffic in small batches until `done(model view)` holds."""
    sent = []
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        sent += await completions(http, gw, model, 10, concurrency=5)
        if done(await model_view(http, gw, model)):
            return sent
    raise TimeoutError(f"{model}: condition not reached in {limit_s}s")


async def test_failing_canary_is_rolled_back_automatically(
    infra: EmbeddedStack, nc: bus.Connection, gateway: Gateway, registry: ServiceProcess, workers: Workers
) -> None:
    model = "rollout-faulty"
    await serve(infra, nc, workers, model, v1={}, v2={"fault_error_rate": 0.5})
    await admin(nc, "deploy", model=model, version="v1")
    analysis = {"interval_s": 0.5, "window_s": 30, "min_samples": 10}
    view = await admin(nc, "canary", model=model, version="v2", weight=50, analysis=analysis)
    async with aiohttp.ClientSession() as http:
        await until_gateway(http, gateway, model, view["revision"], workers=2)
        sent = await drive_until(http, gateway, model, lambda v: v["inferbus"]["policy"].get("canary") is None)
        assert any(status == 500 for status, _, _ in sent)  # the canary did fail some requests
        after = await completions(http, gateway, model, 50)
    assert {(status, version) for status, version, _ in after} == {(200, "v1")}
    history = await admin(nc, "history", model=model)
    rollback = history[0]
    assert (rollback["action"], rollback["actor"]) == ("auto_rollback", "canary-controller")
    assert "error rate" in rollback["reason"]
    assert rollback["before"]["canary"] == "v2" and "canary" not in rollback["after"]
    shown = await admin(nc, "show", model=model)
    assert {v["version"]: v["status"] for v in shown["versions"]} == {"v1": "stable", "v2": "rolled_back"}


async def test_healthy_canary_is_promoted_step_by_step(
    infra: EmbeddedStack, nc: bus.Connection, gateway: Gateway, registry: ServiceProcess, workers: Workers
) -> None:
    model = "rollout-steps"
    await serve(infra, nc, workers, model, v1={}, v2={})
    await admin(nc, "deploy", model=model, version="v1")
    analysis = {"interval_s": 0.5, "window_s": 30, "min_samples": 5}
    view = await admin(nc, "canary", model=model, version="v2", weight=20, steps=[20, 60, 100], analysis=analysis)
    async with aiohttp.ClientSession() as http:
        await until_gateway(http, gateway, model, view["revision"], workers=2)
        await drive_until(http, gateway, model, lambda v: v["inferbus"]["policy"].get("stable") == "v2")
        after = await completions(http, gateway, model, 20)
    assert {version for _, version, _ in after} == {"v2"}
    actions = [(e["action"], e["actor"]) for e in reversed(await admin(nc, "history", model=model))]
    assert actions[-2:] == [("auto_promote", "canary-controller")] * 2
    steps = [
        e["after"]["canary_weight"] if e["after"].get("canary") else f"stable={e['after']['stable']}"
        for e in reversed(await admin(nc, "history", model=model))
        if e["action"] == "auto_promote"
    ]
    assert steps == [60, "stable=v2"]  # 20 -> 60, then promoted


# ---- presence -----------------------------------------------------------------------------------


async def test_killed_worker_leaves_routing_within_3s(
    infra: EmbeddedStack, nc: bus.Connection, gateway: Gateway, registry: ServiceProcess, workers: Workers
) -> None:
    model = "rollout-kill"
    await admin(nc, "register", model=model, version="v1", engine="benchmark")
    view = await admin(nc, "deploy", model=model, version="v1")
    procs = [start_worker(infra, model, version="v1") for _ in range(2)]
    workers.update({f"kill-{i}": p for i, p in enumerate(procs)})
    victim_id = (await wait_worker(nc, model, procs[0]))["worker_id"]
    survivor_id = (await wait_worker(nc, model, procs[1]))["worker_id"]
    heard: list[str] = []

    async def overheard(msg: Any) -> None:
        heard.append(msg.subject)

    async with aiohttp.ClientSession() as http:
        await until_gateway(http, gateway, model, view["revision"], workers=2)
        warm = await completions(http, gateway, model, 40)
        assert {status for status, _, _ in warm} == {200}
        procs[0].kill()
        killed = time.monotonic()
        # Listen where the dead worker used to be: anything routed to it lands here.
        sub = await nc.subscribe(subjects.infer("llm", model, "v1", victim_id), cb=overheard)
        while True:
            live = {w["worker_id"] for w in (await model_view(http, gateway, model))["inferbus"]["live_workers"]}
            if victim_id not in live:
                break
            assert time.monotonic() - killed < 3.5, "dead worker still in routing"
            await asyncio.sleep(0.05)
        assert live == {survivor_id}
        heard.clear()
        after = await completions(http, gateway, model, 60)
        await nc.flush()
        await sub.unsubscribe()
    assert {status for status, _, _ in after} == {200}
    assert heard == []


# ---- bad admin input ----------------------------------------------------------------------------


async def test_bad_admin_input_is_refused_with_typed_errors_and_changes_nothing(
    infra: EmbeddedStack, nc: bus.Connection, registry: ServiceProcess
) -> None:
    model = "rollout-bad"
    await admin(nc, "register", model=model, version="v1", engine="benchmark")
    await admin(nc, "register", model=model, version="v2", engine="benchmark")
    await admin(nc, "deploy", model=model, version="v1")
    before = await admin(nc, "show", model=model)
    history_before = await admin(nc, "history", model=model)
    cases: list[tuple[str, dict[str, Any], str, str | None]] = [
        ("canary", {"model": "no-such-model", "version": "v2", "weight": 5}, "model_not_found", "model"),
        ("canary", {"model": model, "version": "v2", "weight": 150}, "invalid_request", "weight"),
        ("canary", {"model": model, "version": "v2", "weight": -1}, "invalid_request", "weight"),
        ("canary", {"model": model, "version": "v9", "weight": 5}, "not_found", "version"),
        ("canary", {"model": model, "version": "v1", "weight": 5}, "invalid_request", "version"),
        ("canary", {"model": model, "version": "v2", "weight": 5, "steps": [50, 10]}, "invalid_request", "steps"),
        ("register", {"model": model, "version": "v3", "engine": "faster-whisper"}, "invalid_request", "engine"),
        ("register", {"model": model, "kind": "asr", "version": "v3", "engine": "faster-whisper"}, "conflict", "kind"),
        ("register", {"model": model, "version": "v1", "engine": "benchmark"}, "conflict", "version"),
        ("register", {"model": "bad.name", "version": "v1", "engine": "benchmark"}, "invalid_request", "model"),
        ("ab", {"model": model, "groups": {"v1": 50, "v2": 40}}, "invalid_request", "groups"),
        ("shadow", {"model": model, "version": "v1"}, "invalid_request", "version"),
        ("promote", {"model": model}, "conflict", "model"),
        ("rollback", {"model": model}, "conflict", "model"),
        ("deploy", {"model": model, "version": "v2", "surprise": 1}, "invalid_request", None),
        ("deploy", {"model": model}, "invalid_request", None),
    ]
    for op, body, code, param in cases:
        with pytest.raises(AdminFailed) as err:
            await admin(nc, op, **body)
        assert (err.value.code, err.value.param) == (code, param), (op, body, err.value)
    with pytest.raises(AdminFailed) as err:
        await admin_raw(nc, "canary", b"{not json")
    assert err.value.code == "invalid_request"
    assert await admin(nc, "show", model=model) == {**before, "workers": [], "metrics": []}
    assert await admin(nc, "history", model=model) == history_before


# ---- CLI ----------------------------------------------------------------------------------------


def cli(infra: EmbeddedStack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**infra.env(), "INFERBUS_DATA_DIR": str(infra.root / "cli")}
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", "models", *args], env=env, capture_output=True, text=True,
        timeout=60,
    )


async def test_models_cli(infra: EmbeddedStack, nc: bus.Connection, registry: ServiceProcess) -> None:
    model = "rollout-cli"
    run = await asyncio.to_thread(cli, infra, "register", model, "v1", "--engine", "benchmark", "--param", "n_ctx=512")
    assert run.returncode == 0, run.stderr
    for args in (("register", model, "v2", "--engine", "benchmark"), ("deploy", model, "v1"),
                 ("canary", model, "v2", "--weight", "5", "--steps", "5,50,100", "--interval", "30")):
        run = await asyncio.to_thread(cli, infra, *args)
        assert run.returncode == 0, run.stderr
    assert "canary=v2@5% steps=5,50,100" in run.stdout
    listing = await asyncio.to_thread(cli, infra, "list")
    line = next(row for row in listing.stdout.splitlines() if row.startswith(model))
    assert "stable=v1" in line and "v1,v2" in line
    as_json = await asyncio.to_thread(cli, infra, "--json", "show", model)
    shown = json.loads(as_json.stdout)
    assert shown["versions"][0]["params"] == {"n_ctx": 512}
    run = await asyncio.to_thread(cli, infra, "rollback", model, "--reason", "operator says no")
    assert run.returncode == 0 and "stable=v1" in run.stdout and "canary" not in run.stdout.splitlines()[0]
    history = await asyncio.to_thread(cli, infra, "history", model)
    assert "operator says no" in history.stdout and f"cli:{getpass.getuser()}" in history.stdout
    bad = await asyncio.to_thread(cli, infra, "canary", model, "v2", "--weight", "250")
    assert bad.returncode == 1 and "error (invalid_request) [weight]" in bad.stderr
    unknown = await asyncio.to_thread(cli, infra, "show", "nope")
    assert unknown.returncode == 1 and "model_not_found" in unknown.stderr
