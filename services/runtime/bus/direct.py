"""Subscriptions whose messages go straight from nats-py's read loop to a plain function.

nats-py gives each callback subscription a queue and a task: every message is queued, the task wakes
and awaits the callback. For a handler that only hands the message on (to a waiting stream, to a new
task), that hop is a loop iteration and a few queue operations per message. A direct subscription
replaces the queue with the handler itself. The handler must be quick and must not block: it runs
inside the read loop, and an exception it raises is logged and the message dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from services.runtime import logging as log


class _Handoff:
    """Stands in for the subscription's pending queue (nats-py calls put_nowait per message)."""

    def __init__(self, sub: Subscription, handler: Callable[[Msg], Any]) -> None:
        self.sub = sub
        self.handler = handler

    def put_nowait(self, msg: Msg) -> None:
        self.sub._pending_size = 0  # nothing is pending here; nats-py counts it up per message
        try:
            self.handler(msg)
        except Exception as exc:
            log.get("bus").error("direct_handler_failed", subject=msg.subject, error=repr(exc))

    def qsize(self) -> int:
        return 0

    def empty(self) -> bool:
        return True

    def task_done(self) -> None:
        return None

    async def join(self) -> None:
        return None

    async def get(self) -> Msg:
        raise RuntimeError("a direct subscription delivers to its handler, not to readers")


async def subscribe(nc: Client, subject: str, handler: Callable[[Msg], Any], *, queue: str = "") -> Subscription:
    """Subscribe `handler` (a plain function) to `subject`, called from the read loop for each message."""
    sub = await nc.subscribe(subject, queue=queue)  # no callback: nats-py starts no task for it
    sub._pending_bytes_limit = 0  # no slow-consumer accounting: nothing waits in a queue
    sub._pending_queue = _Handoff(sub, handler)  # type: ignore[assignment]
    return sub
