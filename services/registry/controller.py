"""Canary analysis: per-version sliding windows of request outcomes, and the verdict on a canary.

The verdict is pure (windows + policy in, decision out) so it is tested without a bus; the registry
service turns a decision into a policy change (rollback, next rollout step, promotion).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Literal, NamedTuple

from contracts.errors import CATALOGUE
from contracts.registry import Analysis, Outcome, TrafficPolicy, VersionMetrics


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
