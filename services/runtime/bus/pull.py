"""A batch fetch for FastStream's JetStream pull loop that does not cost ~60 µs per message.

Part of the bus seam: it reads nats-py internals, so it lives beside them.

FastStream's batch subscriber collects a batch with `PullSubscription.fetch(batch, timeout)`. nats-py's
fetch reads each message through `Subscription.next_msg`, which starts a task with its own `wait_for`
per message: at 20,000 events/s that alone is more than a core. `fetch_batch` sends the same pull
request and reads the subscription's queue directly (~15 µs a message, delivery and parsing included).

It always waits for its request to end (batch complete, or the server's 408 when it expires) before
returning, so no status from an earlier request can cut a later one short. nats-py's internals are
checked once; if they are not what this expects, fetch stays nats-py's, with its timeouts made
consistent (nats-py >= 2.15 raises a bare asyncio.TimeoutError where FastStream 0.7.8 catches only
nats.errors.TimeoutError, which would kill the loop holding the batch it had collected).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, Final

import nats.errors
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

Fetch = Callable[..., Awaitable[list[Msg]]]
MIN_REQUEST_S: Final = 0.002  # a window this close to its end only takes what has already arrived
LOST_STATUS_S: Final = 0.25  # wait this long past expiry for a 408 that a reconnect may have lost
EXPIRED: Final = frozenset({"404", "408"})  # no messages (no_wait) / the request expired
REFUSED: Final = frozenset({"409", "503"})  # the request was refused / JetStream is not answering


def install(subscription: Any) -> None:
    """Give a nats-py PullSubscription the faster fetch, or at least consistent timeouts."""
    inner = getattr(subscription, "_sub", None)
    if all(hasattr(subscription, a) for a in ("_nc", "_nms", "_deliver")) and hasattr(inner, "_pending_queue"):
        subscription.fetch = _fast(subscription, nats_timeouts(subscription.fetch))
    else:
        subscription.fetch = nats_timeouts(subscription.fetch)


def nats_timeouts(fetch: Fetch) -> Fetch:
    async def wrapped(*args: Any, **kwargs: Any) -> list[Msg]:
        try:
            return await fetch(*args, **kwargs)
        except nats.errors.TimeoutError:
            raise
        except TimeoutError as exc:
            raise nats.errors.TimeoutError from exc

    return wrapped


def _fast(subscription: Any, fallback: Fetch) -> Fetch:
    # nats-py's signature (FastStream calls it with keywords), hence the `timeout` parameter.
    async def fetch(
        batch: int = 1,
        timeout: float | None = 5.0,  # noqa: ASYNC109
        heartbeat: float | None = None,
    ) -> list[Msg]:
        if timeout is None or heartbeat:
            return await fallback(batch=batch, timeout=timeout, heartbeat=heartbeat)
        return await fetch_batch(subscription, batch, timeout)

    fetch.fast = True  # type: ignore[attr-defined]  # `ready` may ask without waiting
    return fetch


def _take(subscription: Any, msg: Msg) -> str:
    """Account for a message taken off the queue; its status code ('' for a message)."""
    subscription._sub._pending_size -= len(msg.data)
    return JetStreamContext.is_status_msg(msg) or ""


async def ready(subscription: Any, batch: int, window_s: float = 1.0) -> list[Msg]:
    """Up to `batch` messages the consumer has now, at once ([] when none): a `fetch` of more messages than are
    there waits out its whole window before it returns them (a batch of 10 lines started 1 s late)."""
    try:
        if getattr(subscription.fetch, "fast", False):
            return await fetch_batch(subscription, batch, window_s, no_wait=True)
        return list(await subscription.fetch(batch, timeout=MIN_REQUEST_S * 5))  # nats-py's own fetch
    except nats.errors.TimeoutError:
        return []


async def fetch_batch(subscription: Any, batch: int, window_s: float, *, no_wait: bool = False) -> list[Msg]:
    """Up to `batch` messages within `window_s`; raises nats.errors.TimeoutError when none came. `no_wait`: only
    what the stream holds now (the server ends the request with a 404 when that is fewer than `batch`)."""
    queue: asyncio.Queue[Msg] = subscription._sub._pending_queue
    msgs: list[Msg] = []
    while len(msgs) < batch and not queue.empty():  # delivered after an earlier fetch gave up waiting
        msg = queue.get_nowait()
        if not _take(subscription, msg):
            msgs.append(msg)
    needed = batch - len(msgs)
    if needed == 0 or window_s < MIN_REQUEST_S:
        if msgs:
            return msgs
        raise nats.errors.TimeoutError
    request: dict[str, Any] = {"batch": needed, "no_wait": True} if no_wait else {
        "batch": needed, "expires": int(window_s * 1e9)}
    await subscription._nc.publish(subscription._nms, json.dumps(request).encode(), subscription._deliver)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + window_s + LOST_STATUS_S
    while needed:
        try:
            msg = queue.get_nowait()
        except asyncio.QueueEmpty:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                msg = await asyncio.wait_for(queue.get(), left)
            except TimeoutError:
                break
        status = _take(subscription, msg)
        if not status:
            msgs.append(msg)
            needed -= 1
        elif status in EXPIRED:
            break
        elif status in REFUSED:
            if not msgs:  # asking again at once would only be refused again: wait out the window
                await asyncio.sleep(max(0.0, deadline - LOST_STATUS_S - loop.time()))
            break
        # anything else (idle heartbeats) carries nothing
    if not msgs:
        raise nats.errors.TimeoutError
    return msgs
