"""Fixtures: real nats-server, PostgreSQL and Redis from wheels on free ports; services as real processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from services.runtime import bus
from services.runtime.embedded import NatsServer, PostgresServer, RedisServer, free_port

ADMIN_KEY = "ib-test-admin-" + "x" * 24
BENCH_MODEL = "bench-fast"
SLOW_MODEL = "bench-slow"
GHOST_MODEL = "ghost"
DEFAULT_MODEL = "smollm2-135m-instruct"


class Infra:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.nats = NatsServer(root)
        self.postgres = PostgresServer(root)
        self.redis = RedisServer(root)
        self.nats_url = self.nats.start()
        self.database_url = self.postgres.start()
        self.redis_url = self.redis.start()

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "INFERBUS_NATS_URL": self.nats_url,
            "INFERBUS_DATABASE_URL": self.database_url,
            "INFERBUS_REDIS_URL": self.redis_url,
            "PYTHONUNBUFFERED": "1",
            **extra,
        }

    def stop(self) -> None:
        for server in (self.redis, self.postgres, self.nats):
            server.stop()


class Proc:
    """A service running as its own OS process, with its log captured to a file."""

    def __init__(self, name: str, module: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
        self.popen = subprocess.Popen(
            [sys.executable, "-m", module], env=env, stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="session")
def infra() -> Iterator[Infra]:
    root = Path(tempfile.mkdtemp(prefix="inferbus-test-"))
    root.chmod(0o755)
    servers = Infra(root)
    yield servers
    servers.stop()


@pytest.fixture(scope="session")
async def nc(infra: Infra) -> AsyncIterator[bus.Connection]:
    conn = await bus.connect(infra.nats_url, "tests")
    yield conn
    await conn.close()


async def wait_worker(nc: bus.Connection, model: str, proc: Proc, limit_s: float = 120) -> dict[str, Any]:
    """Wait until a worker of `model` reports ready in its micro stats; return those stats."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited:\n{proc.log()[-3000:]}")
        for svc in await bus.discover(nc, "STATS", "inferbus-llm", wait=0.2):
            for endpoint in svc.get("endpoints", []):
                data = endpoint.get("data") or {}
                if data.get("model") == model and data.get("ready"):
                    return dict(data)
    raise TimeoutError(f"{model} worker not ready:\n{proc.log()[-3000:]}")


async def worker_stats(nc: bus.Connection, worker_id: str) -> dict[str, Any]:
    for svc in await bus.discover(nc, "STATS", "inferbus-llm", wait=0.2):
        for endpoint in svc.get("endpoints", []):
            data = endpoint.get("data") or {}
            if data.get("worker_id") == worker_id:
                return dict(data)
    raise LookupError(worker_id)


def start_worker(infra: Infra, model: str, engine: str = "benchmark", **settings: Any) -> Proc:
    env = infra.env(INFERBUS_MODEL=model, INFERBUS_VERSION="v1", INFERBUS_ENGINE=engine)
    if engine != "benchmark":
        env["INFERBUS_VERSION"] = "q4_1"
    for key, value in settings.items():
        env[f"INFERBUS_{key.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return Proc(f"llm-{model}", "services.llm", env, infra.root)


class Gateway:
    def __init__(self, proc: Proc, url: str) -> None:
        self.proc = proc
        self.url = url
        self.headers = {"Authorization": f"Bearer {ADMIN_KEY}"}


def start_gateway(infra: Infra) -> Gateway:
    port = free_port()
    models = [
        {"name": DEFAULT_MODEL, "version": "q4_1"},
        {"name": BENCH_MODEL, "version": "v1"},
        {"name": SLOW_MODEL, "version": "v1"},
        {"name": GHOST_MODEL, "version": "v1"},
    ]
    env = infra.env(INFERBUS_PORT=str(port), INFERBUS_ADMIN_KEY=ADMIN_KEY, INFERBUS_MODELS=json.dumps(models))
    return Gateway(Proc("gateway", "services.gateway", env, infra.root), f"http://127.0.0.1:{port}")


async def wait_http(url: str, proc: Proc, limit_s: float = 60) -> None:
    import aiohttp

    deadline = time.monotonic() + limit_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited:\n{proc.log()[-3000:]}")
            try:
                async with http.get(url + "/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} not ready:\n{proc.log()[-3000:]}")


@pytest.fixture(scope="session")
async def gateway(infra: Infra) -> AsyncIterator[Gateway]:
    gw = start_gateway(infra)
    await wait_http(gw.url, gw.proc)
    yield gw
    gw.proc.stop()


@pytest.fixture(scope="session")
async def bench_worker(infra: Infra, nc: bus.Connection) -> AsyncIterator[dict[str, Any]]:
    proc = start_worker(infra, BENCH_MODEL)
    stats = await wait_worker(nc, BENCH_MODEL, proc)
    yield stats
    proc.stop()


@pytest.fixture(scope="session")
async def default_worker(infra: Infra, nc: bus.Connection) -> AsyncIterator[dict[str, Any]]:
    proc = start_worker(infra, DEFAULT_MODEL, engine="llamacpp")
    stats = await wait_worker(nc, DEFAULT_MODEL, proc, limit_s=180)
    yield stats
    proc.stop()


@pytest.fixture
async def slow_worker(infra: Infra, nc: bus.Connection) -> AsyncIterator[tuple[Proc, dict[str, Any]]]:
    """A paced benchmark worker of its own (20 tokens/s), for kill and disconnect tests."""
    proc = start_worker(infra, SLOW_MODEL, engine_options={"tokens_per_s": 20})
    stats = await wait_worker(nc, SLOW_MODEL, proc)
    yield proc, stats
    proc.stop()
