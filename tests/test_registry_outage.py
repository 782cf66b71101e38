"""Routing tables reach every gateway fast, and gateways keep routing when the registry is gone."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import aiohttp

from services.runtime import bus
from services.runtime.local import EmbeddedStack, ServiceProcess, wait_http, wait_service
from tests.conftest import Gateway, Workers, start_gateway
from tests.test_registry import admin, completions, serve, until_gateway


async def test_policy_reaches_two_gateways_within_1s_and_survives_registry_stop(
    infra: EmbeddedStack, nc: bus.Connection, gateway: Gateway, workers: Workers
) -> None:
    registry = ServiceProcess("registry-outage", "services.registry", infra.env(), infra.root)
    second = start_gateway(infra)
    try:
        await wait_service(nc, "inferbus-registry", registry)
        await wait_http(second.url, second.proc)
        model = "rollout-propagation"
        await serve(infra, nc, workers, model, v1={}, v2={})
        view = await admin(nc, "deploy", model=model, version="v1")
        gateways = [gateway, second]
        async with aiohttp.ClientSession() as http:
            await asyncio.gather(*(until_gateway(http, gw, model, view["revision"], workers=2) for gw in gateways))
            for weight in (10, 30, 50):
                sent = time.monotonic()
                view = await admin(nc, "canary", model=model, version="v2", weight=weight)

                async def seen(gw: Gateway, revision: int, since: float) -> float:
                    await until_gateway(http, gw, model, revision, limit_s=5)
                    return time.monotonic() - since

                delays = await asyncio.gather(*(seen(gw, view["revision"], sent) for gw in gateways))
                assert max(delays) < 1.0, delays

            registry.stop()
            assert registry.popen.returncode == 0, registry.log()[-2000:]
            for gw in gateways:
                results = await completions(http, gw, model, 200)
                assert {status for status, _, _ in results} == {200}
                served = Counter(version for _, version, _ in results)
                assert 60 <= served["v2"] <= 140, served  # still the 50 % split from the last table
    finally:
        registry.stop()
        second.proc.stop()
