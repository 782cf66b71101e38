"""The bus seam's JetStream fetch (services/runtime/bus/pull.py) on a real nats-server: `ready` takes what a
consumer has at once, where a fetch of more messages than are there waits out its whole window."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from services.runtime import bus
from services.runtime.bus import pull


@pytest.mark.parametrize("fast", [True, False], ids=["fast-fetch", "nats-py-fetch"])
async def test_ready_takes_what_is_there_without_waiting_for_more(nc: bus.Connection, fast: bool) -> None:
    name = f"TESTPULL_{secrets.token_hex(4).upper()}"
    js = nc.jetstream()
    await js.add_stream(name=name, subjects=[f"{name.lower()}.>"])
    try:
        await js.add_consumer(name, durable_name="c", ack_policy="explicit")
        sub = await js.pull_subscribe_bind(durable="c", stream=name)
        if fast:
            pull.install(sub)
            assert getattr(sub.fetch, "fast", False)
        for i in range(3):
            await js.publish(f"{name.lower()}.line", str(i).encode())
        # A window of 30 s: waiting for the 61 messages that never come would trip the 10 s guard.
        async with asyncio.timeout(10):
            msgs = await pull.ready(sub, 64, window_s=30)
            assert [m.data for m in msgs] == [b"0", b"1", b"2"]
            for m in msgs:
                await m.ack()
            assert await pull.ready(sub, 64, window_s=30) == []  # nothing left: empty, no error
        await js.publish(f"{name.lower()}.line", b"3")
        async with asyncio.timeout(10):
            assert [m.data for m in await pull.ready(sub, 1, window_s=30)] == [b"3"]
        await sub.unsubscribe()
    finally:
        await js.delete_stream(name)
