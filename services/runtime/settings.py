"""One settings loader: defaults, then a TOML file (INFERBUS_CONFIG), then INFERBUS_* variables."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, TypeVar

import msgspec

PREFIX = "INFERBUS_"
T = TypeVar("T", bound=msgspec.Struct)


class CommonSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    nats_url: str = "nats://127.0.0.1:4222"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    redis_url: str = "redis://127.0.0.1:6379/0"
    log_level: str = "info"
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"


class SettingsError(Exception):
    pass


def _env_value(raw: str) -> Any:
    stripped = raw.strip()
    if stripped[:1] in ("[", "{"):
        return json.loads(stripped)
    return raw


def load(cls: type[T], section: str, env: dict[str, str] | None = None) -> T:
    """Build `cls` from the [common] and [section] tables of the config file plus the environment."""
    environ = os.environ if env is None else env
    data: dict[str, Any] = {}
    config_path = environ.get(PREFIX + "CONFIG")
    if config_path:
        with Path(config_path).open("rb") as f:
            table = tomllib.load(f)
        data.update(table.get("common", {}))
        data.update(table.get(section, {}))
    for field in cls.__struct_fields__:
        raw = environ.get(PREFIX + field.upper())
        if raw is not None:
            data[field] = _env_value(raw)
    try:
        return msgspec.convert(data, cls, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"invalid {section} settings: {exc}") from exc
