"""Canary analysis: per-version sliding windows of request outcomes, the verdict on a canary, and the
lease that lets one registry replica act on verdicts.

The verdict is pure (windows + policy in, decision out) so it is tested without a bus; the registry
service turns a decision into a policy change (rollback, next rollout step, promotion), only while it
holds the controller's lease, and only if the policy is still the one it analysed (`only_if`).
"""

from __future__ import annotations

import secrets
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Literal, NamedTuple

from contracts.errors import CATALOGUE, InferBusError
from contracts.registry import Analysis, Outcome, TrafficPolicy, VersionMetrics
from services.runtime import bus

LEASE_BUCKET = "INFERBUS_LEASES"
CONTROLLER_LEASE = "canary-controller"


class Sample(NamedTuple):
    at: float
    error: bool
    latency_ms: float
    ttft_ms: float | None


def is_error(code: str) -> bool:
    """A failure the version is to blame for: any 5xx in the catalogue (client mistakes are 4xx)."""
    spec = CATALOGUE.get(code)
    return spec is None or spec.http_status >= 500


def p95(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


class WindowStats(NamedTuple):
    n: int
    error_rate: float
    p95_ms: float | None
    ttft_p95_ms: float | None


class Windows:
    """Outcomes per (model, version), kept for `horizon_s`."""

    def __init__(self, horizon_s: float = 600.0) -> None:
        self.horizon_s = horizon_s
        self.samples: dict[tuple[str, str], deque[Sample]] = {}

    def add(self, outcome: Outcome, now: float | None = None) -> None:
        if outcome.code == "cancelled":  # the client left: says nothing about the version
            return
        at = time.monotonic() if now is None else now
        window = self.samples.setdefault((outcome.model, outcome.version), deque())
        window.append(Sample(at, not outcome.ok and is_error(outcome.code), outcome.latency_ms, outcome.ttft_ms))
        while window and at - window[0].at > self.horizon_s:
            window.popleft()

    def stats(self, model: str, version: str, since: float) -> WindowStats:
        window = [s for s in self.samples.get((model, version), ()) if s.at >= since]
        if not window:
            return WindowStats(0, 0.0, None, None)
        ok = [s for s in window if not s.error]
        return WindowStats(
            n=len(window),
            error_rate=sum(s.error for s in window) / len(window),
            p95_ms=p95([s.latency_ms for s in ok]),
            ttft_p95_ms=p95([s.ttft_ms for s in ok if s.ttft_ms is not None]),
        )

    def metrics(self, model: str, versions: list[str], window_s: float) -> list[VersionMetrics]:
        since = time.monotonic() - window_s
        out = []
        for version in versions:
            st = self.stats(model, version, since)
            if st.n:
                out.append(
                    VersionMetrics(
                        version=version,
                        requests=st.n,
                        error_rate=round(st.error_rate, 4),
                        p95_ms=None if st.p95_ms is None else round(st.p95_ms, 2),
                        ttft_p95_ms=None if st.ttft_p95_ms is None else round(st.ttft_p95_ms, 2),
                    )
                )
        return out


Action = Literal["wait", "rollback", "step"]


class Verdict(NamedTuple):
    action: Action
    reason: str


def judge(canary: WindowStats, stable: WindowStats, analysis: Analysis) -> Verdict:
    """Compare a canary's window with the stable version's; decide rollback, a step forward, or wait."""
    a = analysis
    if canary.n < a.min_samples:
        return Verdict("wait", f"{canary.n}/{a.min_samples} canary samples")
    base_error = stable.error_rate if stable.n >= a.min_samples else 0.0
    if canary.error_rate > base_error + a.max_error_rate_increase:
        return Verdict(
            "rollback",
            f"error rate {canary.error_rate:.1%} vs stable {base_error:.1%} "
            f"(limit +{a.max_error_rate_increase:.1%}, {canary.n} samples)",
        )
    if stable.n >= a.min_samples:
        for name, c, s, ratio in (
            ("p95 latency", canary.p95_ms, stable.p95_ms, a.max_latency_ratio),
            ("p95 TTFT", canary.ttft_p95_ms, stable.ttft_p95_ms, a.max_ttft_ratio),
        ):
            if c is not None and s is not None and c > s * ratio + a.latency_slack_ms:
                return Verdict(
                    "rollback", f"{name} {c:.0f} ms vs stable {s:.0f} ms (limit {ratio}x + {a.latency_slack_ms:g} ms)"
                )
    return Verdict("step", f"healthy over {canary.n} samples")


def analyse(policy: TrafficPolicy, windows: Windows, model: str, since: float, now: float) -> Verdict:
    """The controller's decision for one model; 'step' only when its rollout's interval has passed."""
    assert policy.canary is not None
    a = policy.analysis
    start = max(since, now - a.window_s)
    verdict = judge(
        windows.stats(model, policy.canary, start),
        windows.stats(model, policy.stable, start) if policy.stable else WindowStats(0, 0.0, None, None),
        a,
    )
    if verdict.action == "step" and (policy.rollout is None or time.time() - policy.rollout.stepped_at < a.interval_s):
        return Verdict("wait", verdict.reason)
    return verdict


def only_if(
    expected: TrafficPolicy, change: Callable[[TrafficPolicy, set[str]], TrafficPolicy]
) -> Callable[[TrafficPolicy, set[str]], TrafficPolicy]:
    """`change`, refused (conflict) when the stored policy is no longer the one the verdict was reached on."""

    def guarded(policy: TrafficPolicy, versions: set[str]) -> TrafficPolicy:
        if policy != expected:
            raise InferBusError("conflict", "the traffic policy changed since it was analysed")
        return change(policy, versions)

    return guarded


class Lease:
    """Leadership among replicas: one key in a NATS KV bucket whose TTL is the lease's length.

    `refresh` creates the key (only when absent) or renews it by revision (only while it is still ours),
    so at most one holder exists; a holder that dies stops renewing and its key expires after the TTL.
    A holder counts itself leader until a margin before the TTL runs out from when it last wrote, so it
    stops acting before anyone else can take over, even when it cannot reach NATS.
    """

    MARGIN = 0.2  # of the TTL

    def __init__(self, name: str, ttl_s: float) -> None:
        self.name = name
        self.ttl_s = ttl_s
        self.holder = f"{socket.gethostname()}:{secrets.token_hex(4)}"
        self.revision = 0  # of our entry, while we hold the lease
        self.valid_until = 0.0  # monotonic
        self._kv: bus.KeyValue | None = None

    @property
    def held(self) -> bool:
        return self.revision > 0 and time.monotonic() < self.valid_until

    async def open(self, js: bus.JetStreamContext) -> None:
        """The lease bucket, created on first use; an existing bucket's TTL wins (replicas must agree on it)."""
        try:
            self._kv = await js.key_value(LEASE_BUCKET)
        except bus.js_errors.BucketNotFoundError:
            try:
                self._kv = await js.create_key_value(
                    bucket=LEASE_BUCKET, history=1, ttl=self.ttl_s, description="InferBus leader leases"
                )
            except bus.js_errors.BadRequestError:  # created meanwhile by another replica
                self._kv = await js.key_value(LEASE_BUCKET)
        ttl = (await self._kv.status()).ttl
        if ttl:
            self.ttl_s = ttl

    async def refresh(self) -> bool:
        """Renew the lease if we hold it, else take it if nobody does; whether we hold it now."""
        kv = self._require()
        started = time.monotonic()
        try:
            if self.revision:
                self.revision = await kv.update(self.name, self.holder.encode(), last=self.revision)
            else:
                self.revision = await kv.create(self.name, self.holder.encode())
        except bus.js_errors.KeyWrongLastSequenceError:  # someone else holds it, or took it after ours ran out
            self.revision = 0
            return False
        except Exception:  # NATS unreachable: keep the lease until it runs out, then let it go
            if not self.held:
                self.revision = 0
            return self.held
        self.valid_until = started + self.ttl_s * (1 - self.MARGIN)
        return True

    async def release(self) -> None:
        """Step down at once (a clean shutdown): the next replica need not wait for the TTL."""
        revision, self.revision = self.revision, 0
        if revision and self._kv is not None:
            try:
                await self._kv.delete(self.name, last=revision)
            except Exception:  # taken over already, or NATS gone: the TTL ends it
                pass

    def _require(self) -> bus.KeyValue:
        assert self._kv is not None, "lease not opened"
        return self._kv
