"""Fixtures: real nats-server, PostgreSQL and Redis from wheels on free ports; services as real processes."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from services.runtime import bus
from services.runtime.embedded import free_port
from services.runtime.local import EmbeddedStack, ServiceProcess, settings_env, wait_http, wait_worker

ADMIN_KEY = "ib-test-admin-" + "x" * 24
BENCH_MODEL = "bench-fast"
SLOW_MODEL = "bench-slow"
GHOST_MODEL = "ghost"
DEFAULT_MODEL = "smollm2-135m-instruct"
SlowWorker = tuple[ServiceProcess, dict[str, Any]]
Workers = dict[str, ServiceProcess]

@pytest.fixture(scope="session")
def infra(request: pytest.FixtureRequest) -> Iterator[EmbeddedStack]:
    root = Path(tempfile.mkdtemp(prefix="inferbus-test-"))
    root.chmod(0o755)
    servers = EmbeddedStack(root)
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()
        if request.session.testsfailed:
            print(f"\nservice logs and data kept under {root}")
        else:  # data dirs and joined model weights (~150 MB) would pile up run after run
            shutil.rmtree(root, ignore_errors=True)


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


@pytest.fixture(scope="session")
async def gateway(infra: EmbeddedStack) -> AsyncIterator[Gateway]:
    gw = start_gateway(infra)
    await wait_http(gw.url, gw.proc)
    yield gw
    gw.proc.stop()


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
