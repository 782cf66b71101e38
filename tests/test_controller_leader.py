"""One canary controller among registry replicas, fed by the alias router's traffic too.

Two registry processes share PostgreSQL and NATS; both answer admin requests and hear outcomes, and
only the holder of the controller's lease (NATS KV) steps or rolls back a canary. All traffic here
comes through the alias router (plain NATS callers), so the controller sees only what the router reports.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from contracts import subjects
from contracts.llm import ErrorChunk, Final, GenerateRequest
from contracts.registry import Outcome, decode_outcomes
from services.runtime import bus
from services.runtime.local import EmbeddedStack, ServiceProcess, settings_env, wait_service
from tests.conftest import Workers
from tests.test_metering import until
from tests.test_registry import admin, nats_generate, serve

# Both replicas reload every table each second: without one leader, the one that did not change a
# policy would still act on it (the double steps and rollbacks this module guards against).
REGISTRY_SETTINGS = {"resync_s": 1.0, "leader_lease_s": 2.0}


async def registries_by_pid(nc: bus.Connection) -> dict[int, dict[str, Any]]:
    return {s["pid"]: s for s in await bus.service_stats(nc, "inferbus-registry", wait=0.3) if "pid" in s}


async def leader_among(nc: bus.Connection, procs: list[ServiceProcess], limit_s: float = 30) -> ServiceProcess:
    """The one live process of `procs` that holds the lease, once every live one answers and exactly one leads."""
    deadline = time.monotonic() + limit_s
    while True:
        live = [p for p in procs if p.popen.poll() is None]
        stats = await registries_by_pid(nc)
        leaders = [p for p in live if stats.get(p.pid, {}).get("leader")]
        if all(p.pid in stats for p in live) and len(leaders) == 1:
            return leaders[0]
        assert time.monotonic() < deadline, f"no single leader among {[p.pid for p in live]}: {stats}"


@pytest.fixture(scope="module")
async def registries(infra: EmbeddedStack, nc: bus.Connection) -> AsyncIterator[list[ServiceProcess]]:
    procs: list[ServiceProcess] = []
    try:
        for name in ("registry-a", "registry-b"):  # one after the other: the first applies the migrations
            procs.append(ServiceProcess(name, "services.registry", infra.env(**settings_env(**REGISTRY_SETTINGS)),
                                        infra.root))
            await wait_service(nc, "inferbus-registry", procs[-1])
        await leader_among(nc, procs)
        yield procs
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture(scope="module")
async def router(
    infra: EmbeddedStack, nc: bus.Connection, registries: list[ServiceProcess]
) -> AsyncIterator[ServiceProcess]:
    proc = ServiceProcess("router", "services.router", infra.env(), infra.root)
    await wait_service(nc, "inferbus-router", proc)
    yield proc
    proc.stop()


async def through_router(nc: bus.Connection, model: str, n: int, tag: str) -> list[Any]:
    """n plain NATS requests on the alias subject, 10 at a time; the last chunk of each."""
    ends: list[Any] = []
    for start in range(0, n, 10):
        batch = await asyncio.gather(*(
            nats_generate(nc, subjects.infer("llm", model),
                          GenerateRequest(request_id=f"{tag}-{i}", model=model, max_tokens=2))
            for i in range(start, min(n, start + 10))
        ))
        ends += [chunks[-1] for chunks in batch]
    return ends


async def drive_until(nc: bus.Connection, model: str, done: Callable[[dict[str, Any]], bool], limit_s: float = 60
                      ) -> dict[str, Any]:
    """Router traffic in batches until `done(model view)` holds."""
    deadline = time.monotonic() + limit_s
    batch = 0
    while True:
        await through_router(nc, model, 10, f"{model}-{batch}")
        batch += 1
        view: dict[str, Any] = await admin(nc, "show", model=model)
        if done(view):
            return view
        assert time.monotonic() < deadline, f"{model}: not reached in {limit_s}s: {view['policy']}"


async def routed(nc: bus.Connection, model: str, limit_s: float = 10) -> list[Any]:
    """Router traffic until some of it fails (reaches the faulty canary); the last chunk of each request."""
    deadline = time.monotonic() + limit_s
    ends: list[Any] = []
    while not any(isinstance(end, ErrorChunk) for end in ends):
        assert time.monotonic() < deadline, f"the router never routed {model} to its canary"
        ends += await through_router(nc, model, 10, f"{model}-probe-{time.monotonic_ns()}")
    return ends


def audit_time(entry: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(entry["at"]).timestamp()


async def deployed(infra: EmbeddedStack, nc: bus.Connection, workers: Workers, model: str, **v2: Any) -> None:
    """`model` v1 (stable) and v2 (with worker settings `v2`), one benchmark worker each."""
    await serve(infra, nc, workers, model, v1={}, v2=v2)
    await admin(nc, "deploy", model=model, version="v1")


async def roll_back(nc: bus.Connection, model: str) -> None:
    """A canary of v2 at 50 %, analysed every 0.5 s, and router traffic until the controller rolls it back."""
    analysis = {"interval_s": 0.5, "window_s": 30, "min_samples": 10}
    await admin(nc, "canary", model=model, version="v2", weight=50, analysis=analysis)
    await drive_until(nc, model, lambda view: view["policy"].get("canary") is None)


async def test_router_traffic_reports_outcomes(
    infra: EmbeddedStack, nc: bus.Connection, router: ServiceProcess, workers: Workers
) -> None:
    model = "lead-outcomes"
    await deployed(infra, nc, workers, model, fault_error_rate=1.0)
    patient = {"interval_s": 60, "window_s": 60, "min_samples": 1000}  # no verdict during this test
    heard: list[Outcome] = []

    async def on_outcome(msg: Any) -> None:
        heard.extend(decode_outcomes(msg.data))

    sub = await nc.subscribe(subjects.outcome("llm", model), cb=on_outcome)
    try:
        await admin(nc, "canary", model=model, version="v2", weight=50, analysis=patient)
        ends = await routed(nc, model) + await through_router(nc, model, 40, "outcomes")
        deadline = time.monotonic() + 10
        while len(heard) < len(ends):
            assert time.monotonic() < deadline, f"{len(heard)} of {len(ends)} outcomes"
            await nc.flush()
            await asyncio.sleep(0.02)
    finally:
        await sub.unsubscribe()
    served = [end for end in ends if isinstance(end, Final)]
    failed = [end for end in ends if isinstance(end, ErrorChunk)]
    assert served and failed and len(served) + len(failed) == len(ends) == len(heard)
    assert {end.version for end in served} == {"v1"} and {end.code for end in failed} == {"engine_error"}
    good = [o for o in heard if o.version == "v1"]
    bad = [o for o in heard if o.version == "v2"]
    assert len(good) == len(served) and all(o.ok and o.code == "ok" and o.ttft_ms is not None for o in good)
    assert len(bad) == len(failed) and all(not o.ok and o.code == "engine_error" for o in bad)
    assert all(o.latency_ms > 0 for o in heard)
    # The registry's per-version metrics now count the router's traffic.
    metrics = {m["version"]: m for m in (await admin(nc, "show", model=model))["metrics"]}
    assert metrics["v2"]["error_rate"] == 1.0 and metrics["v1"]["error_rate"] == 0.0
    assert metrics["v1"]["requests"] >= len(served) and metrics["v2"]["requests"] >= len(failed)


async def test_router_answers_no_worker_at_once(nc: bus.Connection, router: ServiceProcess) -> None:
    model = "lead-nobody"
    await admin(nc, "register", model=model, version="v1", engine="benchmark")
    view = await admin(nc, "deploy", model=model, version="v1")  # and no worker serves it
    heard: list[Outcome] = []

    async def on_outcome(msg: Any) -> None:
        heard.extend(decode_outcomes(msg.data))

    sub = await nc.subscribe(subjects.outcome("llm", model), cb=on_outcome)
    try:
        deadline = time.monotonic() + 10
        while True:  # until the router has the table (before, it answers model_not_found)
            started = time.monotonic()
            request = GenerateRequest(request_id=f"nobody-{started}", model=model, max_tokens=2)
            chunks = await nats_generate(nc, subjects.infer("llm", model), request)
            if chunks[0].code != "model_not_found" or time.monotonic() > deadline:
                break
        assert len(chunks) == 1 and isinstance(chunks[0], ErrorChunk) and chunks[0].code == "no_worker", chunks
        assert time.monotonic() - started < 1  # not the caller's own timeout
        while not heard:
            assert time.monotonic() < deadline
            await nc.flush()
        assert (heard[0].version, heard[0].ok, heard[0].code) == ("v1", False, "no_worker")
    finally:
        await sub.unsubscribe()
    assert view["revision"] > 0


async def test_failing_canary_is_rolled_back_once(
    infra: EmbeddedStack, nc: bus.Connection, registries: list[ServiceProcess], router: ServiceProcess,
    workers: Workers,
) -> None:
    model = "lead-rollback"
    leader = await leader_among(nc, registries)
    await deployed(infra, nc, workers, model, fault_error_rate=1.0)
    await roll_back(nc, model)
    rolled_back = time.monotonic()
    # Both replicas have reloaded every table twice since (resync_s = 1): a follower acting on the canary it
    # loaded would have done so by now.
    while time.monotonic() - rolled_back < 2.5:
        await through_router(nc, model, 10, f"after-{time.monotonic_ns()}")
    history = await admin(nc, "history", model=model)
    rollbacks = [e for e in history if e["action"] == "auto_rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["actor"] == "canary-controller"
    assert "error rate" in rollbacks[0]["reason"]
    logged = {p.pid: p.log().count('"canary_rolled_back"') for p in registries}
    assert logged == {p.pid: int(p is leader) for p in registries}


async def test_healthy_canary_steps_once_per_interval(
    infra: EmbeddedStack, nc: bus.Connection, registries: list[ServiceProcess], router: ServiceProcess,
    workers: Workers,
) -> None:
    model = "lead-steps"
    leader = await leader_among(nc, registries)
    await deployed(infra, nc, workers, model)
    interval = 2.0
    analysis = {"interval_s": interval, "window_s": 30, "min_samples": 5}
    await admin(nc, "canary", model=model, version="v2", weight=20, steps=[20, 40, 60, 80, 100], analysis=analysis)
    await drive_until(nc, model, lambda view: view["policy"].get("stable") == "v2")
    history = list(reversed(await admin(nc, "history", model=model)))
    started = next(e for e in history if e["action"] == "canary")
    steps = [e for e in history if e["action"] == "auto_promote"]
    assert [e["after"].get("canary_weight") if e["after"].get("canary") else e["after"]["stable"] for e in steps] == [
        40, 60, 80, "v2"
    ]
    times = [audit_time(started)] + [audit_time(e) for e in steps]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap >= interval - 0.05 for gap in gaps), gaps  # one step per interval, never two at once
    logged = {p.pid: p.log().count('"canary_step"') for p in registries}
    assert logged == {p.pid: 4 if p is leader else 0 for p in registries}


async def test_another_replica_takes_over_when_the_leader_dies(
    infra: EmbeddedStack, nc: bus.Connection, registries: list[ServiceProcess], router: ServiceProcess,
    workers: Workers,
) -> None:
    model = "lead-takeover"
    await deployed(infra, nc, workers, model, fault_error_rate=1.0)
    leader = await leader_among(nc, registries)
    leader.kill()  # no step-down: the lease has to run out
    killed = time.monotonic()
    survivor = await leader_among(nc, registries)
    assert survivor is not leader
    ttl = (await nc.jetstream().stream_info("KV_INFERBUS_LEASES")).config.max_age or 0
    assert time.monotonic() - killed < ttl * 1.5 + 2  # the lease ran out, then the next refresh took it
    await roll_back(nc, model)
    rollbacks = [e for e in await admin(nc, "history", model=model) if e["action"] == "auto_rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["actor"] == "canary-controller"

    async def logged() -> bool:  # the registry logs the rollback just after it publishes the change seen above
        return survivor.log().count('"canary_rolled_back"') >= 1

    await until(logged, "the survivor to log the rollback it made", 10)
