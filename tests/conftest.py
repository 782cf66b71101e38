"""Fixtures: real nats-server, PostgreSQL and Redis from wheels on free ports; services as real processes."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from contracts import usage
from contracts.usage import UsageEvent
from services.runtime import bus
from services.runtime.bus import DeliverPolicy
from services.runtime.embedded import free_port
from services.runtime.local import EmbeddedStack, ServiceProcess, settings_env, wait_http, wait_service, wait_worker

ADMIN_KEY = "ib-test-admin-" + "x" * 24
BENCH_MODEL = "bench-fast"
SLOW_MODEL = "bench-slow"
GHOST_MODEL = "ghost"
DEFAULT_MODEL = "smollm2-135m-instruct"
SlowWorker = tuple[ServiceProcess, dict[str, Any]]
Workers = dict[str, ServiceProcess]


@contextlib.contextmanager
def stack_in_tempdir(
    prefix: str, keep: Callable[[], bool] = lambda: False, **options: Any
) -> Iterator[EmbeddedStack]:
    """A started EmbeddedStack (nats-server, PostgreSQL, Redis) in a fresh folder, stopped at the end.

    The folder is removed then, unless `keep()` says otherwise (its logs and data are kept for a look).
    """
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)  # PostgreSQL may run as a user of its own
    stack = EmbeddedStack(root, **options)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        if keep():
            print(f"\nservice logs and data kept under {root}")
        else:  # data dirs and joined model weights (~150 MB) would pile up run after run
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def infra(request: pytest.FixtureRequest) -> Iterator[EmbeddedStack]:
    with stack_in_tempdir("inferbus-test-", keep=lambda: bool(request.session.testsfailed)) as servers:
        yield servers


@pytest.fixture(scope="session")
async def nc(infra: EmbeddedStack) -> AsyncIterator[bus.Connection]:
    conn = await bus.connect(infra.nats_url, "tests", identity=infra.identity())
    yield conn
    await conn.close()


async def worker_stats(nc: bus.Connection, worker_id: str) -> dict[str, Any]:
    for data in await bus.service_stats(nc, "inferbus-llm", wait=0.2):
        if data.get("worker_id") == worker_id:
            return data
    raise LookupError(worker_id)


def start_worker(
    infra: EmbeddedStack, model: str, engine: str = "benchmark", version: str | None = None, **settings: Any
) -> ServiceProcess:
    version = version or ("v1" if engine == "benchmark" else "q4_1")
    env = infra.env(**settings_env(model=model, version=version, engine=engine, **settings))
    return ServiceProcess(f"llm-{model}", "services.llm", env, infra.root)


class Gateway:
    def __init__(self, proc: ServiceProcess, url: str) -> None:
        self.proc = proc
        self.url = url
        self.headers = {"Authorization": f"Bearer {ADMIN_KEY}"}


def start_gateway(infra: EmbeddedStack, **settings: Any) -> Gateway:
    port = free_port()
    models = [
        {"name": DEFAULT_MODEL, "version": "q4_1"},
        {"name": BENCH_MODEL, "version": "v1"},
        {"name": SLOW_MODEL, "version": "v1"},
        {"name": GHOST_MODEL, "version": "v1"},
    ]
    env = infra.env(**{
        "INFERBUS_PORT": str(port), "INFERBUS_ADMIN_KEY": ADMIN_KEY, "INFERBUS_MODELS": json.dumps(models),
        **settings_env(**settings),
    })
    return Gateway(ServiceProcess("gateway", "services.gateway", env, infra.root), f"http://127.0.0.1:{port}")


@contextlib.asynccontextmanager
async def running_gateway(infra: EmbeddedStack, **settings: Any) -> AsyncIterator[Gateway]:
    """A gateway (start_gateway's settings), once it answers HTTP; stopped at the end."""
    gw = start_gateway(infra, **settings)
    try:
        await wait_http(gw.url, gw.proc)
        yield gw
    finally:
        gw.proc.stop()


@pytest.fixture(scope="session")
async def gateway(infra: EmbeddedStack) -> AsyncIterator[Gateway]:
    async with running_gateway(infra) as gw:
        yield gw


@pytest.fixture(scope="session")
async def bench_worker(infra: EmbeddedStack, nc: bus.Connection) -> AsyncIterator[dict[str, Any]]:
    proc = start_worker(infra, BENCH_MODEL)
    stats = await wait_worker(nc, BENCH_MODEL, proc)
    yield stats
    proc.stop()


@pytest.fixture(scope="session")
async def default_worker(infra: EmbeddedStack, nc: bus.Connection) -> AsyncIterator[dict[str, Any]]:
    proc = start_worker(infra, DEFAULT_MODEL, engine="llamacpp")
    stats = await wait_worker(nc, DEFAULT_MODEL, proc, limit_s=180)
    yield stats
    proc.stop()


@pytest.fixture
async def slow_worker(infra: EmbeddedStack, nc: bus.Connection) -> AsyncIterator[SlowWorker]:
    """A paced benchmark worker of its own (20 tokens/s), for kill and disconnect tests."""
    proc = start_worker(infra, SLOW_MODEL, engine_options={"tokens_per_s": 20})
    stats = await wait_worker(nc, SLOW_MODEL, proc)
    yield proc, stats
    proc.stop()


@pytest.fixture
def workers() -> Iterator[Workers]:
    """Worker processes a test starts (name -> process); all stopped when the test ends."""
    started: Workers = {}
    yield started
    for proc in started.values():
        proc.stop()


@contextlib.asynccontextmanager
async def running_service(infra: EmbeddedStack, nc: bus.Connection, service: str) -> AsyncIterator[ServiceProcess]:
    """`python -m services.<service>` with the stack's settings, once it answers as inferbus-<service>; stopped
    at the end."""
    proc = ServiceProcess(service, f"services.{service}", infra.env(), infra.root)
    try:
        await wait_service(nc, f"inferbus-{service}", proc)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
async def registry(infra: EmbeddedStack, nc: bus.Connection) -> AsyncIterator[ServiceProcess]:
    """A registry of the requesting module's own."""
    async with running_service(infra, nc, "registry") as proc:
        yield proc


@pytest.fixture(scope="module")
async def router(infra: EmbeddedStack, nc: bus.Connection, registry: ServiceProcess) -> AsyncIterator[ServiceProcess]:
    """An alias router of the requesting module's own, beside its registry."""
    async with running_service(infra, nc, "router") as proc:
        yield proc


async def usage_event(nc: bus.Connection, kind: str, model: str, request_id: str, limit_s: float = 10) -> UsageEvent:
    """A worker's usage event for one request, read back from the USAGE stream."""
    js = nc.jetstream()
    sub = await js.subscribe(usage.subject(kind, model), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    deadline = time.monotonic() + limit_s
    try:
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await sub.next_msg(timeout=left)
            except bus.errors.TimeoutError:
                break
            for event in usage.events_of(msg.data):  # one event, or a worker's batch of them
                if event.request_id == request_id:
                    return event
    finally:
        await sub.unsubscribe()
    raise LookupError(f"no usage event for {request_id}")
