"""The deployment file (`inferbus up --config inferbus.toml`): what runs on this machine, read with line numbers.

One TOML file says which services run and how many of each, which workers serve which models with which
engines, which remote provider versions are registered, and which NATS, PostgreSQL and Redis to use (the
embedded ones when it names none). Every process gets its settings from it as INFERBUS_* variables, so a
service's own settings loader is unchanged. Errors name the line they are on:

    inferbus.toml:14: workers[0].replicas: expected an integer >= 0, got -1

This module is the model and its structural checks; `inferbus config check` (services/cli/config.py) adds the
checks that need each service's settings class.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import msgspec


class Spec(NamedTuple):
    """A service or worker kind `up` can run: its module, its settings class and its engines (for checks)."""

    module: str
    settings: str  # "module:Class"
    replicas: int = 1  # started by default (0: only when a deployment file asks)
    engines: str = ""  # "module:NAME" of its engine names, for workers


# Everything `inferbus up` can run, in start order. A new service is one line here (and in natsauth.MODULE_ROLES).
SERVICES: dict[str, Spec] = {
    "registry": Spec("services.registry", "services.registry.main:RegistrySettings"),
    "router": Spec("services.router", "services.router.main:RouterSettings"),
    "metering": Spec("services.metering", "services.metering.main:MeteringSettings"),
    "gateway": Spec("services.gateway", "services.gateway.state:GatewaySettings"),
    "providers": Spec("services.llm.providers", "services.llm.providers:ProviderHostSettings"),  # remote versions
    "batch": Spec("services.batch", "services.batch.main:BatchSettings"),  # Files + Batch APIs
}
# Worker kinds: a [[workers]] entry's `kind`. One process serves one model version.
WORKERS: dict[str, Spec] = {
    "llm": Spec("services.llm", "services.llm.main:LLMSettings", engines="services.llm.engines:ENGINES"),
    "asr": Spec("services.speech.asr", "services.speech.asr.main:ASRSettings",
                engines="services.speech.asr.engines:ENGINES"),
    "tts": Spec("services.speech.tts", "services.speech.tts.main:TTSSettings",
                engines="services.speech.tts.engines:ENGINES"),
    "embed": Spec("services.embed", "services.embed.main:EmbedSettings", engines="services.embed.engines:ENGINES"),
    "vision": Spec("services.vision", "services.vision.main:VisionSettings", replicas=0,
                   engines="services.vision.engines:ENGINES"),
}
REMOTE_ENGINES = ("openai", "anthropic", "gemini")  # served by the provider host, declared under [[models]]
# Settings the deployment sets itself; a service table naming one is a mistake (it says where to set it).
OWN_SETTINGS = {
    "nats_url": "[nats] url", "nats_credentials": "[nats] credentials_dir", "database_url": "[postgres] url",
    "redis_url": "[redis] url", "data_dir": "data_dir (top level)", "admin_key": "INFERBUS_ADMIN_KEY",
}
_TOKEN = re.compile(r"^[^.*>\s]+$")  # a subject token: model and version names
_SECRET_WORDS = ("key", "token", "secret", "password", "authorization", "credential")


class NatsTable(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    url: str = ""  # "": an embedded nats-server; else the cluster's URLs, comma-separated
    credentials_dir: str = ""  # nats-<role>.json per role (`inferbus config secrets`); default <data_dir>/secrets
    replicas: int = 1  # JetStream replicas of the platform's streams, KV buckets and object stores
    tls: bool = False  # embedded server: TLS with a local CA (as INFERBUS_NATS_TLS=1)
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""


class StoreTable(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    url: str = ""  # "": the embedded server


class ModelEntry(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A version registered in the registry at start (and deployed as stable when it is new)."""

    model: str
    version: str
    engine: str
    kind: str = "llm"
    description: str = ""
    params: dict[str, Any] = {}
    secrets: dict[str, str] = {}  # name -> "env:VAR" or "@/path/to/file": never the value itself
    deploy: bool = True


class ServiceEntry(msgspec.Struct, kw_only=True):
    """A service or worker as the file asks for it: how many, and its settings (INFERBUS_<FIELD>)."""

    name: str
    spec: Spec
    replicas: int
    settings: dict[str, Any]
    kind: str = ""  # workers: llm, asr, ...


class Process(NamedTuple):
    """One OS process to run: `python -m module` with these INFERBUS_* settings."""

    name: str  # unique in the deployment: gateway (or gateway-1, gateway-2, ...), llm, ...
    group: str  # its service or worker entry
    module: str
    settings: dict[str, Any]
    kind: str  # worker kind, "" for services


class Problem(NamedTuple):
    path: tuple[str | int, ...]
    message: str
    line: int = 0
    warning: bool = False

    def render(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line else source
        what = "warning: " if self.warning else ""
        return f"{where}: {what}{dotted(self.path) + ': ' if self.path else ''}{self.message}"


class Deployment(msgspec.Struct, kw_only=True):
    source: str = ""  # the file it came from ("" for the defaults)
    data_dir: str = ".inferbus"
    nats: NatsTable = NatsTable()
    postgres: StoreTable = StoreTable()
    redis: StoreTable = StoreTable()
    common: dict[str, Any] = {}  # settings for every process
    services: list[ServiceEntry] = []
    workers: list[ServiceEntry] = []
    models: list[ModelEntry] = []

    def processes(self) -> list[Process]:
        """Every process to start, services first: replicas of one entry count `port` and `metrics_port` up."""
        out: list[Process] = []
        for entry in (*self.services, *self.workers):
            for i in range(entry.replicas):
                values = {**self.common, **entry.settings}
                for port in ("port", "metrics_port"):
                    if isinstance(values.get(port), int) and values[port]:
                        values[port] += i
                name = entry.name if entry.replicas == 1 else f"{entry.name}-{i + 1}"
                out.append(Process(name, entry.name, entry.spec.module, values, entry.kind))
        return out

    def entry(self, name: str) -> ServiceEntry | None:
        return next((e for e in (*self.services, *self.workers) if e.name == name), None)


def dotted(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# ---- the defaults: today's `inferbus up` -------------------------------------------------------------------------


def default() -> Deployment:
    """What `inferbus up` runs without a file: every default service and worker with its own defaults."""
    services = [ServiceEntry(name=n, spec=s, replicas=s.replicas, settings={}) for n, s in SERVICES.items()]
    workers = [ServiceEntry(name=k, spec=s, replicas=1, settings={}, kind=k)
               for k, s in WORKERS.items() if s.replicas]
    # Vision workers only when asked (~0.3-0.45 GB each): INFERBUS_UP_VISION=efficientnet-lite0,ppocr-v4,...
    for model in (m.strip() for m in os.environ.get("INFERBUS_UP_VISION", "").split(",")):
        if model:
            workers.append(ServiceEntry(name=f"vision-{model}", spec=WORKERS["vision"], replicas=1,
                                        settings={"model": model}, kind="vision"))
    return Deployment(data_dir=os.environ.get("INFERBUS_DATA_DIR", ".inferbus"), services=services, workers=workers)


# ---- reading a file ----------------------------------------------------------------------------------------------


class DeploymentError(Exception):
    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(p.render(source) for p in problems))


_TOP = ("data_dir", "nats", "postgres", "redis", "common", "workers", "models")


def parse(text: str, source: str = "inferbus.toml") -> tuple[Deployment | None, list[Problem]]:
    """The deployment and every problem found in it (structure, types, names, ports, secrets)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"\(at line (\d+)", str(exc))
        return None, [Problem((), f"not valid TOML: {exc}", int(match.group(1)) if match else 0)]
    lines = line_index(text)
    problems: list[Problem] = []

    def problem(path: tuple[str | int, ...], message: str, warning: bool = False) -> None:
        problems.append(Problem(path, message, line_of(lines, path), warning))

    for key in data:
        if key not in _TOP and key not in SERVICES:
            problem((key,), f"unknown table or key{suggest(key, [*_TOP, *SERVICES])}; known: "
                            f"{', '.join([*_TOP, *SERVICES])}")
    out = Deployment(source=source)
    data_dir = data.get("data_dir", out.data_dir)
    if not isinstance(data_dir, str) or not data_dir:
        problem(("data_dir",), "expected a directory path (a non-empty string)")
    else:
        out.data_dir = data_dir
    out.nats = _struct(data, "nats", NatsTable, problem) or NatsTable()
    out.postgres = _struct(data, "postgres", StoreTable, problem) or StoreTable()
    out.redis = _struct(data, "redis", StoreTable, problem) or StoreTable()
    _check_urls(out, problem)
    common = data.get("common", {})
    if not isinstance(common, dict):
        problem(("common",), "expected a table of settings for every process")
    else:
        _own_settings(common, ("common",), problem)
        out.common = common
    for name, spec in SERVICES.items():
        table = data.get(name, {})
        if not isinstance(table, dict):
            problem((name,), "expected a table")
            continue
        replicas = _replicas(table, (name,), spec.replicas, problem)
        settings = {k: v for k, v in table.items() if k != "replicas"}
        _own_settings(settings, (name,), problem)
        out.services.append(ServiceEntry(name=name, spec=spec, replicas=replicas, settings=settings))
    out.workers = _workers(data.get("workers", []), problem)
    out.models = _models(data.get("models", []), problem)
    _check_names_and_ports(out, problem)
    return out, sorted(problems, key=lambda p: (p.line or 10**9, p.warning))


def _struct(data: dict[str, Any], key: str, cls: type[Any], problem: Any) -> Any:
    table = data.get(key, {})
    if not isinstance(table, dict):
        problem((key,), "expected a table")
        return None
    return convert_fields(table, cls, (key,), problem)


def convert_fields(
    table: dict[str, Any], cls: type[Any], path: tuple[str | int, ...], problem: Any, skip: Iterable[str] = ()
) -> Any:
    """`table` as `cls`, reporting each unknown key, each wrong value and each missing key on its own."""
    fields = {f.encode_name: f for f in msgspec.structs.fields(cls)}
    skipped = set(skip)
    ok = True
    for key, value in table.items():
        if key in skipped:
            continue
        field = fields.get(key)
        if field is None:
            problem((*path, key), f"unknown setting{suggest(key, list(fields))}")
            ok = False
            continue
        try:
            msgspec.convert(value, field.type, strict=False)
        except msgspec.ValidationError as exc:
            problem((*path, key), _type_message(exc, value, field.type))
            ok = False
    for name, field in fields.items():
        if field.required and name not in table and name not in skipped:
            problem(path, f"missing `{name}`")
            ok = False
    if not ok:
        return None
    return msgspec.convert({k: v for k, v in table.items() if k not in skipped}, cls, strict=False)


def _type_message(exc: msgspec.ValidationError, value: Any, type_: Any) -> str:
    text = str(exc)
    where = re.search(r" - at `\$(.+)`$", text)
    at = f" (at {where.group(1)})" if where else ""
    choices = typing.get_args(type_) if typing.get_origin(type_) is typing.Literal else ()
    if choices:
        return f"expected one of {', '.join(map(repr, choices))}, got {value!r}"
    expected = re.match(r"Expected `([^`]+)`", text)
    if expected:
        return f"expected {expected.group(1)}{at}, got {value!r}"
    return f"{text[0].lower()}{text[1:]}"


def suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _replicas(table: dict[str, Any], path: tuple[str | int, ...], default: int, problem: Any) -> int:
    value = table.get("replicas", default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        problem((*path, "replicas"), f"expected an integer >= 0 (0: not started here), got {value!r}")
        return 0
    return value


def _own_settings(settings: dict[str, Any], path: tuple[str | int, ...], problem: Any) -> None:
    for key, where in OWN_SETTINGS.items():
        if key in settings:
            problem((*path, key), f"set this in {where}, not per service")


def _workers(raw: Any, problem: Any) -> list[ServiceEntry]:
    if not isinstance(raw, list):
        problem(("workers",), "expected an array of tables: [[workers]]")
        return []
    out = []
    kinds = [table.get("kind") for table in raw if isinstance(table, dict)]
    for i, table in enumerate(raw):
        path: tuple[str | int, ...] = ("workers", i)
        if not isinstance(table, dict):
            problem(path, "expected a table")
            continue
        kind = table.get("kind")
        if kind not in WORKERS:
            problem((*path, "kind"), f"expected one of {', '.join(WORKERS)}, got {kind!r}"
                                     f"{suggest(str(kind), list(WORKERS))}")
            continue
        engine = table.get("engine")
        if engine in REMOTE_ENGINES:
            problem((*path, "engine"), f"{engine} is a remote provider: declare it under [[models]] (the "
                                       "provider host serves it), not as a worker")
        for key in ("model", "version"):
            value = table.get(key)
            if value is not None and (not isinstance(value, str) or not _TOKEN.match(value)):
                problem((*path, key), f"expected a name without '.', '*', '>' or spaces (a subject token), "
                                      f"got {value!r}")
        name = table.get("name")
        if name is None:  # the kind, or <kind>-<model> when several workers are of that kind
            alone = kinds.count(kind) == 1 or not table.get("model")
            name = re.sub(r"[^A-Za-z0-9_-]", "-", kind if alone else f"{kind}-{table['model']}")
        elif not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
            problem((*path, "name"), f"expected letters, digits, '-' and '_', got {name!r}")
            name = f"{kind}-{i}"
        replicas = _replicas(table, path, 1, problem)
        settings = {k: v for k, v in table.items() if k not in ("kind", "name", "replicas")}
        _own_settings(settings, path, problem)
        out.append(ServiceEntry(name=name, spec=WORKERS[kind], replicas=replicas, settings=settings, kind=kind))
    return out


def _models(raw: Any, problem: Any) -> list[ModelEntry]:
    if not isinstance(raw, list):
        problem(("models",), "expected an array of tables: [[models]]")
        return []
    out = []
    for i, table in enumerate(raw):
        path: tuple[str | int, ...] = ("models", i)
        if not isinstance(table, dict):
            problem(path, "expected a table")
            continue
        entry = convert_fields(table, ModelEntry, path, problem)
        if entry is None:
            continue
        for key in ("model", "version"):
            if not _TOKEN.match(getattr(entry, key)):
                problem((*path, key), f"expected a name without '.', '*', '>' or spaces, got {getattr(entry, key)!r}")
        if entry.kind not in WORKERS:
            problem((*path, "kind"), f"expected one of {', '.join(WORKERS)}, got {entry.kind!r}")
        for name in entry.params:
            if any(word in name.lower() for word in _SECRET_WORDS):
                problem((*path, "params", name), "looks like a credential: put it under `secrets` as "
                                                 f'{name} = "env:VARIABLE" (or "@/path/to/file")')
        remote = entry.engine in REMOTE_ENGINES
        if entry.engine == "openai" and not entry.params.get("base_url"):
            problem((*path, "params"), 'an openai version needs params.base_url, e.g. "https://api.openai.com/v1"')
        base_url = entry.params.get("base_url")
        if base_url is not None and not re.match(r"^https?://[^/@\s]+", str(base_url)):
            problem((*path, "params", "base_url"), f"expected an http(s) URL without credentials, got {base_url!r}")
        if entry.secrets and not remote:
            problem((*path, "secrets"), f"secrets are for remote provider versions ({', '.join(REMOTE_ENGINES)})")
        for name, ref in entry.secrets.items():
            if ref.startswith("env:") and ref[4:]:
                if ref[4:] not in os.environ:
                    problem((*path, "secrets", name), f"the environment variable {ref[4:]} is not set here", True)
            elif ref.startswith("@") and ref[1:]:
                if not Path(ref[1:]).expanduser().is_file():
                    problem((*path, "secrets", name), f"no file {ref[1:]} here", True)
            else:
                problem((*path, "secrets", name), 'expected "env:VARIABLE" or "@/path/to/file": a secret\'s value '
                                                  "never goes in the deployment file")
        out.append(entry)
    return out


def _check_urls(d: Deployment, problem: Any) -> None:
    schemes = {"nats": ("nats", "tls"), "postgres": ("postgresql", "postgres"), "redis": ("redis", "rediss", "unix")}
    urls = {"nats": d.nats.url, "postgres": d.postgres.url, "redis": d.redis.url}
    for table, url in urls.items():
        for one in filter(None, (u.strip() for u in url.split(","))):
            scheme = one.split("://", 1)[0] if "://" in one else ""
            if scheme not in schemes[table]:
                problem((table, "url"), f"expected a {' or '.join(s + '://' for s in schemes[table])} URL, got {one!r}")
            if table != "nats" and "," in url:
                problem((table, "url"), "expected one URL")
                break
    if d.nats.replicas not in (1, 3, 5):
        problem(("nats", "replicas"), f"expected 1, 3 or 5 (JetStream replicas), got {d.nats.replicas}")
    elif d.nats.replicas > 1 and not d.nats.url:
        problem(("nats", "replicas"), f"{d.nats.replicas} replicas need a NATS cluster: set [nats] url to its "
                                      "servers (the embedded server is a single node)")
    if d.nats.url and d.nats.tls:
        problem(("nats", "tls"), "`tls` makes the embedded server use TLS; for an external one set tls_ca")


def _check_names_and_ports(d: Deployment, problem: Any) -> None:
    seen: dict[str, tuple[str | int, ...]] = {name: (name,) for name in SERVICES}
    for i, w in enumerate(d.workers):
        if w.name in seen:
            problem(("workers", i, "name"), f"the name {w.name!r} is taken (by {dotted(seen[w.name])}): give this "
                                            "worker its own `name`")
        seen[w.name] = ("workers", i)
    ports: dict[int, str] = {}
    for proc in d.processes():
        entry = d.entry(proc.group)
        for key in ("port", "metrics_port"):
            value = proc.settings.get(key)
            if not value or entry is None or key not in entry.settings:
                continue  # [common] ports: one process per host or container (`inferbus run`)
            if not isinstance(value, int):
                continue  # the settings check reports it
            if not 0 < value < 65536:
                problem(_entry_path(d, proc.group, key), f"expected a port number (1-65535), got {value!r}")
                continue
            if value in ports:
                problem(_entry_path(d, proc.group, key), f"port {value} of {proc.name} is also {ports[value]}'s "
                                                         "(replicas count up from the port given)")
            ports[value] = proc.name
    declared: set[tuple[str, str]] = set()
    for i, m in enumerate(d.models):
        if (m.model, m.version) in declared:
            problem(("models", i), f"{m.model} {m.version} is declared twice")
        declared.add((m.model, m.version))


def _entry_path(d: Deployment, group: str, key: str) -> tuple[str | int, ...]:
    """Where a process's setting came from: its worker entry, its service table or [common]."""
    for i, w in enumerate(d.workers):
        if w.name == group and key in w.settings:
            return ("workers", i, key)
    entry = d.entry(group)
    if (entry is None or key not in entry.settings) and key in d.common:
        return ("common", key)
    return (group, key)


# ---- line numbers ------------------------------------------------------------------------------------------------

_HEADER = re.compile(r"^\s*(\[\[?)\s*(.+?)\s*\]\]?\s*(?:#.*)?$")
_KEY_PART = r"(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')"
_KEY = re.compile(rf"^\s*({_KEY_PART}(?:\s*\.\s*{_KEY_PART})*)\s*=")
_INLINE_KEY = re.compile(r"[{,]\s*([A-Za-z0-9_-]+)\s*=")
_STRINGS = re.compile(r"\"(?:\\.|[^\"\\])*\"|'[^']*'")


def _keys(dotted_key: str) -> list[str]:
    return [k.strip().strip("\"'") for k in re.findall(_KEY_PART, dotted_key)]


def line_index(text: str) -> dict[tuple[str | int, ...], int]:
    """The line of each table, array element and key of a TOML document, by path (("workers", 0, "model"))."""
    index: dict[tuple[str | int, ...], int] = {}
    arrays: dict[tuple[str | int, ...], int] = {}  # array-of-tables path -> index of its last element
    current: tuple[str | int, ...] = ()
    open_string = ""
    depth = 0
    for number, line in enumerate(text.splitlines(), 1):
        if open_string:
            if open_string in line:
                open_string = ""
            continue
        bare = _STRINGS.sub('""', line).split("#", 1)[0]
        if depth > 0:
            depth = max(0, depth + bare.count("[") + bare.count("{") - bare.count("]") - bare.count("}"))
            continue
        header = _HEADER.match(line)
        if header and not _KEY.match(line):
            keys = _keys(header.group(2))
            path: tuple[str | int, ...] = ()
            for j, key in enumerate(keys):
                path = (*path, key)
                last = j == len(keys) - 1
                if path in arrays and not (last and header.group(1) == "[["):
                    path = (*path, arrays[path])
            if header.group(1) == "[[":
                arrays[path] = arrays.get(path, -1) + 1
                index.setdefault(path, number)
                path = (*path, arrays[path])
            current = path
            index.setdefault(current, number)
            continue
        found = _KEY.match(line)
        if not found:
            continue
        path = (*current, *_keys(found.group(1)))
        index.setdefault(path, number)
        rest = line[found.end():]
        rest_bare = _STRINGS.sub('""', rest).split("#", 1)[0]
        for inner in _INLINE_KEY.findall(rest_bare):
            index.setdefault((*path, inner), number)
        for quote in ('"""', "'''"):
            if rest.count(quote) % 2 == 1:
                open_string = quote
        depth = max(0, rest_bare.count("[") + rest_bare.count("{") - rest_bare.count("]") - rest_bare.count("}"))
    return index


def line_of(index: dict[tuple[str | int, ...], int], path: tuple[str | int, ...]) -> int:
    """The line of `path`, or of its nearest ancestor in the file (0: nowhere, e.g. a missing table)."""
    for end in range(len(path), 0, -1):
        if path[:end] in index:
            return index[path[:end]]
    return 0
