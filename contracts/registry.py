"""Model registry contracts: versions, traffic policy, the routing table gateways watch, admin requests.

Admin requests and the routing table are JSON (low rate, readable with `nats kv get`); the per-request
outcome reports that feed the canary controller are msgpack (one per served request).
"""

from __future__ import annotations

from typing import Any, Final, Literal

import msgspec
from msgspec import Struct

# Engines each kind can run: a version's engine must belong to its model's kind.
ENGINES: Final[dict[str, frozenset[str]]] = {
    "llm": frozenset({"llamacpp", "transformers", "vllm", "benchmark", "openai"}),
    "embed": frozenset({"sentence-transformers", "benchmark"}),
    "asr": frozenset({"faster-whisper", "benchmark"}),
    "tts": frozenset({"hibari-tts", "piper", "benchmark"}),
    "vision": frozenset({"transformers", "benchmark"}),
}

VersionStatus = Literal["registered", "stable", "canary", "ab", "shadow", "rolled_back", "retired"]
Sticky = Literal["key", "user"]


class Analysis(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the canary controller judges a canary against the stable version."""

    interval_s: float = 10.0  # time between analyses (and between rollout steps)
    window_s: float = 60.0  # sliding window of outcomes compared
    min_samples: int = 20  # canary outcomes needed before any verdict
    max_error_rate_increase: float = 0.05  # canary error rate may exceed stable's by this much
    max_latency_ratio: float = 1.5  # canary p95 latency / stable p95 latency
    max_ttft_ratio: float = 1.5  # canary p95 time-to-first-token / stable's
    latency_slack_ms: float = 50.0  # absolute slack added to both ratio limits (noise on tiny latencies)


class Rollout(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Stepwise automatic promotion: canary weight walks `steps` (percent), one step per interval."""

    steps: list[float]
    step: int = 0  # index of the current step in `steps`
    stepped_at: float = 0.0  # unix seconds of the last step


class TrafficPolicy(Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    stable: str | None = None
    canary: str | None = None
    canary_weight: float = 0.0  # percent of traffic, 0..100
    ab: dict[str, float] = {}  # version -> weight (percent); when set it replaces stable/canary
    sticky: Sticky = "key"  # A/B assignment is sticky per API key or per request `user`
    shadow: str | None = None
    shadow_rate: float = 0.0  # percent of requests copied to the shadow version
    rollout: Rollout | None = None
    analysis: Analysis = Analysis()


class RoutingTable(Struct, frozen=True, kw_only=True):
    """One model's routing read-model, published to the KV bucket under the model's subject token."""

    model: str
    kind: str
    revision: int
    versions: list[str]
    policy: TrafficPolicy


class VersionInfo(Struct, frozen=True, kw_only=True):
    version: str
    engine: str
    params: dict[str, Any]
    status: str
    created_at: str


class WorkerView(Struct, frozen=True, kw_only=True):
    worker_id: str
    version: str
    in_flight: int
    queued: int
    capacity: int
    tokens_per_s: float
    healthy: bool
    last_seen_s: float


class VersionMetrics(Struct, frozen=True, kw_only=True):
    version: str
    requests: int
    error_rate: float
    p95_ms: float | None
    ttft_p95_ms: float | None


class ModelView(Struct, frozen=True, kw_only=True):
    name: str
    kind: str
    description: str
    revision: int
    policy: TrafficPolicy
    versions: list[VersionInfo]
    workers: list[WorkerView] = []
    metrics: list[VersionMetrics] = []


class AuditEntry(Struct, frozen=True, kw_only=True):
    id: int
    model: str
    at: str
    actor: str
    action: str
    reason: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None


class ShadowRecord(Struct, frozen=True, kw_only=True):
    """One sampled request run on both the serving version and the shadow version."""

    model: str
    request_id: str
    version: str
    shadow_version: str
    latency_ms: float
    shadow_latency_ms: float
    error: str | None
    shadow_error: str | None
    output_chars: int
    shadow_output_chars: int
    similarity: float | None  # difflib ratio of the two texts, 0..1; None when either failed


class ShadowReport(Struct, frozen=True, kw_only=True):
    model: str
    count: int
    shadow_error_rate: float
    mean_similarity: float | None
    mean_latency_ratio: float | None
    records: list[ShadowRecord]


class Outcome(Struct, frozen=True, array_like=True):
    """What the edge saw of one request: fed to the canary controller (`registry.outcome.<kind>.<model>`)."""

    model: str
    version: str
    ok: bool
    code: str
    latency_ms: float
    ttft_ms: float | None


# ---- admin requests (subjects in contracts.subjects.REGISTRY_*) ------------------------------


class _Admin(Struct, kw_only=True, forbid_unknown_fields=True):
    actor: str = "cli"


class ListModels(_Admin, kw_only=True, forbid_unknown_fields=True):
    pass


class ShowModel(_Admin, kw_only=True, forbid_unknown_fields=True):
    model: str


class RegisterVersion(_Admin, kw_only=True, forbid_unknown_fields=True):
    """Register a model (if new) and, when `version` is given, one of its versions."""

    model: str
    kind: str = "llm"
    description: str = ""
    version: str | None = None
    engine: str | None = None
    params: dict[str, Any] = {}


class Deploy(_Admin, kw_only=True, forbid_unknown_fields=True):
    """Make `version` the stable version at once (clears canary and A/B)."""

    model: str
    version: str


class SetCanary(_Admin, kw_only=True, forbid_unknown_fields=True):
    model: str
    version: str
    weight: float
    steps: list[float] = []  # optional automatic promotion steps, e.g. [5, 25, 50, 100]
    analysis: Analysis | None = None


class Promote(_Admin, kw_only=True, forbid_unknown_fields=True):
    """Without `weight`: the canary becomes stable. With it: set the canary's weight (a manual step)."""

    model: str
    weight: float | None = None


class Rollback(_Admin, kw_only=True, forbid_unknown_fields=True):
    model: str
    reason: str = "manual rollback"


class SetAB(_Admin, kw_only=True, forbid_unknown_fields=True):
    """A/B split across versions (weights in percent, summing to 100); empty `groups` ends the test."""

    model: str
    groups: dict[str, float]
    sticky: Sticky = "key"


class SetShadow(_Admin, kw_only=True, forbid_unknown_fields=True):
    """Copy `rate` percent of requests to `version`; version None (or rate 0) stops shadowing."""

    model: str
    version: str | None
    rate: float = 100.0


class History(_Admin, kw_only=True, forbid_unknown_fields=True):
    model: str
    limit: int = 50


class Comparisons(_Admin, kw_only=True, forbid_unknown_fields=True):
    model: str
    limit: int = 20


table_encoder = msgspec.json.Encoder()
table_decoder = msgspec.json.Decoder(RoutingTable)
outcome_encoder = msgspec.msgpack.Encoder()
outcome_decoder = msgspec.msgpack.Decoder(Outcome)
outcomes_decoder = msgspec.msgpack.Decoder(list[Outcome])


def decode_outcomes(data: bytes) -> list[Outcome]:
    """One outcome, or a batch of them (a msgpack list; edges batch outcomes to send fewer messages)."""
    try:
        return [outcome_decoder.decode(data)]
    except msgspec.DecodeError:
        return outcomes_decoder.decode(data)
shadow_decoder = msgspec.msgpack.Decoder(ShadowRecord)
