"""Where `inferbus up` records what it started, so other commands can find the bus."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from services.runtime.bus import Identity


def data_dir() -> Path:
    return Path(os.environ.get("INFERBUS_DATA_DIR", ".inferbus")).resolve()


def state_file() -> Path:
    return data_dir() / "run.json"


def read() -> dict[str, Any]:
    try:
        return dict(json.loads(state_file().read_text()))
    except FileNotFoundError:
        return {}


def nats_url() -> str:
    return os.environ.get("INFERBUS_NATS_URL") or read().get("nats_url") or "nats://127.0.0.1:4222"


def nats_identity() -> Identity:
    """The CLI's NATS identity: INFERBUS_NATS_CREDENTIALS, else the admin role `inferbus up` generated."""
    identity = Identity.from_env()
    if identity.credentials:
        return identity
    secrets_dir = os.environ.get("INFERBUS_NATS_SECRETS")  # the generated secrets (tests, scripts)
    if secrets_dir:
        return identity.with_credentials(str(Path(secrets_dir) / "nats-admin.json"))
    return identity.with_credentials(read().get("nats_credentials", ""))
