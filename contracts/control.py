"""Control-plane messages: worker presence and admin requests."""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import Struct


class WorkerLoad(Struct, frozen=True, kw_only=True):
    worker_id: str
    kind: str
    model: str
    version: str
    engine: str
    in_flight: int
    queued: int
    capacity: int
    tokens_per_s: float
    ready: bool
    upstream: str | None = None  # a remote provider's last health check: "ok" or why not
    batch_capacity: int | None = None  # slots batch lines may use (the rest are kept for interactive requests)


class AdminError(Struct, frozen=True, omit_defaults=True):
    code: str
    message: str
    param: str | None = None


class Reply(Struct, kw_only=True, omit_defaults=True):
    """Every admin reply on the bus: a result or a typed error (code from the error catalogue)."""

    result: Any = None
    error: AdminError | None = None


load_encoder = msgspec.msgpack.Encoder()
load_decoder = msgspec.msgpack.Decoder(WorkerLoad)
