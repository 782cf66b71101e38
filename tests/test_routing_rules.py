"""The pure routing and rollout rules: version choice, worker choice, canary verdicts, policy transitions."""

from __future__ import annotations

import itertools
import random
import time

import msgspec
import pytest

from contracts.control import WorkerLoad
from contracts.errors import InferBusError
from contracts.registry import Analysis, Breaker, Outcome, Rollout, Routing, RoutingTable, TrafficPolicy
from services.registry import controller, store
from services.runtime.breakers import Breakers, breaker_key
from services.runtime.routing import Presence, Signals, pick_version, ranked, shadow_sampled


def table(**policy: object) -> RoutingTable:
    return RoutingTable(model="m", kind="llm", revision=1, versions=["v1", "v2", "v3"], policy=TrafficPolicy(**policy))


def load(worker_id: str, in_flight: int = 0, queued: int = 0, capacity: int = 4, ready: bool = True) -> WorkerLoad:
    return WorkerLoad(worker_id=worker_id, kind="llm", model="m", version="v1", engine="benchmark",
                      in_flight=in_flight, queued=queued, capacity=capacity, tokens_per_s=0.0, ready=ready)


def test_canary_weight_is_the_share_of_picks() -> None:
    rng = random.Random(7)
    picks = [pick_version(table(stable="v1", canary="v2", canary_weight=25), rnd=rng.random) for _ in range(20000)]
    share = picks.count("v2") / len(picks)
    assert 0.23 < share < 0.27
    assert set(picks) == {"v1", "v2"}


def test_no_canary_weight_means_only_stable() -> None:
    assert {pick_version(table(stable="v1", canary="v2", canary_weight=0)) for _ in range(200)} == {"v1"}


def test_undeployed_model_is_a_typed_error() -> None:
    with pytest.raises(InferBusError) as err:
        pick_version(table())
    assert err.value.code == "no_worker"


def test_ab_is_sticky_and_splits_by_weight() -> None:
    t = table(ab={"v1": 70, "v2": 30})
    for key in ("alice", "bob", "carol"):
        assert len({pick_version(t, sticky=key) for _ in range(50)}) == 1
    assigned = [pick_version(t, sticky=f"key-{i}") for i in range(5000)]
    assert 0.67 < assigned.count("v1") / len(assigned) < 0.73


def test_shadow_sampling_rate() -> None:
    rng = random.Random(3)
    policy = TrafficPolicy(stable="v1", shadow="v3", shadow_rate=10)
    sampled = [shadow_sampled(policy, rng.random) for _ in range(10000)]
    assert 0.08 < sum(s == "v3" for s in sampled) / len(sampled) < 0.12
    assert shadow_sampled(TrafficPolicy(stable="v1")) is None


def test_p2c_prefers_the_less_loaded_worker() -> None:
    presence = Presence()
    presence.heard(load("idle", in_flight=0))
    presence.heard(load("busy", in_flight=4, queued=8))
    picks = [presence.choose("llm", "m", "v1").worker_id for _ in range(100)]  # type: ignore[union-attr]
    assert picks.count("idle") == 100


def test_p2c_counts_requests_this_caller_has_outstanding() -> None:
    presence = Presence()
    presence.heard(load("a"))
    presence.heard(load("b"))
    for _ in range(3):
        presence.acquire("a")
    assert {presence.choose("llm", "m", "v1").worker_id for _ in range(50)} == {"b"}  # type: ignore[union-attr]
    for _ in range(3):
        presence.release("a")
    assert presence.outstanding == {}


def test_affinity_keeps_a_worker_and_moves_only_when_it_leaves() -> None:
    presence = Presence()
    for w in ("a", "b", "c"):
        presence.heard(load(w))
    first = presence.choose("llm", "m", "v1", affinity="conversation-1")
    assert first is not None
    assert all(presence.choose("llm", "m", "v1", affinity="conversation-1") == first for _ in range(20))
    presence.forget(first.worker_id)
    moved = presence.choose("llm", "m", "v1", affinity="conversation-1")
    assert moved is not None and moved.worker_id != first.worker_id


def test_draining_and_silent_workers_are_out_of_routing() -> None:
    presence = Presence(ttl=0.0)
    presence.heard(load("silent"))
    assert presence.choose("llm", "m", "v1") is None  # ttl 0: already too old
    presence = Presence()
    presence.heard(load("draining", ready=False))
    assert presence.choose("llm", "m", "v1") is None


def outcomes(windows: controller.Windows, version: str, n: int, errors: int, latency: float) -> None:
    for i in range(n):
        failed = i < errors
        code = "engine_error" if failed else "ok"
        windows.add(Outcome("m", version, not failed, code, latency, latency / 2), now=1.0)


def test_verdict_waits_for_the_minimum_sample() -> None:
    w = controller.Windows()
    outcomes(w, "v2", 5, 5, 10)
    verdict = controller.judge(w.stats("m", "v2", 0), w.stats("m", "v1", 0), Analysis(min_samples=10))
    assert verdict.action == "wait"


def test_verdict_rolls_back_on_error_rate() -> None:
    w = controller.Windows()
    outcomes(w, "v1", 100, 1, 10)
    outcomes(w, "v2", 30, 6, 10)
    verdict = controller.judge(w.stats("m", "v2", 0), w.stats("m", "v1", 0), Analysis(min_samples=20))
    assert verdict.action == "rollback" and "error rate" in verdict.reason


def test_verdict_rolls_back_on_latency_and_passes_a_healthy_canary() -> None:
    w = controller.Windows()
    outcomes(w, "v1", 50, 0, 100)
    outcomes(w, "v2", 50, 0, 400)
    outcomes(w, "v3", 50, 0, 110)
    a = Analysis(min_samples=20)
    assert controller.judge(w.stats("m", "v2", 0), w.stats("m", "v1", 0), a).action == "rollback"
    assert controller.judge(w.stats("m", "v3", 0), w.stats("m", "v1", 0), a).action == "step"


def test_client_mistakes_and_cancels_do_not_count_against_a_version() -> None:
    w = controller.Windows()
    w.add(Outcome("m", "v2", False, "invalid_request", 1, None), now=1.0)
    w.add(Outcome("m", "v2", False, "cancelled", 1, None), now=1.0)
    stats = w.stats("m", "v2", 0)
    assert stats.n == 1 and stats.error_rate == 0.0


def test_policy_transitions_validate_before_changing() -> None:
    base = TrafficPolicy(stable="v1")
    versions = {"v1", "v2"}
    after = store.canary("m", "v2", 10, [10, 50, 100], None)(base, versions)
    assert (after.canary, after.canary_weight, after.rollout and after.rollout.steps) == ("v2", 10, [10, 50, 100])
    with pytest.raises(InferBusError) as err:
        store.canary("m", "v9", 10, [], None)(base, versions)
    assert err.value.code == "not_found"
    for bad in (-1, 101, float("nan")):
        with pytest.raises(InferBusError):
            store.canary("m", "v2", bad, [], None)
    with pytest.raises(InferBusError):
        store.canary("m", "v2", 10, [50, 25], None)
    with pytest.raises(InferBusError):
        store.ab("m", {"v1": 50, "v2": 40}, "key")
    with pytest.raises(InferBusError):
        store.rollback("m")(base, versions)


def test_rollout_steps_then_promotes() -> None:
    p = TrafficPolicy(stable="v1", canary="v2", canary_weight=5, rollout=Rollout(steps=[5, 25, 100]))
    weights = []
    for _ in itertools.count():
        p = store.step("m")(p, {"v1", "v2"})
        weights.append(p.canary_weight)
        if p.canary is None:
            break
    assert weights == [25, 0]
    assert p.stable == "v2" and p.rollout is None


def test_rollback_marks_the_version_rolled_back() -> None:
    before = TrafficPolicy(stable="v1", canary="v2", canary_weight=10)
    after = store.rollback("m")(before, {"v1", "v2"})
    assert store._statuses(before, after, "auto_rollback") == {"v2": "rolled_back"}


# ---- strategies over a pool, breakers ----------------------------------------------------------------


def pooled(strategy: str, pool: dict[str, float]) -> RoutingTable:
    return table(stable="v1", routing=Routing(strategy=strategy, pool=pool))  # type: ignore[arg-type]


def test_weighted_pool_follows_its_weights() -> None:
    rng = random.Random(3)
    picks = [pick_version(pooled("weighted", {"v1": 80, "v2": 20}), rnd=rng.random, signals=Signals(Presence()))
             for _ in range(20000)]
    assert 0.18 < picks.count("v2") / len(picks) < 0.22


def test_latency_strategy_measures_unmeasured_versions_first_then_takes_the_fastest() -> None:
    signals = Signals(Presence())
    t = pooled("latency", {"v1": 1, "v2": 1, "v3": 1})
    no_explore = lambda: 0.5  # noqa: E731 (above the 5 % exploration share)
    signals.latency.observe("llm", "m", "v1", ttft_ms=50, itl_ms=5)
    assert ranked(t, signals, no_explore)[:2] in (["v2", "v3"], ["v3", "v2"])  # never measured: tried first
    signals.latency.observe("llm", "m", "v2", ttft_ms=10, itl_ms=1)
    signals.latency.observe("llm", "m", "v3", ttft_ms=30, itl_ms=1)
    assert ranked(t, signals, no_explore) == ["v2", "v3", "v1"]
    for _ in range(30):  # v2 gets slow: the moving average follows
        signals.latency.observe("llm", "m", "v2", ttft_ms=200, itl_ms=10)
    assert ranked(t, signals, no_explore)[0] == "v3"


def test_cost_strategy_takes_the_cheapest_priced_version() -> None:
    signals = Signals(Presence())
    prices = {"v1": 5e-6, "v2": 1e-6}
    signals.price = lambda model, version: prices.get(version)
    assert ranked(pooled("cost", {"v1": 1, "v2": 1, "v3": 1}), signals) == ["v2", "v1", "v3"]  # unpriced last


def test_least_busy_strategy_takes_the_idlest_version() -> None:
    presence = Presence()
    for version, busy in (("v1", 3), ("v2", 0), ("v3", 2)):
        presence.heard(WorkerLoad(worker_id=f"w-{version}", kind="llm", model="m", version=version,
                                  engine="openai", in_flight=busy, queued=0, capacity=4, tokens_per_s=0, ready=True))
    assert ranked(pooled("least_busy", {"v1": 1, "v2": 1, "v3": 1}), Signals(presence)) == ["v2", "v3", "v1"]


def expire(breakers: Breakers) -> None:
    """The open breaker's cooldown as if it had run out (its `until` in the past)."""
    key = breaker_key("llm", "m", "v1")
    state, revision = breakers.states[key]
    breakers.states[key] = (msgspec.structs.replace(state, until=time.time() - 1), revision)


async def test_breaker_opens_after_failures_then_one_probe_closes_it() -> None:
    breakers = Breakers("test")  # without KV: this process's own copy
    cfg = Breaker(failures=3, window_s=10, cooldown_s=0.05)
    for code in ("upstream_error", "rate_limited", "upstream_timeout"):  # a 429 is not the endpoint's fault
        breakers.failure("llm", "m", "v1", code, cfg)
    assert breakers.verdict("llm", "m", "v1") == "closed"
    breakers.failure("llm", "m", "v1", "upstream_error", cfg)
    assert breakers.verdict("llm", "m", "v1") == "open" and breakers.retry_after("llm", "m", "v1") > 0
    expire(breakers)  # the cooldown runs out
    assert breakers.verdict("llm", "m", "v1") == "probe"
    assert await breakers.claim_probe("llm", "m", "v1")
    assert breakers.verdict("llm", "m", "v1") == "open"  # others wait for the probe
    breakers.failure("llm", "m", "v1", "upstream_error", cfg)  # the probe failed: open, twice as long
    assert breakers.states[breaker_key("llm", "m", "v1")][0].cooldown_s == pytest.approx(0.1)
    expire(breakers)
    assert await breakers.claim_probe("llm", "m", "v1")
    breakers.success("llm", "m", "v1")
    assert breakers.verdict("llm", "m", "v1") == "closed"
