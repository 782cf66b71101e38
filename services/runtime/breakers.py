"""Circuit breakers per served version (one upstream endpoint each), shared by every gateway and router.

State lives in the NATS KV bucket INFERBUS_BREAKERS, one key per version (`<kind>.<model>.<version>`), and
every process watches it, so a breaker one replica opens is open on all of them within a KV round trip:
no replica pays the timeout another already paid. Failures are counted where they are seen (each process
its own window); the process that sees the `failures`-th failure within `window_s` opens the breaker for
`cooldown_s`. After that one process wins the half-open probe (a compare-and-set on the key's revision);
the others keep treating it as open until the probe answers: a success closes it, a failure opens it
again with twice the cooldown (up to `max_cooldown_s`). A process that opened or probed writes through at
once to its own copy, so its very next request already sees the new state.

Each process exports `inferbus_circuit_breaker_open` per version as it sees the state: set where the
state changes (a local write, a watched KV entry), never on the request path.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections import deque
from typing import Any, Literal

import msgspec
from prometheus_client import Gauge

from contracts import subjects
from contracts.registry import BREAKER_CODES, Breaker
from services.runtime import bus
from services.runtime import logging as log
from services.runtime.bus import JetStreamContext, KeyValue

State = Literal["closed", "open", "half_open"]
Verdict = Literal["closed", "open", "probe"]
_KV_UNSAFE = re.compile(r"[^-_=a-zA-Z0-9]")
OPEN = Gauge(
    "inferbus_circuit_breaker_open",
    "1 while a version's circuit breaker is open or half-open (one probe let through), 0 once closed",
    ["kind", "model", "version"],  # as in the breaker's key: characters KV keys cannot hold are '_'
)


class BreakerState(msgspec.Struct, frozen=True, kw_only=True):
    state: State
    until: float = 0.0  # unix s: end of the cooldown (open) or of the probe's grace (half_open)
    cooldown_s: float = 0.0  # the cooldown it was opened with (a failed probe doubles it)
    reason: str = ""
    by: str = ""  # which process wrote it
    at: float = 0.0


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(BreakerState)


@functools.lru_cache(maxsize=4096)  # asked for on every request's outcome
def breaker_key(kind: str, model: str, version: str) -> str:
    return ".".join((kind, _KV_UNSAFE.sub("_", model), _KV_UNSAFE.sub("_", version)))


def _export(key: str, state: BreakerState | None) -> None:
    """The gauge of `key` after a transition (None: the key was deleted)."""
    parts = key.split(".")
    if len(parts) == 3:  # every key breaker_key makes; anything else in the bucket is not a breaker
        OPEN.labels(*parts).set(0 if state is None or state.state == "closed" else 1)


class Breakers:
    def __init__(self, owner: str, probe_grace_s: float = 30.0) -> None:
        self.owner = owner
        self.probe_grace_s = probe_grace_s  # a probe that never reports back frees the key after this
        self.states: dict[str, tuple[BreakerState, int]] = {}  # key -> (state, KV revision)
        self.failures: dict[str, deque[float]] = {}
        self.logger = log.get("breakers")
        self._kv: KeyValue | None = None
        self._watcher: Any = None
        self._task: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self._probing: set[str] = set()

    # ---- reads (the request path: a dict lookup when nothing is open) -------------------------

    def verdict(self, kind: str, model: str, version: str) -> Verdict:
        if not self.states:
            return "closed"
        held = self.states.get(breaker_key(kind, model, version))
        if held is None:
            return "closed"
        state = held[0]
        if state.state == "closed":
            return "closed"
        if time.time() < state.until:
            return "open"
        return "probe"  # cooldown (or an abandoned probe's grace) over: whoever claims it probes

    def retry_after(self, kind: str, model: str, version: str) -> float:
        held = self.states.get(breaker_key(kind, model, version))
        return max(0.0, held[0].until - time.time()) if held else 0.0

    async def claim_probe(self, kind: str, model: str, version: str) -> bool:
        """Become the one process that probes this version (compare-and-set); False: another did."""
        key = breaker_key(kind, model, version)
        held = self.states.get(key)
        if held is None:
            return True
        state, revision = held
        probing = msgspec.structs.replace(state, state="half_open", until=time.time() + self.probe_grace_s,
                                          by=self.owner, at=time.time())
        if self._kv is None:  # no shared copy: this process alone decides
            self.states[key] = (probing, revision)
            self._probing.add(key)
            return True
        try:
            new_revision = await self._kv.update(key, _encoder.encode(probing), last=revision)
        except Exception:  # wrong last sequence: another process claimed it first (or KV is away)
            return False
        self.states[key] = (probing, new_revision)
        self._probing.add(key)
        return True

    # ---- what requests report -----------------------------------------------------------------

    def success(self, kind: str, model: str, version: str) -> None:
        key = breaker_key(kind, model, version)
        self.failures.pop(key, None)
        if key in self._probing:  # our probe answered: close it for everyone
            self._probing.discard(key)
            self._write(key, BreakerState(state="closed", reason="probe succeeded", by=self.owner, at=time.time()))
            self.logger.info("breaker_closed", model=model, version=version)

    def failure(self, kind: str, model: str, version: str, code: str, cfg: Breaker) -> None:
        if code not in BREAKER_CODES:
            return
        key = breaker_key(kind, model, version)
        now = time.time()
        held = self.states.get(key)
        if key in self._probing:  # our probe failed: open again, for longer
            self._probing.discard(key)
            previous = held[0].cooldown_s if held else cfg.cooldown_s
            self._open(key, model, version, min(previous * 2, cfg.max_cooldown_s), f"probe failed: {code}")
            return
        if held is not None and held[0].state != "closed":
            return  # already open (a request that was in flight when it opened)
        window = self.failures.setdefault(key, deque())
        window.append(now)
        while window and now - window[0] > cfg.window_s:
            window.popleft()
        if len(window) >= cfg.failures:
            window.clear()
            self._open(key, model, version, cfg.cooldown_s, f"{cfg.failures} failures in {cfg.window_s:g} s: {code}")

    def _open(self, key: str, model: str, version: str, cooldown: float, reason: str) -> None:
        now = time.time()
        self._write(key, BreakerState(state="open", until=now + cooldown, cooldown_s=cooldown, reason=reason,
                                      by=self.owner, at=now))
        self.logger.warning("breaker_opened", model=model, version=version, cooldown_s=cooldown, reason=reason)

    def _write(self, key: str, state: BreakerState) -> None:
        revision = self.states[key][1] if key in self.states else 0
        self.states[key] = (state, revision)  # this process sees it at once
        _export(key, state)
        if self._kv is None:
            return
        task = asyncio.get_running_loop().create_task(self._put(key, state))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _put(self, key: str, state: BreakerState) -> None:
        assert self._kv is not None
        try:
            revision = await self._kv.put(key, _encoder.encode(state))
        except Exception as exc:  # the local copy still holds; the next failure writes again
            self.logger.warning("breaker_write_failed", key=key, error=repr(exc))
            return
        current = self.states.get(key)
        if current is not None and current[0] == state:
            self.states[key] = (state, revision)

    # ---- the shared copy ----------------------------------------------------------------------

    async def watch(self, js: JetStreamContext) -> None:
        self._kv = await breaker_bucket(js)
        self._watcher = await self._kv.watchall()
        ready = asyncio.Event()
        self._task = asyncio.create_task(self._follow(ready))
        async with asyncio.timeout(10):
            await ready.wait()

    async def _follow(self, ready: asyncio.Event) -> None:
        async for entry in self._watcher:
            if entry is None:
                ready.set()
                continue
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                self.states.pop(entry.key, None)
                _export(entry.key, None)
            else:
                try:
                    state = _decoder.decode(entry.value)
                except msgspec.DecodeError:
                    self.logger.warning("bad_breaker_state", key=entry.key)
                    continue
                if state.state == "closed":
                    self.states.pop(entry.key, None)
                    self.failures.pop(entry.key, None)
                else:
                    self.states[entry.key] = (state, entry.revision)
                _export(entry.key, state)
                if state.by != self.owner:
                    self._probing.discard(entry.key)
            if entry.delta == 0:
                ready.set()

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {key: msgspec.to_builtins(state) for key, (state, _) in self.states.items()}

    async def close(self) -> None:
        if self._watcher is not None:
            try:
                await self._watcher.stop()
            except Exception:
                pass
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*self._writes, return_exceptions=True)


async def breaker_bucket(js: JetStreamContext) -> KeyValue:
    try:
        return await js.key_value(subjects.BREAKER_BUCKET)
    except bus.js_errors.BucketNotFoundError:
        return await js.create_key_value(bucket=subjects.BREAKER_BUCKET, history=1,
                                         description="InferBus circuit breakers")
