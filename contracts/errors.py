"""The one error catalogue: every failure a client can see, with its HTTP status and retryability."""

from __future__ import annotations

from typing import Final

import msgspec


class ErrorSpec(msgspec.Struct, frozen=True):
    code: str
    http_status: int
    type: str
    retryable: bool


_SPECS: Final = (
    ErrorSpec("invalid_request", 400, "invalid_request_error", False),
    ErrorSpec("unsupported_parameter", 400, "invalid_request_error", False),
    ErrorSpec("context_length_exceeded", 400, "invalid_request_error", False),
    ErrorSpec("invalid_api_key", 401, "authentication_error", False),
    ErrorSpec("permission_denied", 403, "permission_error", False),
    ErrorSpec("model_not_found", 404, "invalid_request_error", False),
    ErrorSpec("not_found", 404, "invalid_request_error", False),
    ErrorSpec("conflict", 409, "invalid_request_error", False),
    ErrorSpec("request_too_large", 413, "invalid_request_error", False),
    ErrorSpec("rate_limited", 429, "rate_limit_error", True),
    ErrorSpec("insufficient_quota", 429, "insufficient_quota", False),
    ErrorSpec("limiter_unavailable", 503, "server_error", True),
    ErrorSpec("overloaded", 503, "server_error", True),
    # A batch line the worker turned away to keep room for interactive requests: nothing ran, nothing billed.
    ErrorSpec("deferred", 503, "server_error", True),
    ErrorSpec("no_worker", 503, "server_error", True),
    ErrorSpec("cancelled", 499, "server_error", False),
    ErrorSpec("stream_broken", 502, "server_error", True),
    ErrorSpec("worker_timeout", 504, "server_error", True),
    ErrorSpec("deadline_exceeded", 504, "timeout_error", False),
    ErrorSpec("engine_error", 500, "server_error", True),
    ErrorSpec("internal_error", 500, "server_error", True),
    # A remote provider's failures, as the client sees them (its 429 is `rate_limited`, with Retry-After).
    ErrorSpec("upstream_error", 502, "server_error", True),  # 5xx, a refused connection, a malformed chunk
    ErrorSpec("upstream_timeout", 504, "timeout_error", True),
    ErrorSpec("upstream_auth_failed", 502, "server_error", False),  # the provider refused our credentials
    ErrorSpec("content_filter", 400, "invalid_request_error", False),  # the provider's content policy
    ErrorSpec("circuit_open", 503, "server_error", True),  # every route's breaker is open
)

CATALOGUE: Final[dict[str, ErrorSpec]] = {spec.code: spec for spec in _SPECS}


class InferBusError(Exception):
    """A typed, client-visible failure. Transports map it; nothing else invents status codes."""

    def __init__(self, code: str, message: str, *, param: str | None = None) -> None:
        if code not in CATALOGUE:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.headers: dict[str, str] = {}
        self.retry_after: float | None = None  # seconds; travels in the error chunk on the bus

    def with_headers(self, headers: dict[str, str]) -> InferBusError:
        """HTTP headers the response carries with this error (Retry-After, x-ratelimit-*)."""
        self.headers = headers
        return self

    def retry_in(self, seconds: float) -> InferBusError:
        """The cause says when to retry (an upstream's 429): Retry-After on HTTP, `retry_after` on the bus."""
        self.retry_after = max(0.0, float(seconds))
        self.headers = {**self.headers, "Retry-After": str(max(1, round(self.retry_after)))}
        return self

    @property
    def spec(self) -> ErrorSpec:
        return CATALOGUE[self.code]

    @property
    def http_status(self) -> int:
        return self.spec.http_status

    @property
    def retryable(self) -> bool:
        return self.spec.retryable

    def openai_body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.spec.type, "code": self.code, "param": self.param}}

    def __repr__(self) -> str:
        return f"InferBusError({self.code!r}, {self.message!r})"


def invalid(message: str, param: str | None = None) -> InferBusError:
    return InferBusError("invalid_request", message, param=param)
