"""The operator's admin key: persistent, revocable, never revived by a restart; rotation is explicit."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from services.gateway.auth import new_key
from services.runtime.local import EmbeddedStack
from tests.conftest import Gateway, running_gateway

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _status(url: str, key: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(
        url + "/v1/models", headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        return resp.status


async def _key_id(gateway: Gateway, prefix: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(
        gateway.url + "/v1/admin/keys?include_revoked=true", headers=gateway.headers
    ) as resp:
        data: dict[str, Any] = await resp.json()
    return next(k["id"] for k in data["data"] if k["prefix"] == prefix)


async def _rotated(infra: EmbeddedStack, new: str, old: str) -> None:
    """A gateway started with `new` as its admin key and `old` as the previous one takes only `new`."""
    async with running_gateway(infra, admin_key=new, admin_key_previous=old) as gw:
        assert await _status(gw.url, new) == 200
        assert await _status(gw.url, old) == 401


async def test_a_revoked_bootstrap_key_stays_revoked_and_rotation_replaces_it(
    infra: EmbeddedStack, gateway: Gateway
) -> None:
    first = new_key()
    async with running_gateway(infra, admin_key=first) as gw:
        assert await _status(gw.url, first) == 200
        async with aiohttp.ClientSession() as http, http.post(
            gateway.url + f"/v1/admin/keys/{await _key_id(gateway, first[:10])}/revoke", json={},
            headers=gateway.headers,
        ) as resp:
            assert resp.status == 200
    async with running_gateway(infra, admin_key=first) as gw:  # a restart must not un-revoke it
        assert await _status(gw.url, first) == 401
        assert "admin_key_revoked" in gw.proc.log()
    await _rotated(infra, new_key(), first)


async def test_rotation_revokes_a_live_previous_key(infra: EmbeddedStack, gateway: Gateway) -> None:
    old = new_key()
    async with running_gateway(infra, admin_key=old):
        pass  # `old` is the admin key on record, live (never revoked)
    await _rotated(infra, new_key(), old)
