"""Rate limits and budgets in Redis, correct across any number of gateway processes.

One Lua script admits a request against every limit that applies to it (requests/min and tokens/min
by GCRA, concurrency by a sorted set of request ids, budgets by per-period counters) and commits
all of them only if all pass: at most one Redis round trip per request. Time is Redis's own clock,
so gateways on different machines (or racing on one) agree on it. A second script settles after the
stream ends: the token estimate is corrected to the worker's count, the budget reservation to the
actual spend, and the concurrency slot is released.

Leases take the round trip off most requests under large rate limits. When the script admits a
request against a requests/min or tokens/min limit of at least LEASE_MIN_LIMIT, it also grants the
gateway up to 1/LEASE_SHARE of the limit ahead (never more than an eighth of what is left, so near
the limit leases shrink to nothing and every request is decided in Redis again). Later requests
spend the lease locally; a token estimate corrected at settle time goes back into the lease, not to
Redis; after LEASE_TTL_S the lease's unspent units go back to Redis. The units are counted in Redis
when leased, so all gateways together still never admit past a limit; the price is that a lease held
by one gateway is briefly unavailable to another (at most 1 % of the limit per gateway, for at most
about two LEASE_TTL_S), and a gateway that dies holding one loses it until the window refills.
Limits under LEASE_MIN_LIMIT, concurrency and budgets go to Redis on every request.

Budgets reserve an upper bound (prompt bytes + template allowance, plus max_tokens) before dispatch,
so concurrent requests can never spend past a budget; settling only gives back what was not used.

Speech is budgeted by audio length: a second of audio (ASR input, TTS output) counts as
TOKENS_PER_AUDIO_SECOND tokens against token budgets and costs the model's price per audio second
against USD budgets (as metering bills it). Admission reserves an upper bound of the seconds
(`upload_seconds_bound`, `speech_seconds_bound`); settling corrects it to the seconds the worker
reported. Token rate limits (tokens/min) stay for generations only.

Every admission settles, however the request ends: a caller cancelled while the admit script runs
(a client that disconnects) gives its reservation and concurrency slot back once the script answers.
USD budgets need prices: until the first price list arrives from metering a request under a USD budget
is refused (`unknown_prices="closed"`, the default) or admitted unpriced (`"open"`), logged either way.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import math
import time
import wave
from collections.abc import AsyncGenerator, Iterable
from typing import Any, Literal, NamedTuple

import hiredis
from prometheus_client import Counter

from contracts.errors import InferBusError
from contracts.llm import Accepted, Chunk, Delta, Final, GenerateRequest
from contracts.speech import AudioChunk, SpeechDone, Transcript
from contracts.tenancy import Budget, Limits
from contracts.usage import ANY_VERSION, PriceView
from services.gateway.auth import KeyRecord
from services.gateway.cache import CachedFinal
from services.runtime import logging as log
from services.runtime.resp import RedisUnavailable, ReplyError, Resp, Script
from services.runtime.sweep import sweep

DECISIONS = Counter("inferbus_gateway_limit_decisions_total", "Admission decisions", ["decision", "limit"])
LIMITER_DOWN = Counter("inferbus_gateway_limiter_unavailable_total", "Requests while Redis was unreachable", ["mode"])
SPEND = Counter("inferbus_gateway_settled_total", "Settled usage per tenant", ["tenant", "unit"])
ADMITTED = DECISIONS.labels("admitted", "-")  # bound once: a label lookup per request showed in profiles
_spent: dict[tuple[str, str], Any] = {}


def _spend(tenant_id: str, unit: str) -> Any:
    """SPEND's child for a tenant and unit, looked up once (prometheus_client's `labels` is per call)."""
    child = _spent.get((tenant_id, unit))
    if child is None:
        child = _spent[(tenant_id, unit)] = SPEND.labels(tenant_id, unit)
    return child

NO_LIMITS = Limits()
NO_BUDGET = Budget()
MICRO = 1_000_000  # budgets in USD are counted in micro-dollars (integers in Redis)
# A second of audio against token budgets: one token per 100 ms, as OpenAI's audio models count audio.
TOKENS_PER_AUDIO_SECOND = 10
# Upper bounds of an upload's duration before it is decoded: PCM WAV from its format and size; anything
# else as if at 6 kbit/s, the lowest bitrate speech codecs (Opus) use.
MIN_COMPRESSED_BYTES_PER_SECOND = 750
# ... and of synthesized speech: at most one second per 8 characters at speed 1 (speech runs 12-16), plus 1 s.
MIN_CHARS_PER_SECOND = 8.0

# Leases (see the module docstring): a limit of at least LEASE_MIN_LIMIT units lets a gateway take up to
# 1/LEASE_SHARE of it ahead, which it spends locally and gives back after LEASE_TTL_S.
LEASE_MIN_LIMIT = 100
LEASE_SHARE = 100
LEASE_TTL_S = 1.0

_ADMIT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local rid = ARGV[2]
local nr, nc, nb = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local a, k = 6, 1
local denied, retry = 0, 0
local out, tats = {}, {}
for i = 1, nr do
  local period, limit = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local cost, want = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  a = a + 4
  local t = period / limit
  local tat = tonumber(redis.call('GET', KEYS[k]) or '0')
  if tat < now then tat = now end
  local new_tat = tat + cost * t
  if new_tat - now > period then
    if denied == 0 then denied = k end
    local wait = new_tat - now - period
    if cost > limit then wait = -1 end
    if wait > retry or wait < 0 then retry = wait end
    tats[i] = false
    out[#out + 1] = math.max(0, math.floor((period - (tat - now)) / t))
    out[#out + 1] = math.ceil(tat - now)
    out[#out + 1] = 0
  else
    -- a lease for the gateway: up to `want` more units, never more than an eighth of what is left
    local extra = math.min(want, math.floor((period - (new_tat - now)) / t / 8))
    if extra > 0 then new_tat = new_tat + extra * t else extra = 0 end
    tats[i] = new_tat
    out[#out + 1] = math.floor((period - (new_tat - now)) / t)
    out[#out + 1] = math.ceil(new_tat - now)
    out[#out + 1] = extra
  end
  k = k + 1
end
for i = 1, nc do
  local limit, stale = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  redis.call('ZREMRANGEBYSCORE', KEYS[k], '-inf', now - stale)
  if redis.call('ZCARD', KEYS[k]) >= limit and denied == 0 then denied = k end
  k = k + 1
end
for i = 1, nb do
  local limit, amount = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 3
  local used = tonumber(redis.call('GET', KEYS[k]) or '0')
  if used + amount > limit and denied == 0 then denied = k end
  k = k + 1
end
if denied > 0 then return {denied, tostring(retry), out} end
a, k = 6, 1
for i = 1, nr do
  redis.call('SET', KEYS[k], tostring(tats[i]), 'PX', math.ceil(tonumber(ARGV[a]) * 2))
  a, k = a + 4, k + 1
end
for i = 1, nc do
  redis.call('ZADD', KEYS[k], now, rid)
  redis.call('PEXPIRE', KEYS[k], math.ceil(tonumber(ARGV[a + 1])))
  a, k = a + 2, k + 1
end
for i = 1, nb do
  redis.call('INCRBY', KEYS[k], ARGV[a + 1])
  redis.call('EXPIRE', KEYS[k], ARGV[a + 2])
  a, k = a + 3, k + 1
end
return {0, '0', out}
"""

_SETTLE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local rid = ARGV[2]
local nr, nc, nb = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local a, k = 6, 1
for i = 1, nr do
  local period, limit, delta = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local tat = tonumber(redis.call('GET', KEYS[k]) or '0')
  if tat > 0 and delta ~= 0 then
    tat = tat + delta * period / limit
    if tat < now then tat = now end
    redis.call('SET', KEYS[k], tostring(tat), 'PX', math.ceil(period * 2))
  end
  a, k = a + 3, k + 1
end
for i = 1, nc do
  redis.call('ZREM', KEYS[k], rid)
  k = k + 1
end
for i = 1, nb do
  if tonumber(ARGV[a]) ~= 0 then redis.call('INCRBY', KEYS[k], ARGV[a]) end
  a, k = a + 1, k + 1
end
return 1
"""


class Rate(NamedTuple):
    key: str
    name: str  # what a client is told: "requests per minute for this key", ...
    unit: Literal["requests", "tokens"]
    limit: int
    cost: int


class Lease:
    """Units of one rate limit this gateway took from Redis ahead of use (negative: used past the lease)."""

    __slots__ = ("granted", "limit", "remaining", "reset_ms", "units")

    def __init__(self, limit: int, units: int, remaining: int, reset_ms: float, granted: float) -> None:
        self.limit = limit
        self.units = units
        self.remaining = remaining  # what Redis had left beyond the lease when it granted it (for the headers)
        self.reset_ms = reset_ms
        self.granted = granted  # time.monotonic()


class Slot(NamedTuple):
    key: str
    name: str
    limit: int


class Cap(NamedTuple):
    key: str
    name: str
    unit: Literal["tokens", "usd"]
    limit: int  # tokens, or micro-dollars
    amount: int
    ttl_s: int


class Grant(NamedTuple):
    request_id: str
    rates: list[Rate]
    slots: list[Slot]
    caps: list[Cap]
    prompt_estimate: int
    estimate_tokens: int  # prompt estimate + max_tokens (or audio seconds as tokens): what was reserved
    headers: dict[str, str]
    tenant_id: str
    model: str = ""
    audio: bool = False  # speech: settled by audio seconds, not tokens
    batch: bool = False  # a batch line: priced with the model's batch discount
    images: int = 0  # vision: priced per image (the ledger's per_image), no tokens


def estimate_prompt_tokens(request: GenerateRequest) -> int:
    """An upper bound on prompt tokens: a token is at least one byte, plus the chat template's own."""
    if request.prompt is not None:
        return len(request.prompt.encode()) + 16
    return sum(len(m.content.encode()) + 8 for m in request.messages or []) + 32


def audio_tokens(seconds: float) -> int:
    return math.ceil(seconds * TOKENS_PER_AUDIO_SECOND)


def upload_seconds_bound(data: bytes, max_seconds: float) -> float:
    """At least the duration of an uploaded audio file, without decoding it; at most `max_seconds`."""
    try:
        with wave.open(io.BytesIO(data)) as w:
            byte_rate = w.getframerate() * w.getsampwidth() * w.getnchannels()
    except (wave.Error, EOFError, ValueError):
        byte_rate = 0
    # All of the file's bytes as samples: a bound even when the header's data size lies.
    seconds = len(data) / byte_rate if byte_rate > 0 else len(data) / MIN_COMPRESSED_BYTES_PER_SECOND
    return min(seconds, max_seconds)


def speech_seconds_bound(characters: int, speed: float = 1.0) -> float:
    """At least the duration of the speech synthesized from `characters` characters at `speed`."""
    return characters / (MIN_CHARS_PER_SECOND * max(speed, 0.25)) + 1.0


def reset_text(ms: float) -> str:
    """OpenAI's reset format: "1s", "6m0s", "20ms"."""
    if ms < 1000:
        return f"{max(int(ms), 0)}ms"
    seconds = ms / 1000
    minutes, secs = divmod(seconds, 60)
    return f"{int(minutes)}m{secs:.0f}s" if minutes >= 1 else f"{secs:.3g}s"


_NO_PERIODS = (("", 0), ("", 0))


def _period_keys(now: dt.datetime) -> tuple[tuple[str, int], tuple[str, int]]:
    """(day bucket, seconds it still has + a day), (month bucket, likewise): counters expire on their own."""
    day = now.strftime("%Y-%m-%d")
    month = now.strftime("%Y-%m")
    return (f"d{day}", 2 * 86400), (f"m{month}", 32 * 86400)


class Prices:
    """Per-model prices for money budgets; filled from the metering service. Unpriced models cost 0."""

    def __init__(self) -> None:
        self.per_model: dict[str, tuple[float, float]] = {}  # model -> (input, output) USD per token, worst case
        self.per_audio_second: dict[str, float] = {}  # model -> USD per second of audio, worst case
        self.per_image: dict[str, float] = {}  # model -> USD per image, worst case
        self.per_version: dict[tuple[str, str], float] = {}  # (model, version) -> USD per input + output token
        self.batch_discount: dict[str, float] = {}  # model -> the smallest of its versions' batch discounts
        self.loaded = False  # a price list arrived at least once: a missing model is free, not unknown

    def load(self, views: Iterable[PriceView]) -> None:
        """The price list from metering: per model, the dearest version (budgets reserve an upper bound)."""
        views = list(views)
        per_model: dict[str, tuple[float, float]] = {}
        per_second: dict[str, float] = {}
        per_image: dict[str, float] = {}
        discount: dict[str, float] = {}
        for view in views:
            discount[view.model] = min(discount.get(view.model, 1.0), view.batch_discount)
            old_in, old_out = per_model.get(view.model, (0.0, 0.0))
            per_model[view.model] = (max(old_in, view.input_per_1m / 1e6), max(old_out, view.output_per_1m / 1e6))
            per_second[view.model] = max(per_second.get(view.model, 0.0), view.per_audio_second)
            per_image[view.model] = max(per_image.get(view.model, 0.0), view.per_image)
        self.per_model, self.per_audio_second, self.per_image, self.loaded = per_model, per_second, per_image, True
        self.batch_discount = {model: d for model, d in discount.items() if d > 0}
        self.per_version = {(v.model, v.version): (v.input_per_1m + v.output_per_1m) / 1e6 for v in views}

    def per_token(self, model: str, version: str) -> float | None:
        """A version's price per token (input + output), for the cost strategy; None when it has none."""
        price = self.per_version.get((model, version))
        return price if price is not None else self.per_version.get((model, ANY_VERSION))

    def estimate_usd(self, model: str, prompt: int, completion: int, batch: bool = False) -> float:
        price_in, price_out = self.per_model.get(model, (0.0, 0.0))
        usd = prompt * price_in + completion * price_out
        return usd * (1 - self.batch_discount.get(model, 0.0)) if batch else usd

    def media_usd(self, model: str, seconds: float, batch: bool = False, images: int = 0) -> float:
        """Speech by its seconds of audio, vision by its images (the ledger's per_audio_second, per_image)."""
        usd = seconds * self.per_audio_second.get(model, 0.0) + images * self.per_image.get(model, 0.0)
        return usd * (1 - self.batch_discount.get(model, 0.0)) if batch else usd


class Governor:
    def __init__(
        self,
        redis_url: str,
        *,
        failure: Literal["open", "closed"] = "open",
        global_limits: Limits | None = None,
        endpoint_limits: dict[str, Limits] | None = None,
        stale_s: float = 3660.0,
        unknown_prices: Literal["open", "closed"] = "closed",
    ) -> None:
        self.redis = Resp(redis_url, timeout_s=0.5)
        self.admit_script = Script(self.redis, _ADMIT)
        self.settle_script = Script(self.redis, _SETTLE)
        self.failure = failure
        self.unknown_prices = unknown_prices
        self.global_limits = global_limits or Limits()
        self.endpoint_limits = endpoint_limits or {}
        self.stale_ms = stale_s * 1000
        self.prices = Prices()
        self.logger = log.get("governance")
        self._down_logged = 0.0
        self._unpriced_logged = 0.0
        self._audio_spent: dict[str, float] = {}  # request id -> seconds of audio its stream reported
        # Admissions whose script may have run although no answer came (Redis timed out or dropped the
        # connection): their slots are released once Redis answers again. Bounded: a slot left over ages out.
        self._uncertain: dict[str, tuple[str, Grant]] = {}
        # Settles run off the response path, but their command is written at once on the one Redis
        # connection, so Redis runs it before any later admission: one client's back-to-back requests
        # always see their corrected counters, without waiting for the settle's answer.
        self._settling: set[asyncio.Future[Any]] = set()
        self._settle_loaded = False  # the settle script is known to Redis (it is loaded before the first admit)
        self._leases: dict[str, Lease] = {}  # rate key -> units taken ahead (see the module docstring)
        self._lease_timer: asyncio.TimerHandle | None = None

    async def close(self) -> None:
        if self._lease_timer is not None:
            self._lease_timer.cancel()
        self._return_leases(everything=True)
        await asyncio.gather(*self._settling, return_exceptions=True)
        await self.redis.close()

    # ---- what applies to one request ---------------------------------------------------------

    def plan(
        self, key: KeyRecord, endpoint: str, model: str, request_id: str, prompt: int, tokens: int, usd: float
    ) -> Grant:
        rates: list[Rate] = []
        slots: list[Slot] = []
        scopes: list[tuple[str, str, Limits]] = [
            (f"key:{key.id}", "this API key", key.limits),
            (f"km:{key.id}:{model}", f"this API key on {model}", key.model_limits.get(model, Limits())),
            (f"tenant:{key.tenant_id}", "this organisation", key.tenant_limits),
            (f"ep:{endpoint}", f"{endpoint} across all clients", self.endpoint_limits.get(endpoint, Limits())),
            ("global", "this platform", self.global_limits),
        ]
        for scope, who, limits in scopes:
            if limits.rpm:
                rates.append(Rate(f"ib:rl:{scope}:rpm", f"requests per minute for {who}", "requests", limits.rpm, 1))
            if limits.tpm:
                rates.append(Rate(f"ib:rl:{scope}:tpm", f"tokens per minute for {who}", "tokens", limits.tpm, tokens))
            if limits.concurrency:
                slots.append(Slot(f"ib:cc:{scope}", f"concurrent requests for {who}", limits.concurrency))
        caps: list[Cap] = []
        budgets = [(scope, who, budget) for scope, who, budget in (
            (f"key:{key.id}", "this API key", key.budget),
            (f"tenant:{key.tenant_id}", "this organisation", key.tenant_budget),
        ) if budget != NO_BUDGET]
        (day, day_ttl), (month, month_ttl) = _period_keys(dt.datetime.now(dt.UTC)) if budgets else _NO_PERIODS
        for scope, who, budget in budgets:
            spans: list[tuple[float | None, Literal["tokens", "usd"], str, int]] = [
                (budget.tokens_per_day, "tokens", day, day_ttl),
                (budget.tokens_per_month, "tokens", month, month_ttl),
                (budget.usd_per_day, "usd", day, day_ttl),
                (budget.usd_per_month, "usd", month, month_ttl),
            ]
            for limit, unit, period, ttl in spans:
                if limit is None:
                    continue
                amount = tokens if unit == "tokens" else math.ceil(usd * MICRO)
                scaled = int(limit) if unit == "tokens" else int(limit * MICRO)
                span = "daily" if period.startswith("d") else "monthly"
                caps.append(Cap(f"ib:bud:{scope}:{unit}:{period}", f"{span} {unit} budget of {who}", unit, scaled,
                                amount, ttl))
        return Grant(request_id, rates, slots, caps, prompt, tokens, {}, key.tenant_id, model)

    # ---- admission and settlement ------------------------------------------------------------

    def unlimited(self, key: KeyRecord, endpoint: str, model: str) -> bool:
        """No limit or budget applies: admission needs no Redis round trip and nothing to settle."""
        return (
            key.limits == NO_LIMITS and key.tenant_limits == NO_LIMITS and model not in key.model_limits
            and key.budget == NO_BUDGET and key.tenant_budget == NO_BUDGET
            and self.global_limits == NO_LIMITS and endpoint not in self.endpoint_limits
        )

    async def admit(
        self, key: KeyRecord, endpoint: str, request: GenerateRequest, *, batch: bool = False, choices: int = 1
    ) -> Grant | None:
        """A grant to settle after the stream, or None when nothing applies to this key (the common case).
        `choices`: n generations of the request (n > 1), one request that may use n times the tokens."""
        if self.unlimited(key, endpoint, request.model):
            return None
        prompt = estimate_prompt_tokens(request) * choices
        tokens = prompt + request.max_tokens * choices
        usd = self.prices.estimate_usd(request.model, prompt, request.max_tokens * choices, batch)
        grant = self.plan(key, endpoint, request.model, request.request_id, prompt, tokens, usd)
        return await self._admit(key, grant._replace(batch=True) if batch else grant)

    async def admit_request(
        self, key: KeyRecord, endpoint: str, model: str, request_id: str, audio_seconds: float = 0.0,
        *, batch: bool = False, images: int = 0,
    ) -> Grant:
        """Speech and images: requests/min, concurrency, and budgets for `audio_seconds` (an upper bound of its
        audio) or `images` (their price; no tokens). `batch`: at the model's batch discount.

        Token rate limits do not apply; token budgets count the audio as TOKENS_PER_AUDIO_SECOND per second.
        """
        tokens = audio_tokens(audio_seconds)
        usd = self.prices.media_usd(model, audio_seconds, batch, images)
        grant = self.plan(key, endpoint, model, request_id, 0, tokens, usd)
        speech = grant._replace(rates=[r for r in grant.rates if r.unit == "requests"], audio=not images,
                                batch=batch, images=images)
        return await self._admit(key, speech)

    async def _admit(self, key: KeyRecord, grant: Grant) -> Grant:
        if not (grant.rates or grant.slots or grant.caps):
            return grant
        if not self.prices.loaded and any(c.unit == "usd" for c in grant.caps):
            self._unpriced(key, grant)
        # What this gateway's leases cover is taken now (a concurrent admission cannot take it too); the rest
        # of each rate goes to Redis, with a new lease asked for on top.
        taken = self._take(grant.rates)
        sent = [(rate, rate.cost - take) for rate, take in zip(grant.rates, taken, strict=True) if take < rate.cost]
        covered = {r.key: self._view(r.key, None) for r, take in zip(grant.rates, taken, strict=True) if take == r.cost}
        if not (sent or grant.slots or grant.caps):  # every limit covered by leases: no round trip
            ADMITTED.inc()
            return grant._replace(headers=_headers(grant.rates, [covered[r.key] for r in grant.rates]))
        if not self._settle_loaded:  # so a settle queued later never meets NOSCRIPT (and runs out of order)
            try:
                await self.redis.call("SCRIPT", "LOAD", self.settle_script.source)
                self._settle_loaded = True
            except asyncio.CancelledError:
                self._give_back(grant.rates, taken)
                raise
            except (RedisUnavailable, ReplyError) as exc:
                self._give_back(grant.rates, taken)
                return self._unavailable(grant, exc)
        keys = [r.key for r, _ in sent] + [s.key for s in grant.slots] + [c.key for c in grant.caps]
        args: list[Any] = [time.time() * 1000, grant.request_id, len(sent), len(grant.slots), len(grant.caps)]
        for r, need in sent:
            want = r.limit // LEASE_SHARE if r.limit >= LEASE_MIN_LIMIT and r.cost <= r.limit else 0
            args += [60_000, r.limit, need, want]
        for s in grant.slots:
            args += [s.limit, self.stale_ms]
        for c in grant.caps:
            args += [c.limit, c.amount, c.ttl_s]
        # The reply is awaited through a relay: a caller cancelled meanwhile (its client left) must not lose
        # what the script committed (`_abandoned` gives it back). Written at once, with no task in between.
        script = self.redis.send_now("EVALSHA", self.admit_script.sha, len(keys), *keys, *args)
        if script is None:  # not connected: the script's own path reconnects (and loads it if needed)
            script = asyncio.ensure_future(self.admit_script(keys=keys, args=args))
        try:
            reply = await relayed(script, self.redis.timeout_s)
            if isinstance(reply, hiredis.ReplyError):
                if not str(reply).startswith("NOSCRIPT"):
                    raise ReplyError(str(reply))
                script = asyncio.ensure_future(self.admit_script(keys=keys, args=args))  # Redis restarted
                reply = await relayed(script, self.redis.timeout_s)
            denied, retry, out = reply
        except asyncio.CancelledError:
            script.add_done_callback(lambda done: self._abandoned(key.id, grant, taken, sent, done))
            raise
        except TimeoutError:
            self._give_back(grant.rates, taken)
            self.redis.drop("Redis did not answer in time")
            self._uncertain_slots(key.id, grant)
            return self._unavailable(grant, RedisUnavailable("Redis did not answer in time"))
        except (RedisUnavailable, ReplyError) as exc:
            self._give_back(grant.rates, taken)
            self._uncertain_slots(key.id, grant)
            return self._unavailable(grant, exc)
        if self._uncertain:
            self._release_uncertain()
        if int(denied) == 0:
            self._leased(sent, out)
            ADMITTED.inc()
            return grant._replace(headers=self._headers_after(grant.rates, sent, out, covered))
        self._give_back(grant.rates, taken)
        headers = self._headers_after(grant.rates, sent, out, covered)
        index = int(denied) - 1
        retry_ms = float(retry)
        if index < len(sent):
            rate = sent[index][0]
            DECISIONS.labels("refused", rate.unit).inc()
            if retry_ms < 0:
                raise InferBusError(
                    "rate_limited",
                    f"Request too large: it needs {rate.cost} tokens, over the limit of {rate.limit} {rate.name}",
                ).with_headers(headers)
            headers["Retry-After"] = str(max(1, math.ceil(retry_ms / 1000)))
            raise InferBusError(
                "rate_limited", f"Rate limit reached: {rate.limit} {rate.name}. Retry in {reset_text(retry_ms)}."
            ).with_headers(headers)
        index -= len(sent)
        if index < len(grant.slots):
            slot = grant.slots[index]
            DECISIONS.labels("refused", "concurrency").inc()
            headers["Retry-After"] = "1"
            raise InferBusError(
                "rate_limited", f"Too many requests in flight: the limit is {slot.limit} {slot.name}"
            ).with_headers(headers)
        cap = grant.caps[index - len(grant.slots)]
        DECISIONS.labels("refused", "budget").inc()
        shown = f"{cap.limit} tokens" if cap.unit == "tokens" else f"${cap.limit / MICRO:.2f}"
        raise InferBusError(
            "insufficient_quota", f"The {cap.name} ({shown}) would be exceeded by this request"
        ).with_headers(headers)

    # ---- leases ------------------------------------------------------------------------------

    def _take(self, rates: list[Rate]) -> list[int]:
        """Per rate, what its lease pays of the cost now (negative: the lease's debt, paid by Redis's share)."""
        taken: list[int] = []
        for rate in rates:
            lease = self._leases.get(rate.key)
            take = 0 if lease is None or rate.cost > rate.limit else min(lease.units, rate.cost)
            if take:
                assert lease is not None
                lease.units -= take
            taken.append(take)
        return taken

    def _give_back(self, rates: list[Rate], taken: list[int]) -> None:
        """The admission did not happen: what it took from leases goes back."""
        returns: list[tuple[str, int, int]] = []
        for rate, take in zip(rates, taken, strict=True):
            if take:
                self._credit(rate.key, rate.limit, take, returns)
        self._return(returns)

    def _credit(self, key: str, limit: int, units: int, returns: list[tuple[str, int, int]]) -> None:
        """`units` go back to the key's lease; with none (it was returned meanwhile) to Redis, via `returns`."""
        lease = self._leases.get(key)
        if lease is not None:
            lease.units += units
        else:
            returns.append((key, limit, units))

    def _leased(self, sent: list[tuple[Rate, int]], out: list[Any]) -> None:
        """Redis admitted: the extra units it granted per rate become (or join) this gateway's lease."""
        now = time.monotonic()
        for i, (rate, _) in enumerate(sent):
            remaining, reset_ms, extra = int(out[3 * i]), float(out[3 * i + 1]), int(out[3 * i + 2])
            lease = self._leases.get(rate.key)
            if lease is not None:
                lease.units += extra
                lease.remaining, lease.reset_ms, lease.granted = remaining, reset_ms, now
            elif extra > 0:
                self._leases[rate.key] = Lease(rate.limit, extra, remaining, reset_ms, now)
                if self._lease_timer is None:
                    self._lease_timer = asyncio.get_running_loop().call_later(LEASE_TTL_S, self._return_leases)

    def _view(self, key: str, fresh: tuple[int, float] | None) -> tuple[int, float]:
        """(remaining, reset ms) of one rate for the x-ratelimit headers: Redis's answer plus the lease left."""
        lease = self._leases.get(key)
        if fresh is not None:
            return fresh[0] + (max(lease.units, 0) if lease else 0), fresh[1]
        if lease is None:  # a rate that cost nothing, with no lease
            return 0, 0.0
        elapsed = (time.monotonic() - lease.granted) * 1000
        return lease.remaining + max(lease.units, 0), max(lease.reset_ms - elapsed, 0.0)

    def _headers_after(self, rates: list[Rate], sent: list[tuple[Rate, int]], out: list[Any],
                       covered: dict[str, tuple[int, float]]) -> dict[str, str]:
        """Headers after Redis answered: its figures for the rates it was asked about, `covered` for the rest."""
        views = covered | {rate.key: self._view(rate.key, (int(out[3 * i]), float(out[3 * i + 1])))
                           for i, (rate, _) in enumerate(sent)}
        return _headers(rates, [views[r.key] for r in rates])

    def _return_leases(self, everything: bool = False) -> None:
        """Leases older than LEASE_TTL_S (or all of them) go back to Redis; runs every LEASE_TTL_S while any is held."""
        self._lease_timer = None
        now = time.monotonic()
        returns: list[tuple[str, int, int]] = []
        for key, lease in list(self._leases.items()):
            if everything or now - lease.granted >= LEASE_TTL_S:
                del self._leases[key]
                if lease.units:
                    returns.append((key, lease.limit, lease.units))
        self._return(returns)
        if self._leases and not everything:
            self._lease_timer = asyncio.get_running_loop().call_later(LEASE_TTL_S, self._return_leases)

    def _return(self, returns: list[tuple[str, int, int]]) -> None:
        """Give units back to Redis's counters (negative: take them), off the response path."""
        if not returns:
            return
        args: list[Any] = [time.time() * 1000, "lease", len(returns), 0, 0]
        for _, limit, units in returns:
            args += [60_000, limit, -units]
        self._queue_settle([key for key, _, _ in returns], args)

    def _abandoned(
        self, key_id: str, grant: Grant, taken: list[int], sent: list[tuple[Rate, int]], script: asyncio.Future[Any]
    ) -> None:
        """The caller left while its admission ran: give back whatever the admission took."""
        if script.cancelled() or script.exception() is not None:
            self._give_back(grant.rates, taken)
            if not script.cancelled():
                self._uncertain_slots(key_id, grant)
        elif isinstance(script.result(), hiredis.ReplyError):
            self._give_back(grant.rates, taken)  # refused by Redis (no script): nothing was taken there
        elif int(script.result()[0]) == 0:
            self._leased(sent, script.result()[2])
            self._audio_spent.pop(grant.request_id, None)
            self.settle_later(key_id, grant, 0, 0, grant.model)
        else:
            self._give_back(grant.rates, taken)

    def _uncertain_slots(self, key_id: str, grant: Grant) -> None:
        if grant.slots and len(self._uncertain) < 10_000:
            self._uncertain[grant.request_id] = (key_id, grant._replace(rates=[], caps=[], audio=False))

    def _release_uncertain(self) -> None:
        """Redis answers again: free the slots admissions that got no answer may hold (freeing none is harmless)."""
        pending, self._uncertain = self._uncertain, {}
        for key_id, grant in pending.values():
            self.settle_later(key_id, grant, 0, 0, grant.model)

    def _unpriced(self, key: KeyRecord, grant: Grant) -> None:
        now = time.monotonic()
        if now - self._unpriced_logged > 5:  # one log line per 5 s, not one per request
            self._unpriced_logged = now
            self.logger.warning(
                "prices_unknown", mode=self.unknown_prices, key_id=key.id, tenant_id=key.tenant_id, model=grant.model
            )
        if self.unknown_prices == "closed":
            raise InferBusError(
                "limiter_unavailable",
                "Prices are not loaded yet, so a USD budget cannot be checked: retry shortly",
            ).with_headers({"Retry-After": "5"})

    def _unavailable(self, grant: Grant, exc: BaseException) -> Grant:
        LIMITER_DOWN.labels(self.failure).inc()
        now = time.monotonic()
        if now - self._down_logged > 5:  # one log line per 5 s, not one per request
            self._down_logged = now
            self.logger.error("ratelimit_unavailable", mode=f"fail-{self.failure}", error=repr(exc))
        if self.failure == "closed":
            raise InferBusError("limiter_unavailable", "Rate limiting is unavailable; retry shortly") from exc
        return grant._replace(rates=[], slots=[], caps=[])

    def settle_later(
        self, key_id: str, grant: Grant, prompt_tokens: int | None, completion_tokens: int, model: str
    ) -> None:
        """Settle off the response path; the command is queued now, ahead of any later admission."""
        if not (grant.slots or grant.caps or any(r.unit == "tokens" for r in grant.rates)):
            self._audio_spent.pop(grant.request_id, None)
            return  # request-rate limits only: nothing to correct or release
        command = self._settle_command(grant, prompt_tokens, completion_tokens, model)
        if command is not None:
            self._queue_settle(*command)

    def _queue_settle(self, keys: list[str], args: list[Any]) -> None:
        future = self.redis.call_nowait("EVALSHA", self.settle_script.sha, len(keys), *keys, *args)
        self._settling.add(future)

        def done(f: asyncio.Future[Any]) -> None:
            self._settling.discard(f)
            exc = None if f.cancelled() else f.exception()
            if exc is None:
                return
            if isinstance(exc, ReplyError) and str(exc).startswith("NOSCRIPT"):  # Redis restarted: load it
                self._settle_loaded = False
                task = asyncio.ensure_future(self._run_settle(keys, args))
                self._settling.add(task)
                task.add_done_callback(self._settling.discard)
            else:
                self.logger.warning("settle_failed", error=repr(exc))

        future.add_done_callback(done)

    async def _run_settle(self, keys: list[str], args: list[Any]) -> None:
        try:
            await self.settle_script(keys=keys, args=args)
        except (RedisUnavailable, ReplyError) as exc:
            self.logger.warning("settle_failed", error=repr(exc))

    async def settle(self, grant: Grant, prompt_tokens: int | None, completion_tokens: int, model: str) -> None:
        """Correct the estimate to what was used and release the concurrency slot (and wait for Redis)."""
        command = self._settle_command(grant, prompt_tokens, completion_tokens, model)
        if command is None:
            return
        await self._run_settle(*command)

    def _settle_command(
        self, grant: Grant, prompt_tokens: int | None, completion_tokens: int, model: str
    ) -> tuple[list[str], list[Any]] | None:
        """The settle script's keys and arguments (None: nothing to settle); counts the spend.

        A speech grant is settled by the audio seconds its stream reported (`metered_audio`); the token
        arguments are ignored for it.
        """
        if grant.images:
            used, usd = 0, self.prices.media_usd(model, 0.0, grant.batch, grant.images)
        elif grant.audio:
            seconds = self._audio_spent.pop(grant.request_id, 0.0)
            used, usd = audio_tokens(seconds), self.prices.media_usd(model, seconds, grant.batch)
            _spend(grant.tenant_id, "audio_seconds").inc(seconds)
        else:
            prompt = prompt_tokens if prompt_tokens is not None else grant.prompt_estimate
            used = prompt + completion_tokens
            usd = self.prices.estimate_usd(model, prompt, completion_tokens, grant.batch)
            _spend(grant.tenant_id, "tokens").inc(used)
        if not (grant.rates or grant.slots or grant.caps):
            return None
        delta_tokens = used - grant.estimate_tokens
        _spend(grant.tenant_id, "usd").inc(usd)
        # Token rates are corrected by the difference; one this gateway holds a lease on is corrected there.
        rates: list[Rate] = []
        for r in grant.rates:
            if r.unit != "tokens" or not delta_tokens:
                continue
            lease = self._leases.get(r.key)
            if lease is not None:
                lease.units -= delta_tokens
            else:
                rates.append(r)
        if not (rates or grant.slots or grant.caps):
            return None
        args: list[Any] = [time.time() * 1000, grant.request_id, len(rates), len(grant.slots), len(grant.caps)]
        for r in rates:
            args += [60_000, r.limit, delta_tokens]
        for c in grant.caps:
            args.append(delta_tokens if c.unit == "tokens" else math.ceil(usd * MICRO) - c.amount)
        keys = [r.key for r in rates] + [s.key for s in grant.slots] + [c.key for c in grant.caps]
        return keys, args

    async def governed(
        self, key_id: str, grant: Grant, chunks: AsyncGenerator[Chunk, None], model: str
    ) -> AsyncGenerator[Chunk, None]:
        """Pass the stream through; settle the grant with the tokens it really used, however it ends."""
        prompt: int | None = None
        completion = 0
        accepted = False
        try:
            async for chunk in chunks:
                if isinstance(chunk, Accepted):
                    accepted = True
                elif isinstance(chunk, Delta):
                    completion += chunk.tokens
                elif isinstance(chunk, CachedFinal):  # answered from the cache: nothing used, nothing billed
                    prompt, completion = 0, 0
                elif isinstance(chunk, Final):
                    prompt, completion = chunk.usage.prompt_tokens, chunk.usage.completion_tokens
                yield chunk
        finally:
            if not accepted:  # no worker ever took it: nothing was used
                prompt = 0
            # A task, not an await, and before anything awaits here: off the response path, and a client that
            # disconnects (cancelling the handler, maybe more than once) cannot stop its slot from being freed.
            self.settle_later(key_id, grant, prompt, completion, model)
            await chunks.aclose()

    async def metered_audio(self, request_id: str, chunks: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
        """Pass a speech stream through, noting the seconds of audio it reports for the settle."""
        try:
            async for chunk in chunks:
                if isinstance(chunk, Transcript):
                    self._audio_spent[request_id] = chunk.duration
                elif isinstance(chunk, SpeechDone):
                    self._audio_spent[request_id] = chunk.audio_seconds
                elif isinstance(chunk, AudioChunk) and chunk.sample_rate > 0:
                    spent = self._audio_spent.get(request_id, 0.0)
                    self._audio_spent[request_id] = spent + len(chunk.pcm) / 2 / chunk.sample_rate
                yield chunk
        finally:
            await chunks.aclose()


async def relayed(future: asyncio.Future[Any], timeout_s: float) -> Any:
    """`future`'s outcome, waited for without cancelling it when the waiter is cancelled (asyncio.shield, minus
    its task); TimeoutError after about `timeout_s`."""
    timeouts = sweep()
    waiter = timeouts.loop.create_future()

    def relay(done: asyncio.Future[Any]) -> None:
        if waiter.done():
            return
        if done.cancelled():
            waiter.cancel()
        elif (exc := done.exception()) is not None:
            waiter.set_exception(exc)
        else:
            waiter.set_result(done.result())

    future.add_done_callback(relay)
    return await timeouts.wait(waiter, timeout_s)


def _headers(rates: list[Rate], views: list[tuple[int, float]]) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers from the most constraining request and token limits; `views` holds each
    rate's (remaining, reset ms)."""
    headers: dict[str, str] = {}
    for unit in ("requests", "tokens"):
        best: tuple[int, int, float] | None = None
        for rate, (remaining, reset_ms) in zip(rates, views, strict=True):
            if rate.unit != unit:
                continue
            if best is None or remaining < best[1]:
                best = (rate.limit, remaining, reset_ms)
        if best is not None:
            headers[f"x-ratelimit-limit-{unit}"] = str(best[0])
            headers[f"x-ratelimit-remaining-{unit}"] = str(max(best[1], 0))
            headers[f"x-ratelimit-reset-{unit}"] = reset_text(best[2])
    return headers
