"""Remote provider engines: one HTTP seam (pooling, deadlines, SSE, errors) under pure per-provider translators.

A provider module subclasses `RemoteEngine` and only translates: our request into its wire body, its
stream events into text and a `Turn`, its error quirks into our catalogue. All I/O happens here.

HTTP/2: aiohttp speaks HTTP/1.1 only, so concurrency comes from a keep-alive connection pool sized to
the engine's capacity (one connection per running stream) rather than from multiplexing.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypeVar

import aiohttp
import msgspec

from contracts.errors import InferBusError
from contracts.llm import GenerateRequest, TokenLogprob, ToolCallDelta
from services.llm.engines.base import Piece, Prepared, Progress, refuse
from services.llm.engines.toolcalls import new_call_id
from services.runtime import tracing

T = TypeVar("T")

MESSAGE_LIMIT = 300  # characters of a provider's error message we pass on
ERROR_BODY_LIMIT = 64 * 1024
MAX_LINE = 1 << 20  # an SSE line longer than this is a broken upstream, not a big delta
HEALTH_TIMEOUT_S = 5.0
KEEPALIVE_S = 30.0
DEFAULT_RETRY_S = 1.0
CONTEXT_HINTS = (
    "context_length_exceeded",
    "maximum context length",
    "prompt is too long",
    "exceeds the context",
    "context window",
    "exceeds the maximum number of tokens",
)


# ---- SSE ------------------------------------------------------------------------------------


class SSEEvent(NamedTuple):
    event: str  # "message" when the stream names none
    data: str


class SSEParser:
    """Server-sent events from byte chunks split anywhere; lines end in LF or CRLF, events at a blank line."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._buffer = bytearray()
        self._event = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buffer += chunk
        events: list[SSEEvent] = []
        start = 0
        while (end := self._buffer.find(b"\n", start)) >= 0:
            # A line is complete bytes up to LF: UTF-8 never puts 0x0A inside a character.
            line = bytes(self._buffer[start:end]).removesuffix(b"\r").decode("utf-8", "replace")
            start = end + 1
            event = self._line(line)
            if event is not None:
                events.append(event)
        del self._buffer[:start]
        if len(self._buffer) > self.max_line:
            raise ValueError(f"an event-stream line longer than {self.max_line} bytes")
        return events

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            event = SSEEvent(self._event or "message", "\n".join(self._data)) if self._data else None
            self._event, self._data = "", []
            return event
        if line.startswith(":"):  # a comment: keep-alive
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None


# ---- Errors ---------------------------------------------------------------------------------


class Fault(NamedTuple):
    """A provider's error body, read leniently: its identifiers (code, type, status, reasons) and message."""

    kinds: frozenset[str]
    message: str
    retry_delay_s: float | None = None  # Gemini's RetryInfo, when no header says


def parse_fault(text: str) -> Fault:
    try:
        payload = msgspec.json.decode(text)
    except msgspec.DecodeError:
        return Fault(frozenset(), text.strip())
    if isinstance(payload, list) and payload:  # Gemini's streaming endpoints wrap errors in a list
        payload = payload[0]
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        detail = payload.get("detail") or payload.get("message") if isinstance(payload, dict) else None
        return Fault(frozenset(), str(error or detail or text).strip())
    kinds = {str(error[k]) for k in ("code", "type", "status") if error.get(k) is not None}
    delay = None
    for detail in error.get("details") or ():
        if isinstance(detail, dict):
            if detail.get("reason"):
                kinds.add(str(detail["reason"]))
            if isinstance(detail.get("retryDelay"), str):
                delay = _seconds(detail["retryDelay"].removesuffix("s"))
    return Fault(frozenset(kinds), str(error.get("message") or text).strip(), delay)


def _seconds(value: str) -> float | None:
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def retry_after_s(headers: Mapping[str, str], hint: float | None = None) -> float:
    """When to retry a 429: retry-after-ms, Retry-After (seconds or an HTTP date), the body's hint, or 1 s."""
    if (ms := headers.get("retry-after-ms")) and (value := _seconds(ms)) is not None:
        return value / 1000
    if header := headers.get("retry-after"):
        if (value := _seconds(header)) is not None:
            return value
        with contextlib.suppress(TypeError, ValueError):
            when = email.utils.parsedate_to_datetime(header)
            when = when if when.tzinfo else when.replace(tzinfo=UTC)
            return max(0.0, (when - datetime.now(UTC)).total_seconds())
    return hint if hint is not None else DEFAULT_RETRY_S


def error_code(status: int, fault: Fault) -> str:
    """Our catalogue's code for a provider's HTTP error."""
    if status == 429:
        return "rate_limited"
    if status in (401, 403):
        return "upstream_auth_failed"
    if status >= 500:  # 529 too: Anthropic's overloaded
        return "upstream_error"
    if status == 408:
        return "upstream_timeout"
    text = fault.message.lower()
    if "context_length_exceeded" in fault.kinds or any(hint in text for hint in CONTEXT_HINTS):
        return "context_length_exceeded"
    return "invalid_request"


# ---- The HTTP seam --------------------------------------------------------------------------

Refine = Callable[[int, Fault], str | None]


class Upstream:
    """One provider's HTTP client: a pooled session, deadlines, SSE events, failures as InferBusError."""

    def __init__(
        self,
        provider: str,
        *,
        capacity: int,
        connect_timeout_s: float,
        first_byte_timeout_s: float,
        idle_timeout_s: float,
        refine: Refine = lambda status, fault: None,
    ) -> None:
        self.provider = provider
        self.capacity = capacity
        self.connect_timeout_s = connect_timeout_s
        self.first_byte_timeout_s = first_byte_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.refine = refine
        self.secrets: tuple[str, ...] = ()  # masked out of every message
        self._session: aiohttp.ClientSession | None = None

    def open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self.capacity, limit_per_host=self.capacity, keepalive_timeout=KEEPALIVE_S
            )
            # Only the connect has a session timeout: first byte and idle are deadlines per read below.
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s)
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, raise_for_status=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def fail(self, code: str, message: str) -> InferBusError:
        for secret in self.secrets:
            message = message.replace(secret, "***")
        text = f"{self.provider} upstream {message}"
        return InferBusError(code, text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 1] + "…")

    async def events(
        self, url: str, body: Mapping[str, Any], headers: Mapping[str, str]
    ) -> AsyncGenerator[SSEEvent, None]:
        """POST `body` and yield its event stream; closing this generator drops the connection at once."""
        loop = asyncio.get_running_loop()
        first_byte_at = loop.time() + self.first_byte_timeout_s
        resp = await self._post(url, msgspec.json.encode(body), headers, first_byte_at)
        drained = False
        try:
            if resp.status != 200:
                raise await self._http_error(resp, first_byte_at)
            if "text/event-stream" not in resp.headers.get("content-type", ""):
                raise self.fail("upstream_error", f"answered {resp.content_type!r}, not an event stream")
            parser = SSEParser()
            deadline, what = first_byte_at, f"sent no first byte within {self.first_byte_timeout_s:g}s"
            while chunk := await self._read(resp, deadline, what):
                try:
                    events = parser.feed(chunk)
                except ValueError as exc:
                    raise self.fail("upstream_error", f"sent a broken event stream: {exc}") from None
                for event in events:
                    yield event
                # From now, not from the chunk's arrival: a slow consumer is not an idle upstream.
                deadline, what = loop.time() + self.idle_timeout_s, f"went idle for {self.idle_timeout_s:g}s"
            drained = True
        finally:
            if drained:
                resp.release()  # read to the end: the connection goes back to the pool
            else:
                resp.close()  # the upstream sees the disconnect and stops generating

    async def check(self, url: str, headers: Mapping[str, str]) -> tuple[bool, str]:
        """GET `url` as a health probe: (True, "ok") or (False, why). Never raises."""
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S), self.open().get(url, headers=headers) as resp:
                if resp.status == 200:
                    await resp.read()
                    return True, "ok"
                raise await self._http_error(resp, asyncio.get_running_loop().time() + HEALTH_TIMEOUT_S)
        except InferBusError as exc:
            return False, exc.message
        except TimeoutError:
            return False, self.fail("upstream_timeout", f"did not answer within {HEALTH_TIMEOUT_S:g}s").message
        except Exception as exc:
            return False, self._connection_error(exc).message

    async def _post(
        self, url: str, data: bytes, headers: Mapping[str, str], deadline: float
    ) -> aiohttp.ClientResponse:
        try:
            async with asyncio.timeout_at(deadline):
                return await self.open().post(url, data=data, headers={"content-type": "application/json", **headers})
        except aiohttp.ServerTimeoutError:
            raise self.fail("upstream_timeout", f"could not be reached within {self.connect_timeout_s:g}s") from None
        except TimeoutError:
            raise self.fail(
                "upstream_timeout", f"sent no response within {self.first_byte_timeout_s:g}s"
            ) from None
        except aiohttp.ClientError as exc:
            raise self._connection_error(exc) from None

    async def _read(self, resp: aiohttp.ClientResponse, deadline: float, what: str) -> bytes:
        try:
            async with asyncio.timeout_at(deadline):
                return await resp.content.readany()
        except TimeoutError:
            raise self.fail("upstream_timeout", what) from None
        except aiohttp.ClientError:
            raise self.fail("upstream_error", "closed the stream before it finished") from None

    async def _http_error(self, resp: aiohttp.ClientResponse, deadline: float) -> InferBusError:
        try:
            async with asyncio.timeout_at(max(deadline, asyncio.get_running_loop().time() + 1.0)):
                raw = await resp.content.read(ERROR_BODY_LIMIT)
        except (TimeoutError, aiohttp.ClientError):
            raw = b""
        fault = parse_fault(raw.decode("utf-8", "replace"))
        code = self.refine(resp.status, fault) or error_code(resp.status, fault)
        exc = self.fail(code, f"returned {resp.status}: {fault.message or resp.reason or 'no message'}")
        return exc.retry_in(retry_after_s(resp.headers, fault.retry_delay_s)) if code == "rate_limited" else exc

    def _connection_error(self, exc: BaseException) -> InferBusError:
        if isinstance(exc, aiohttp.ClientConnectorError):
            return self.fail("upstream_error", f"cannot be reached: {exc}")
        return self.fail("upstream_error", f"connection failed: {type(exc).__name__}: {exc}")


# ---- The engine -----------------------------------------------------------------------------


@dataclass(slots=True)
class Turn:
    """What one streamed answer has said besides its text: finish reason, the provider's usage, and the tool
    call deltas and logprobs of the latest event (the engine takes them after each `read`)."""

    finish: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    calls: list[ToolCallDelta] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    blocks: dict[int, int] = field(default_factory=dict)  # a provider's content block -> our tool call index
    called: int = 0  # tool calls begun so far

    def call(self, call_id: str | None, name: str, arguments: str = "") -> int:
        """A new tool call (its index), with the provider's id or one of ours."""
        index, self.called = self.called, self.called + 1
        self.calls.append(ToolCallDelta(index, call_id or new_call_id(), name, arguments))
        return index


def conversation(request: GenerateRequest, tools: bool = False) -> list[tuple[str, str]]:
    """(role, text) turns with roles system/user/assistant; a plain prompt is one user turn.

    `tools`: the caller translates tool turns itself (they pass with role `tool`, their calls elsewhere).
    """
    if request.messages is None:
        return [("user", request.prompt or "")]
    turns = []
    for i, m in enumerate(request.messages):
        role = "system" if m.role == "developer" else m.role
        if role not in ("system", "user", "assistant") and not (tools and role == "tool"):
            raise InferBusError("invalid_request", f"role {m.role!r} is not supported here", param=f"messages[{i}]")
        turns.append((role, m.content))
    return turns


def arguments_object(arguments: str, param: str) -> Any:
    """A tool call's JSON arguments as a value, for providers that take objects rather than text."""
    try:
        return msgspec.json.decode(arguments)
    except msgspec.DecodeError:
        raise InferBusError("invalid_request", f"{param}: arguments must be JSON text", param=param) from None


def estimated_prompt_tokens(request: GenerateRequest) -> int:
    """About four characters a token: for an upstream that reports no usage."""
    chars = len(request.prompt or "") + sum(len(m.content) for m in request.messages or ())
    return (chars + 3) // 4


class RemoteEngine:
    """A provider's API behind the engine seam. Subclasses translate; this class does the I/O."""

    name = "remote"
    default_base_url = ""
    supported: frozenset[str] = frozenset()  # of the request fields `base.refuse` checks: what it passes on

    def __init__(
        self,
        *,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        capacity: int = 256,
        connect_timeout_s: float = 5.0,
        first_byte_timeout_s: float = 60.0,
        idle_timeout_s: float = 60.0,
        headers: dict[str, str] | None = None,
        system_prompt: str | None = None,
    ) -> None:
        if not model:
            raise ValueError(f"the {self.name} engine needs `model`, the upstream's model name")
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        if min(connect_timeout_s, first_byte_timeout_s, idle_timeout_s) <= 0:
            raise ValueError("timeouts must be positive")
        self.model = model
        self.base_url = (base_url or self.default_base_url).rstrip("/")
        self.api_key = api_key
        self.capacity = capacity
        self.extra_headers = dict(headers or {})
        self.system_prompt = system_prompt  # accepted for one config shape; a remote model keeps its own default
        self.upstream = Upstream(
            self.name,
            capacity=capacity,
            connect_timeout_s=connect_timeout_s,
            first_byte_timeout_s=first_byte_timeout_s,
            idle_timeout_s=idle_timeout_s,
            refine=self.refine,
        )
        self._secret_values: dict[str, str] = {}
        self._mask()

    async def load(self, progress: Progress) -> None:
        self.upstream.open()
        progress(f"{self.name} upstream {self.base_url}, model {self.model}", 1.0)

    def prepare(self, request: GenerateRequest) -> Prepared:
        if not request.plain or request.seed is not None:
            refuse(self.name, request, self.supported)
        return Prepared(prompt=self.body(request), prompt_tokens=0)

    async def generate(self, prepared: Prepared, request: GenerateRequest) -> AsyncGenerator[Piece, None]:
        assert isinstance(prepared.prompt, dict)
        turn = Turn()
        pieces = 0
        headers = self.headers()
        if tracing.tracer is not None:
            tracing.inject(headers)  # the worker's span (current here) is the upstream call's parent
        stream = self.upstream.events(self.stream_url(), prepared.prompt, headers)
        async with contextlib.aclosing(stream) as events:  # closing us closes the upstream response at once
            async for event in events:
                text = self.read(event, turn)
                if turn.calls or turn.logprobs:
                    calls, logprobs = turn.calls or None, turn.logprobs or None
                    turn.calls, turn.logprobs = [], []
                    pieces += 1
                    yield Piece(text, 1, tool_calls=calls, logprobs=logprobs)
                elif text:
                    pieces += 1
                    yield Piece(text, 1)
        if turn.finish is None:
            raise self.upstream.fail("upstream_error", "closed the stream before it finished")
        yield Piece(
            "",
            0,
            turn.finish,
            prompt_tokens=estimated_prompt_tokens(request) if turn.prompt_tokens is None else turn.prompt_tokens,
            completion_tokens=pieces if turn.completion_tokens is None else turn.completion_tokens,
        )

    async def health(self) -> tuple[bool, str]:
        return await self.upstream.check(self.models_url(), self.headers())

    def update_secrets(self, secrets: dict[str, str]) -> None:
        """`api_key` replaces the key; any other entry is a secret header (name: value) sent from now on."""
        for key, value in secrets.items():
            if key == "api_key":
                self.api_key = value
            else:
                self.extra_headers[key] = value
                self._secret_values[key] = value
        self._mask()

    async def close(self) -> None:
        await self.upstream.close()

    def headers(self) -> dict[str, str]:
        return {**self.extra_headers, **self.auth_headers()}

    def decode(self, decoder: msgspec.json.Decoder[T], event: SSEEvent) -> T:
        try:
            return decoder.decode(event.data)
        except msgspec.DecodeError as exc:
            chunk = event.data[:80]
            raise self.upstream.fail("upstream_error", f"sent a malformed stream chunk ({exc}): {chunk!r}") from None

    def _mask(self) -> None:
        values: Iterable[str] = [self.api_key or "", *self._secret_values.values()]
        self.upstream.secrets = tuple(v for v in values if len(v) >= 6)

    # ---- the translator: no I/O below, each provider fills these in ----

    def body(self, request: GenerateRequest) -> dict[str, Any]:
        raise NotImplementedError

    def stream_url(self) -> str:
        raise NotImplementedError

    def models_url(self) -> str:
        raise NotImplementedError

    def auth_headers(self) -> dict[str, str]:
        raise NotImplementedError

    def read(self, event: SSEEvent, turn: Turn) -> str:
        """One stream event: its text ("" if none); finish and usage go into `turn`."""
        raise NotImplementedError

    def refine(self, status: int, fault: Fault) -> str | None:
        """A provider's own error code for an HTTP error, where the generic mapping would miss it."""
        return None
