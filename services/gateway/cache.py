"""The response cache: exact answers in Redis, answers to the same question asked another way in pgvector.

- Exact: the key is the tenant, the model and the request as the worker would get it (messages, sampling,
  stops, limits, and whatever else the bus request carries), hashed. Only deterministic requests (temperature
  0 or a seed) or callers that opt in (`x-inferbus-cache: on`) use it; `Cache-Control: no-cache` or
  `x-inferbus-cache: off` bypass it. An entry remembers the version that answered and is a miss once the
  model's routing no longer serves that version (a deploy invalidates it).
- Semantic: for chats, the last user turn is embedded (an `embed` worker over the bus) and compared, with
  cosine similarity, to cached questions of the same tenant, model, version, parameters and conversation
  so far (the prefix). A hit also needs the same *guard*: the numbers, negations, capitalised names and
  units of the two questions must be the same, so "What is 2+2?" never answers "What is 2+3?" however
  close their vectors are (the failure LiteLLM's semantic cache is known for).

An API key may say otherwise (`KeyRecord.cache`): "off" never uses the cache, "on" uses it also for
non-deterministic requests (as the header would), "default" follows the request. A key's `cache_ttl_s`
bounds the entries it writes (the shorter of it and the model's TTL) and the age of those it reads.

Questions' vectors are remembered (a small LRU, by exact text; the same text has the same vector whoever
asks, so it holds nothing a tenant could learn another's answers from): a repeated question is not embedded
again, and a miss's store does not embed the question it just looked up a second time. A question not
remembered is sent to the embed worker at once, while Redis answers the exact lookup.

Everything the cache does is best effort: an unreachable Redis, PostgreSQL or embed worker is a miss.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import asyncpg
import msgspec
from prometheus_client import Counter

from contracts.llm import Final, GenerateRequest, Usage
from contracts.tenancy import KeyCache  # an API key's setting: follow the request, never, or opt in
from services.runtime import logging as log
from services.runtime.resp import Resp

Mode = Literal["off", "exact", "semantic"]
LOOKUPS = Counter("inferbus_cache_lookups_total", "Response cache lookups by result", ["result"])
FALSE_HITS = Counter("inferbus_cache_false_hits_total", "Cache hits reported wrong by clients")
KEY_PREFIX = b"ibc:"

Embed = Callable[[str], Awaitable[list[float] | None]]
T = TypeVar("T")


class CacheSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    enabled: bool = True
    ttl_s: float = 3600.0
    model_ttl_s: dict[str, float] = {}  # per model, overriding ttl_s
    # Models whose chats may be answered by meaning ("*": all). Opt-in: a semantic lookup embeds the question
    # first (a bus round trip to the embed worker), and an answer to a paraphrase is a product decision.
    semantic_models: list[str] = []
    embed_model: str = "all-minilm-l6-v2"
    # Cosine similarity a semantic hit needs; chosen on the labelled set in tests/test_cache.py.
    threshold: float = 0.86
    model_threshold: dict[str, float] = {}
    max_entry_chars: int = 64 * 1024
    vector_memory: int = 1024  # questions whose vectors are remembered (exact text; 0: none)


class Entry(msgspec.Struct, frozen=True, array_like=True):
    """A cached answer: what the client saw, and who made it."""

    text: str
    finish_reason: str
    usage: Usage
    version: str
    provider: str | None
    at: float


_entry_encoder = msgspec.msgpack.Encoder()
_entry_decoder = msgspec.msgpack.Decoder(Entry)


class CachedFinal(Final, frozen=True, tag="fc", array_like=True):
    """The end of an answer replayed from the cache (never on the bus): the usage it reports is the original
    answer's, for the client; governance bills it as nothing (nothing was generated)."""


class Hit(msgspec.Struct, frozen=True):
    entry: Entry
    kind: Literal["hit", "semantic"]
    similarity: float = 1.0
    ref: str = ""  # what a false-hit report deletes: the exact key, or "s:<row id>"


def mode(request: GenerateRequest, cache_header: str | None, cache_control: str | None, settings: CacheSettings,
         key_cache: KeyCache = "default") -> Mode:
    """Whether and how a request may use the cache. `x-inferbus-cache: off` or `Cache-Control: no-cache`
    bypass it, and so does a key whose setting is "off" (the header cannot turn that back on); a request
    that is not deterministic uses it when the header or its key's setting says "on"."""
    wanted = (cache_header or "").strip().lower()
    if not settings.enabled or key_cache == "off" or wanted == "off" or "no-cache" in (cache_control or "").lower():
        return "off"
    opted_in = wanted == "on" or key_cache == "on"
    if request.shadow or not (opted_in or request.temperature == 0 or request.seed is not None):
        return "off"
    if not request.plain:  # tool calls, structured output, logprobs: the cache keeps text only
        return "off"
    semantic = request.model in settings.semantic_models or "*" in settings.semantic_models
    return "semantic" if semantic and request.messages else "exact"


def _normal(request: GenerateRequest) -> bytes:
    """The request as the cache sees it: without its id, attempt, user and shadow flag."""
    same = msgspec.structs.replace(request, request_id="", user=None, attempt=0, shadow=False)
    return msgspec.msgpack.encode(same)


def exact_key(tenant: str, request: GenerateRequest) -> bytes:
    digest = hashlib.blake2b(_normal(request), digest_size=20, key=tenant.encode()[:64] or b"-")
    return KEY_PREFIX + digest.hexdigest().encode()


def scope(tenant: str, request: GenerateRequest) -> bytes:
    """What a semantic hit must share: tenant, model, every parameter, and the conversation before the last
    user turn (the system prompt included)."""
    messages = request.messages or []
    last = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    rest = msgspec.structs.replace(request, request_id="", user=None, attempt=0, shadow=False,
                                   messages=messages[:last] + messages[last + 1:])
    return hashlib.blake2b(tenant.encode() + b"\0" + msgspec.msgpack.encode(rest), digest_size=20).digest()


def question(request: GenerateRequest) -> str | None:
    for message in reversed(request.messages or []):
        if message.role == "user":
            return message.content
    return None


_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_WORD = re.compile(r"[A-Za-z][A-Za-z'\u2019-]*")
NEGATIONS = frozenset({"not", "no", "never", "none", "nobody", "nothing", "neither", "nor", "without", "except",
                       "cannot", "isn't", "aren't", "wasn't", "weren't", "don't", "doesn't", "didn't", "won't",
                       "can't", "shouldn't", "wouldn't", "couldn't", "before", "after", "below", "above", "under",
                       "over", "worst", "best", "first", "last", "oldest", "newest", "youngest", "earliest", "latest",
                       "hottest", "coldest", "fastest", "slowest"})
# Comparisons by direction: "largest" and "biggest" ask the same, "largest" and "smallest" do not.
DIRECTIONS = {**dict.fromkeys(("largest", "biggest", "greatest", "highest", "tallest", "longest", "heaviest", "most",
                               "more", "max", "maximum", "larger", "bigger", "greater", "higher", "taller", "longer"),
                              "+"),
              **dict.fromkeys(("smallest", "least", "lowest", "shortest", "lightest", "fewest", "fewer", "less", "min",
                               "minimum", "smaller", "lower", "shorter"), "-")}
UNITS = frozenset({"km", "kilometer", "kilometers", "kilometre", "kilometres", "mile", "miles", "m", "meter",
                   "meters", "metre", "metres", "cm", "mm", "inch", "inches", "foot", "feet", "ft", "yard",
                   "yards", "kg", "kilogram", "kilograms", "g", "gram", "grams", "pound", "pounds", "lb", "lbs",
                   "ounce", "ounces", "oz", "liter", "liters", "litre", "litres", "gallon", "gallons", "celsius",
                   "fahrenheit", "kelvin", "second", "seconds", "minute", "minutes", "hour", "hours", "day",
                   "days", "week", "weeks", "month", "months", "year", "years", "dollar", "dollars", "euro",
                   "euros", "usd", "eur", "percent", "byte", "bytes", "kb", "mb", "gb", "tb"})


# Words that open a question without naming anything (a capitalised word elsewhere is taken as a name).
OPENERS = frozenset({"what", "what's", "which", "who", "whom", "whose", "how", "why", "when", "where", "is", "are",
                     "was", "were", "do", "does", "did", "can", "could", "would", "should", "will", "tell", "give",
                     "please", "explain", "describe", "list", "name", "the", "a", "an", "in", "on", "at", "for",
                     "of", "to", "and", "or", "i", "i'd", "i'm", "let", "show", "find", "compute", "calculate",
                     "translate", "convert", "define", "summarize", "summarise", "write", "make", "create",
                     "generate", "help", "recommend", "suggest", "solve", "say", "who's", "where's", "how's",
                     "what're", "which's", "my", "your", "our", "this", "that", "these", "those", "if", "any"})


def guard(text: str) -> str:
    """What two questions must share to be one question: numbers, negations and comparisons, names (capitalised
    words not opening a sentence) and units. Paraphrase changes none of these; a different question often does."""
    numbers = sorted(n.replace(",", "") for n in _NUMBER.findall(text))
    words = _WORD.findall(text)
    lowered = [w.lower().replace("\u2019", "'") for w in words]
    negations = sorted({w for w in lowered if w in NEGATIONS or w.endswith("n't")})
    negations += sorted({DIRECTIONS[w] for w in lowered if w in DIRECTIONS})
    # Units in the order they come: "10 miles to km" is not "10 km to miles".
    units = [w[:-1] if w.endswith("s") and w[:-1] in UNITS else w for w in lowered if w in UNITS]
    names = []
    for match in _WORD.finditer(text):
        word = re.sub(r"['\u2019]s$", "", match.group())  # France's: France
        before = text[:match.start()].rstrip()
        opens = not before or before[-1] in ".?!:\"'("
        if word[0].isupper() and not (opens and word.lower() in OPENERS) and word.lower() != "i":
            names.append(word.lower())
    return "|".join((",".join(numbers), ",".join(negations), ",".join(sorted(set(names))), ">".join(units)))


class ResponseCache:
    def __init__(self, redis: Resp, pool: asyncpg.Pool | None, settings: CacheSettings, embed: Embed | None) -> None:
        self.redis = redis
        self.pool = pool
        self.settings = settings
        self.embed = embed
        self.logger = log.get("cache")
        self.recent: OrderedDict[str, str] = OrderedDict()  # request id -> entry ref, for false-hit reports
        self.vectors: OrderedDict[str, str] = OrderedDict()  # question -> its vector, as pgvector text (LRU)
        self._tasks: set[asyncio.Future[Any]] = set()
        self.hits = self.semantic_hits = self.misses = self.errors = self.false_hits = 0

    def ttl(self, model: str, key_ttl_s: float | None = None) -> float:
        """How long an entry lives: the model's TTL, or the key's where that is shorter."""
        ttl = self.settings.model_ttl_s.get(model, self.settings.ttl_s)
        return ttl if key_ttl_s is None else min(ttl, key_ttl_s)

    async def get(self, tenant: str, request: GenerateRequest, how: Mode, versions: set[str],
                  max_age_s: float | None = None) -> Hit | None:
        """The cached answer to `request`, if any; `max_age_s` (a key's TTL) misses older entries."""
        key = exact_key(tenant, request)
        text = question(request) if how == "semantic" and self.pool is not None and self.embed is not None else None
        vector = self._background(self.vector(text)) if text else None  # embedded while Redis answers
        try:
            raw = await self.redis.call("GET", key)
        except Exception as exc:
            self._error("exact", exc)
            return None
        if raw:
            entry = _entry_decoder.decode(raw)
            if entry.version in versions and (max_age_s is None or time.time() - entry.at < max_age_s):
                return self._hit(request, Hit(entry, "hit", 1.0, key.decode()))
        if text and vector is not None:
            hit = await self._semantic(tenant, request, text, vector, versions, max_age_s)
            if hit is not None:
                return self._hit(request, hit)
        self.misses += 1
        LOOKUPS.labels("miss").inc()
        return None

    async def _semantic(self, tenant: str, request: GenerateRequest, text: str, embedding: asyncio.Future[str | None],
                        versions: set[str], max_age_s: float | None) -> Hit | None:
        if self.pool is None:
            return None
        try:
            vector = await embedding
            if vector is None:
                return None
            row = await self.pool.fetchrow(
                "SELECT id, answer, 1 - (embedding <=> $1::vector) AS similarity FROM response_cache"
                " WHERE scope = $2 AND guard = $3 AND version = ANY($4::text[]) AND expires_at > now()"
                " AND ($5::float8 IS NULL OR created_at > now() - make_interval(secs => $5::float8))"
                " ORDER BY embedding <=> $1::vector LIMIT 1",
                vector, scope(tenant, request), guard(text), sorted(versions), max_age_s,
            )
        except Exception as exc:
            self._error("semantic", exc)
            return None
        threshold = self.settings.model_threshold.get(request.model, self.settings.threshold)
        if row is None or row["similarity"] < threshold:
            return None
        return Hit(_entry_decoder.decode(row["answer"]), "semantic", round(float(row["similarity"]), 4),
                   f"s:{row['id']}")

    async def vector(self, text: str) -> str | None:
        """The question's vector as pgvector text: remembered, or embedded (and remembered) now; None when no
        worker answers."""
        found = self.vectors.get(text)
        if found is not None:
            self.vectors.move_to_end(text)
            return found
        if self.embed is None:
            return None
        values = await self.embed(text)
        if values is None:
            return None
        vector = _vector(values)
        if self.settings.vector_memory > 0:
            self.vectors[text] = vector
            while len(self.vectors) > self.settings.vector_memory:
                self.vectors.popitem(last=False)
        return vector

    def _background(self, work: Awaitable[T]) -> asyncio.Future[T]:
        """Run `work` now; kept until done (close waits for it), its error only counted by whoever awaits it."""
        future = asyncio.ensure_future(work)
        self._tasks.add(future)
        future.add_done_callback(self._done)
        return future

    def _done(self, future: asyncio.Future[Any]) -> None:
        self._tasks.discard(future)
        if not future.cancelled():
            future.exception()  # retrieved: an embedding nobody waited for is not an "exception never retrieved"

    def _hit(self, request: GenerateRequest, hit: Hit) -> Hit:
        if hit.kind == "hit":
            self.hits += 1
        else:
            self.semantic_hits += 1
        LOOKUPS.labels(hit.kind).inc()
        self.recent[request.request_id] = hit.ref
        while len(self.recent) > 10_000:
            self.recent.popitem(last=False)
        return hit

    def _error(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        LOOKUPS.labels("error").inc()
        self.logger.warning("cache_unavailable", part=what, error=repr(exc))

    def put(self, tenant: str, request: GenerateRequest, how: Mode, entry: Entry, ttl_s: float | None = None) -> None:
        """Store an answer, off the response path; `ttl_s` (a key's TTL) shortens its life below the model's."""
        if len(entry.text) > self.settings.max_entry_chars or entry.finish_reason not in ("stop", "length"):
            return
        self._background(self._put(tenant, request, how, entry, ttl_s))

    async def _put(self, tenant: str, request: GenerateRequest, how: Mode, entry: Entry, ttl_s: float | None) -> None:
        ttl = self.ttl(request.model, ttl_s)
        data = _entry_encoder.encode(entry)
        try:
            await self.redis.call("SET", exact_key(tenant, request), data, "PX", max(1, int(ttl * 1000)))
            text = question(request)
            if how == "semantic" and text and self.pool is not None and self.embed is not None:
                vector = await self.vector(text)
                if vector is not None:
                    await self.pool.execute(
                        "INSERT INTO response_cache (scope, guard, version, question, embedding, answer, expires_at)"
                        " VALUES ($1, $2, $3, $4, $5::vector, $6, now() + make_interval(secs => $7))",
                        scope(tenant, request), guard(text), entry.version, text[:2000], vector, data, ttl,
                    )
        except Exception as exc:
            self._error("store", exc)

    async def report_false_hit(self, request_id: str) -> bool:
        """A client says this hit answered another question: drop the entry and count it."""
        ref = self.recent.pop(request_id, None)
        if ref is None:
            return False
        self.false_hits += 1
        FALSE_HITS.inc()
        try:
            if ref.startswith("s:"):
                if self.pool is not None:
                    await self.pool.execute("DELETE FROM response_cache WHERE id = $1", int(ref[2:]))
            else:
                await self.redis.call("DEL", ref.encode())
        except Exception as exc:
            self._error("report", exc)
        return True

    async def expire(self) -> int:
        """Delete expired semantic entries (Redis expires its own)."""
        if self.pool is None:
            return 0
        status = await self.pool.execute("DELETE FROM response_cache WHERE expires_at <= now()")
        return int(status.split()[-1])

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "semantic_hits": self.semantic_hits, "misses": self.misses, "errors": self.errors,
                "false_hits": self.false_hits}

    async def close(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _vector(values: list[float]) -> str:
    return "[" + ",".join(f"{v:.6g}" for v in values) + "]"
