"""The platform's pieces as local processes: the embedded servers as one stack, services as children."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from services.runtime import bus
from services.runtime.embedded import NatsServer, PostgresServer, RedisServer
from services.runtime.natsauth import Secrets


def settings_env(**settings: Any) -> dict[str, str]:
    """Service settings as INFERBUS_* variables (non-strings as JSON, as the settings loader reads them)."""
    return {f"INFERBUS_{k.upper()}": v if isinstance(v, str) else json.dumps(v) for k, v in settings.items()}


class EmbeddedStack:
    """nats-server, PostgreSQL and Redis from the wheels, each on a free port; stop() is safe at any point."""

    def __init__(self, root: Path, *, secure: bool = True, tls: bool = False) -> None:
        self.root = root
        self.nats = NatsServer(root, secure=secure, tls=tls)
        self.postgres = PostgresServer(root)
        self.redis = RedisServer(root)
        self.nats_url = self.database_url = self.redis_url = ""

    def start(self) -> None:
        self.nats_url = self.nats.start()
        self.database_url = self.postgres.start()
        self.redis_url = self.redis.start()

    @property
    def nats_pid(self) -> int:
        assert self.nats.proc is not None
        return self.nats.proc.pid

    def identity(self, role: str = "operator") -> bus.Identity:
        """A role's NATS identity (the tests' and benchmarks' own connections use `operator`)."""
        ca = str(self.nats.secrets.root / "tls-ca.pem") if self.nats.tls else ""
        return bus.Identity(str(self.nats.secrets.credentials(role)) if self.nats.secure else "", tls_ca=ca)

    def env(self, **extra: str) -> dict[str, str]:
        # Inherited INFERBUS_* variables would change the services' settings: leave them out.
        base = {k: v for k, v in os.environ.items() if not k.startswith("INFERBUS_")}
        return {
            **base,
            # ServiceProcess turns this into the started module's own credentials (services.runtime.natsauth).
            **({SECRETS_ENV: str(self.nats.secrets.root)} if self.nats.secure else {}),
            "INFERBUS_DATA_DIR": str(self.root),  # worker usage spools and the like stay with the stack
            "INFERBUS_NATS_URL": self.nats_url,
            "INFERBUS_DATABASE_URL": self.database_url,
            "INFERBUS_REDIS_URL": self.redis_url,
            "PYTHONUNBUFFERED": "1",
            **extra,
        }

    def stop(self) -> None:
        errors = []
        for server in (self.redis, self.postgres, self.nats):
            try:
                server.stop()
            except Exception as exc:  # keep stopping the others
                errors.append(f"{server.name}: {exc!r}")
        if errors:
            raise RuntimeError("stopping embedded servers failed: " + "; ".join(errors))


SECRETS_ENV = "INFERBUS_NATS_SECRETS"


def with_identity(module: str, env: dict[str, str]) -> dict[str, str]:
    """`env` with the NATS identity of `module`'s role, when it names the generated secrets directory."""
    secrets_dir = env.get(SECRETS_ENV)
    if not secrets_dir:
        return env
    out = {k: v for k, v in env.items() if k != SECRETS_ENV}
    for key, value in Secrets(Path(secrets_dir)).service_env(module).items():
        out.setdefault(key, value)
    return out


class ServiceProcess:
    """One service (`python -m module`) as its own OS process, its output captured to a log file."""

    def __init__(self, name: str, module: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
        env = with_identity(module, env)
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen([sys.executable, "-m", module], env=env, stdout=log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.log()[-3000:]}")

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


async def wait_worker(nc: bus.Connection, model: str, proc: ServiceProcess, limit_s: float = 120) -> dict[str, Any]:
    """Wait until the worker process `proc` (serving `model`) reports ready in its micro stats; return them."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        proc.check_alive()
        for data in await bus.service_stats(nc, "inferbus-llm", wait=0.2):
            if data.get("model") == model and data.get("pid") == proc.pid and data.get("ready"):
                return data
    raise TimeoutError(f"{model} worker not ready:\n{proc.log()[-3000:]}")


async def wait_service(nc: bus.Connection, name: str, proc: ServiceProcess, limit_s: float = 60) -> None:
    """Wait until the micro service `name` (e.g. inferbus-registry) answers PING."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        proc.check_alive()
        if await bus.discover(nc, "PING", name, wait=0.2):
            return
    raise TimeoutError(f"{name} not ready:\n{proc.log()[-3000:]}")


async def wait_http(url: str, proc: ServiceProcess, limit_s: float = 60) -> None:
    """Wait until `url`/readyz answers 200."""
    deadline = time.monotonic() + limit_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            proc.check_alive()
            try:
                async with http.get(url + "/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} not ready:\n{proc.log()[-3000:]}")
