"""structlog JSON logs with request and trace ids bound, and secrets (keys, URL passwords) redacted."""

from __future__ import annotations

import logging
import re
import sys
import traceback
from collections.abc import MutableMapping
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any

import structlog

MASK = "***"
# An InferBus key anywhere in a text (not the tail of a longer word such as "lib-foo").
KEY_PATTERN = re.compile(r"(?<![A-Za-z0-9_-])ib-[A-Za-z0-9_-]{6,}")
BEARER_PATTERN = re.compile(r"(?i)(bearer\s+)[^\s\"',]+")
# scheme://user:password@host — the password runs to the last "@" before the host, so an
# unescaped "@" in it is hidden too.
URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s/?#@:\"']*):[^\s/?#\"']*@")
# NATS also takes a bare token as the user-info (nats://token@host): for its schemes, hide it whole.
URL_TOKEN = re.compile(r"(?i)\b((?:nats|tls|ws|wss)://)[^\s/?#@:\"']+@")
QUERY_SECRET = re.compile(
    r"(?i)(?<![A-Za-z0-9_-])((?:password|passwd|pwd|pass|token|access_token|auth_token|secret|client_secret"
    r"|api_key|apikey|api-key|key|sslpassword)=)[^&\s#\"',;]+"
)


def redact(text: str) -> str:
    """`text` with InferBus keys, bearer tokens, URL passwords/tokens and query-string secrets masked."""
    text = URL_PASSWORD.sub(rf"\1:{MASK}@", text)
    text = URL_TOKEN.sub(rf"\1{MASK}@", text)
    text = QUERY_SECRET.sub(rf"\1{MASK}", text)
    text = KEY_PATTERN.sub("ib-" + MASK, text)
    return BEARER_PATTERN.sub(rf"\1{MASK}", text)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict):
        return {_redact_value(k): _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v) for v in value]
    shown = repr(value)  # what the JSON renderer would print for it
    hidden = redact(shown)
    return value if hidden == shown else hidden


def _redact_processor(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        event[key] = _redact_value(value)
    return event


class RedactingFormatter(logging.Formatter):
    """For the standard library's loggers (asyncio, aiohttp, FastStream): the same redaction."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def _redacting_excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    sys.stderr.write(redact("".join(traceback.format_exception(kind, exc, tb))))


def configure(service: str, level: str = "info") -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(message)s"))
    logging.basicConfig(level=max(numeric, logging.WARNING), handlers=[handler])
    sys.excepthook = _redacting_excepthook  # a crash's traceback may quote a URL too
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _merge_request_context,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact_processor,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)


def get(name: str | None = None) -> Any:
    return structlog.get_logger(name)


# Per-request context (request id, model, worker): one ContextVar holding a dict, set once per request.
# structlog's own contextvars cost one ContextVar set and reset per key, which showed in hot-path profiles.
_CONTEXT: ContextVar[dict[str, Any]] = ContextVar("inferbus_log_context", default={})  # noqa: B039 - never mutated


class bound:
    """Fields added to every log line inside the `with` block (this task and the tasks it starts)."""

    __slots__ = ("fields", "token")

    def __init__(self, **fields: Any) -> None:
        self.fields = fields
        self.token: Token[dict[str, Any]] | None = None

    def __enter__(self) -> None:
        self.token = _CONTEXT.set({**_CONTEXT.get(), **self.fields})

    def __exit__(self, *exc: object) -> None:
        if self.token is not None:
            _CONTEXT.reset(self.token)


def bind(**fields: Any) -> None:
    """Add fields to this task's log context until it ends (or its `bound` block does)."""
    _CONTEXT.set({**_CONTEXT.get(), **fields})


def unbind(*keys: str) -> None:
    context = dict(_CONTEXT.get())
    for key in keys:
        context.pop(key, None)
    _CONTEXT.set(context)


def _merge_request_context(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    context = _CONTEXT.get()
    if context:
        for key, value in context.items():
            event.setdefault(key, value)
    return event
