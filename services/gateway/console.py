"""The ops console (GET /console) and the admin JSON it reads: live services and workers, the model registry.

The page (static/console.html, plain HTML, JavaScript and inline SVG, nothing loaded from elsewhere) needs no
key to load; every call it makes carries the admin key the operator typed in, as an Authorization header,
never in a URL. Beside the existing admin API (keys, /v1/usage, /v1/admin/requests) it reads:
- GET /v1/admin/services: every service instance that answers NATS micro discovery, and every worker this
  gateway hears heartbeats from, with its load;
- /v1/admin/models...: the registry's list, show, promote and rollback, asked over NATS with the admin key's
  id as the actor the registry's audit history records.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import msgspec
from aiohttp import web

from contracts import registry, subjects
from contracts.control import WorkerLoad
from services.gateway import openapi
from services.gateway.admin_routes import admin_body, admin_key, ask
from services.gateway.errors import json_response
from services.gateway.openapi import Op
from services.gateway.state import GATEWAY
from services.runtime import bus

routes = web.RouteTableDef()
REGISTRY_TIMEOUT_S = 5.0
DISCOVERY_WAIT_S = 0.3  # how long /v1/admin/services gathers micro STATS answers


class ServiceInstance(msgspec.Struct, frozen=True, kw_only=True):
    """One running service process, as it answered `$SRV.STATS` (answering at all is its liveness)."""

    name: str
    id: str
    version: str
    started: str | None
    requests: int  # handled on its endpoints, errors included
    errors: int
    stats: dict[str, Any]  # what the service reports of itself (a worker: model, in_flight, ...)


class LiveWorker(WorkerLoad, frozen=True, kw_only=True):
    """A worker this gateway heard a heartbeat from within the presence TTL: its last heartbeat, and its load."""

    load: float  # (in flight + queued) / capacity
    last_seen_s: float


class Fleet(msgspec.Struct, frozen=True, kw_only=True):
    object: str = "fleet"
    services: list[ServiceInstance]
    workers: list[LiveWorker]


class RegisteredModels(msgspec.Struct, frozen=True, kw_only=True):
    object: str = "list"
    data: list[registry.ModelView]


def page() -> bytes:
    return resources.files("services.gateway").joinpath("static", "console.html").read_bytes()


@routes.get("/console")
async def console(_: web.Request) -> web.Response:
    """The ops console (HTML; its data calls need an admin key)."""
    return web.Response(body=page(), content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-cache"})


def instance(svc: dict[str, Any]) -> ServiceInstance:
    endpoints = svc.get("endpoints") or []
    return ServiceInstance(
        name=str(svc.get("name", "?")), id=str(svc.get("id", "?")), version=str(svc.get("version", "?")),
        started=svc.get("started"), requests=sum(int(e.get("num_requests", 0)) for e in endpoints),
        errors=sum(int(e.get("num_errors", 0)) for e in endpoints), stats=bus.stats_data(svc),
    )


def live_worker(heard: WorkerLoad, age_s: float) -> LiveWorker:
    return LiveWorker(**msgspec.structs.asdict(heard),
                      load=round((heard.in_flight + heard.queued) / max(heard.capacity, 1), 3),
                      last_seen_s=round(age_s, 1))


@routes.get("/v1/admin/services")
async def services(request: web.Request) -> web.Response:
    """Live service instances (NATS micro discovery) and workers (heartbeats) with their load."""
    await admin_key(request)
    gw = request.app[GATEWAY]
    found = await bus.discover(gw.service.bus, "STATS", wait=DISCOVERY_WAIT_S)
    fleet = Fleet(
        services=sorted(map(instance, found), key=lambda s: (s.name, s.id)),
        workers=sorted((live_worker(load, age) for load, age in gw.catalogue.live_workers()),
                       key=lambda w: (w.kind, w.model, w.version, w.worker_id)),
    )
    return json_response(200, fleet)


async def ask_registry(request: web.Request, op: str, typ: type[Any], **fields: Any) -> Any:
    """The registry's answer to an admin's `op`, or its typed error; 503 when no registry answers."""
    body = await admin_body(request, typ, **fields)
    return await ask(request, subjects.registry_admin(op), body, "model registry", REGISTRY_TIMEOUT_S)


@routes.get("/v1/admin/models")
async def list_models(request: web.Request) -> web.Response:
    return json_response(200, {"object": "list", "data": await ask_registry(request, "list", registry.ListModels)})


@routes.get("/v1/admin/models/{model}")
async def show_model(request: web.Request) -> web.Response:
    model = request.match_info["model"]
    return json_response(200, await ask_registry(request, "show", registry.ShowModel, model=model))


@routes.post("/v1/admin/models/{model}/promote")
async def promote(request: web.Request) -> web.Response:
    model = request.match_info["model"]
    return json_response(200, await ask_registry(request, "promote", registry.Promote, model=model))


@routes.post("/v1/admin/models/{model}/rollback")
async def rollback(request: web.Request) -> web.Response:
    model = request.match_info["model"]
    return json_response(200, await ask_registry(request, "rollback", registry.Rollback, model=model))


for _method, _path, _op in (
    ("GET", "/console", Op("The ops console (its data calls need an admin key)", content_type="text/html",
                           tags=("console",), auth=())),
    ("GET", "/v1/admin/services", Op("Live services and workers with their load", response=Fleet,
                                     tags=("admin",))),
    ("GET", "/v1/admin/models", Op("Registered models: versions, traffic policy, workers, metrics",
                                   response=RegisteredModels, tags=("admin",))),
    ("GET", "/v1/admin/models/{model}", Op("One registered model", response=registry.ModelView, tags=("admin",))),
    ("POST", "/v1/admin/models/{model}/promote", Op(
        "Make the canary stable (body {\"weight\": n}: set its weight instead)", response=registry.ModelView,
        tags=("admin",))),
    ("POST", "/v1/admin/models/{model}/rollback", Op(
        "Take the canary out of traffic (body {\"reason\": ...} optional)", response=registry.ModelView,
        tags=("admin",))),
):
    openapi.describe(_method, _path, _op)
