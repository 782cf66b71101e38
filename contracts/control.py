"""Control-plane messages: worker presence and admin requests."""

from __future__ import annotations

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


class AdminError(Struct, frozen=True, omit_defaults=True):
    code: str
    message: str
    param: str | None = None


class CreateKeyRequest(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    scopes: list[str] = msgspec.field(default_factory=lambda: ["inference"])


class CreateKeyReply(Struct, frozen=True, kw_only=True, omit_defaults=True):
    key: str | None = None
    key_id: str | None = None
    error: AdminError | None = None


load_encoder = msgspec.msgpack.Encoder()
load_decoder = msgspec.msgpack.Decoder(WorkerLoad)
