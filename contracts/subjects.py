"""Subject builders for the bus: the only place subject strings are spelled."""

from __future__ import annotations

import functools
import re
from typing import Final

KINDS: Final = frozenset({"llm", "embed", "asr", "tts", "vision"})
_UNSAFE = re.compile(r"[.*>\s]")


def token(name: str) -> str:
    """A model or version name as one subject token."""
    cleaned = _UNSAFE.sub("_", name.strip())
    if not cleaned:
        raise ValueError("empty subject token")
    return cleaned


def _kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    return kind


@functools.lru_cache(maxsize=4096)  # asked for on every request, for a handful of workers
def infer(kind: str, model: str, version: str | None = None, worker_id: str | None = None) -> str:
    parts = ["infer", _kind(kind), token(model)]
    if version is not None:
        parts.append(token(version))
        if worker_id is not None:
            parts.append(token(worker_id))
    return ".".join(parts)


def queue_group(kind: str, model: str, version: str) -> str:
    return f"{_kind(kind)}.{token(model)}.{token(version)}"


def cancel(request_id: str) -> str:
    return f"infer.cancel.{token(request_id)}"


CANCEL_ALL: Final = "infer.cancel.*"


def heartbeat(kind: str, model: str, version: str, worker_id: str) -> str:
    return f"registry.heartbeat.{_kind(kind)}.{token(model)}.{token(version)}.{token(worker_id)}"


HEARTBEAT_ALL: Final = "registry.heartbeat.>"

ADMIN_KEYS_CREATE: Final = "admin.keys.create"
ADMIN_KEYS_REVOKED: Final = "admin.keys.revoked"  # broadcast: every gateway drops the key
ADMIN_KEYS_CHANGED: Final = "admin.keys.changed"  # broadcast: limits/budget changed, drop cached copies


def admin(op: str) -> str:
    """Tenant and key administration, served by the gateways (queue group): admin.<area>.<verb>."""
    return f"admin.{op}"


def alias_all(kind: str) -> str:
    """What an alias router serves: `infer.<kind>.<model>` (one token after the kind, so never a version)."""
    return f"infer.{_kind(kind)}.*"


def registry_admin(op: str) -> str:
    return f"registry.admin.{op}"


def outcome(kind: str, model: str) -> str:
    return f"registry.outcome.{_kind(kind)}.{token(model)}"


OUTCOME_ALL: Final = "registry.outcome.>"

# Remote provider versions (engine openai/anthropic/gemini) with their decrypted secrets: asked by the
# provider hosts only (their role alone may), and a broadcast when one is registered, changed or rotated.
PROVIDER_VERSIONS: Final = "registry.provider.versions"
PROVIDER_CHANGED: Final = "registry.provider.changed"

# NATS KV bucket with one circuit breaker per upstream endpoint (gateways and routers read and write it).
BREAKER_BUCKET: Final = "INFERBUS_BREAKERS"

# The per-request log (JetStream stream REQUESTS): the edge publishes, metering writes PostgreSQL.
REQUEST_LOG_STREAM: Final = "REQUESTS"
REQUEST_LOG_ALL: Final = "requestlog.>"


def request_log(kind: str) -> str:
    return f"requestlog.{_kind(kind)}"
SHADOW_RECORD: Final = "registry.shadow.record"

# NATS KV bucket holding one routing table per model (the registry writes, gateways and routers watch).
ROUTING_BUCKET: Final = "INFERBUS_ROUTING"
_KV_UNSAFE = re.compile(r"[^-_=a-zA-Z0-9]")


def routing_key(kind: str, model: str) -> str:
    return f"{_kind(kind)}.{_KV_UNSAFE.sub('_', model.strip())}"


# Batch (services/batch): the API the gateway calls (queue group), operator requests, each replica's upload
# subject, the line execution gateways serve, the work queue and the files' object store.
BATCH_STREAM: Final = "BATCH"
BATCH_WORK_ALL: Final = "batch.work.>"
FILES_BUCKET: Final = "INFERBUS_FILES"
BATCH_EXEC: Final = "batch.exec"
BATCH_CHANGED: Final = "batch.changed"  # broadcast: a batch was cancelled (every replica stops its lines)


def batch_api(op: str) -> str:
    return f"batch.api.{op}"


def batch_upload(instance: str) -> str:
    return f"batch.api.upload.{token(instance)}"


def batch_admin(op: str) -> str:
    return f"batch.admin.{op}"


def batch_work(batch_id: str) -> str:
    return f"batch.work.{token(batch_id)}"
