"""The platform's services as the registry-driven benchmarks start and drive them.

Gateways and benchmark-engine workers on an embedded stack (each appended to the run's `procs`, so the
harness stops it), the registry and its admin requests over NATS, and the waits for the gateway and the
alias router to route a model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aiohttp
import msgspec

from contracts import subjects
from services.runtime import bus
from services.runtime.embedded import free_port
from services.runtime.local import EmbeddedStack, ServiceProcess, settings_env, wait_service

# ---- processes ------------------------------------------------------------------------------------


def start_gateway(
    stack: EmbeddedStack, name: str, procs: list[ServiceProcess], admin_key: str, **settings: Any
) -> tuple[ServiceProcess, str]:
    """A gateway on a free port with `admin_key`; (its process, its base URL)."""
    port = free_port()
    env = stack.env(INFERBUS_PORT=str(port), INFERBUS_ADMIN_KEY=admin_key, **settings_env(**settings))
    proc = ServiceProcess(name, "services.gateway", env, stack.root)
    procs.append(proc)
    return proc, f"http://127.0.0.1:{port}"


def start_worker(
    stack: EmbeddedStack, name: str, model: str, version: str, procs: list[ServiceProcess], **settings: Any
) -> ServiceProcess:
    """A benchmark-engine LLM worker serving `model` `version`."""
    env = stack.env(**settings_env(model=model, version=version, engine="benchmark", **settings))
    proc = ServiceProcess(name, "services.llm", env, stack.root)
    procs.append(proc)
    return proc


def start_router(stack: EmbeddedStack, procs: list[ServiceProcess]) -> ServiceProcess:
    """The alias router (wait for it with `wait_service(nc, "inferbus-router", proc)`)."""
    proc = ServiceProcess("router", "services.router", stack.env(), stack.root)
    procs.append(proc)
    return proc


async def start_registry(stack: EmbeddedStack, nc: bus.Connection, procs: list[ServiceProcess]) -> ServiceProcess:
    """The registry, once it answers on the bus."""
    proc = ServiceProcess("registry", "services.registry", stack.env(), stack.root)
    procs.append(proc)
    await wait_service(nc, "inferbus-registry", proc)
    return proc


async def worker_stats(nc: bus.Connection, wait: float = 0.2) -> dict[Any, dict[str, Any]]:
    """The LLM workers' STATS, by worker_id."""
    return {s.get("worker_id"): s for s in await bus.service_stats(nc, "inferbus-llm", wait=wait)}


# ---- the registry -------------------------------------------------------------------------------


class AdminFailed(Exception):
    pass


async def admin(nc: bus.Connection, op: str, **body: Any) -> Any:
    msg = await nc.request(subjects.registry_admin(op), msgspec.json.encode(body), timeout=10)
    reply = msgspec.json.decode(msg.data)  # {"result": ...} or {"error": {"code", "message", "param"}}
    if reply.get("error"):
        raise AdminFailed(f"{op}: {reply['error'].get('code')}: {reply['error'].get('message')}")
    return reply.get("result")


async def register(nc: bus.Connection, model: str, versions: Iterable[str], stable: str = "v1") -> Any:
    """Register `versions` of `model` (benchmark engine) and deploy `stable`; the registry's view after the deploy."""
    for version in versions:
        await admin(nc, "register", model=model, version=version, engine="benchmark")
    return await admin(nc, "deploy", model=model, version=stable)


# ---- waiting for the routing to be in force ---------------------------------------------------------


async def model_view(
    http: aiohttp.ClientSession, base: str, admin_key: str, model: str
) -> dict[str, Any] | None:
    """The gateway's GET /v1/models/<model>; None unless it answers 200."""
    async with http.get(f"{base}/v1/models/{model}", headers={"Authorization": f"Bearer {admin_key}"}) as resp:
        if resp.status != 200:
            await resp.read()
            return None
        view: dict[str, Any] = await resp.json()
        return view


async def until_gateway(
    http: aiohttp.ClientSession,
    base: str,
    admin_key: str,
    model: str,
    revision: int,
    workers: int = 0,
    limit_s: float = 15,
    name: str = "the gateway",
) -> None:
    """Wait until the gateway at `base` routes `model` from `revision` (or later) and sees `workers` live workers."""
    deadline = time.monotonic() + limit_s
    while True:
        view = await model_view(http, base, admin_key, model)
        if view is not None:
            ib = view["inferbus"]
            if (ib["revision"] or 0) >= revision and len(ib["live_workers"]) >= workers:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} never showed {model} at revision {revision} with {workers} workers")
        await asyncio.sleep(0.05)


async def until_router_serves(call: Callable[[], Awaitable[object]], model: str, limit_s: float = 15) -> None:
    """Repeat `call` (one request through the router) until it succeeds: the router needs the routing table
    (and, for per-worker forwarding, a heartbeat of the worker)."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            await call()
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the router never served {model}: {exc!r}") from exc
            await asyncio.sleep(0.1)
