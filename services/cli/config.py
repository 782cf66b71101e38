"""`inferbus config ...`: check a deployment file, write a NATS cluster's auth, create the JetStream assets.

- `check FILE`: every problem with its line (structure, each service's and worker's settings against its
  settings class, engines, URLs, ports, secret references), then what would run.
- `secrets FILE`: the deployment's generated secrets, made once in its credentials directory: the NATS
  identities (a password per role, the auth callout key), the `auth.conf` every node of infra/nats/cluster.conf
  includes, the cluster routes' password, the admin key and the key that seals provider secrets.
- `streams FILE`: USAGE, USAGE_DLQ, USAGE_ADVISORIES, REQUESTS, BATCH, the KV buckets and object stores, created
  with the file's `[nats] replicas`, made by the functions their own services use; existing streams are scaled up.
- `models FILE`: the file's `[[models]]` registered (and the new ones deployed), as `inferbus up` does.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib
import json
import secrets
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from services.runtime import bus, deployment
from services.runtime.deployment import Deployment, Problem
from services.runtime.natsauth import Secrets, server_config
from services.runtime.settings import CommonSettings

Say = Callable[[str], None]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("config", help="deployment file: check it, make its secrets, create its JetStream streams")
    cs = p.add_subparsers(dest="config_command", required=True)
    s = cs.add_parser("check", help="validate a deployment file; every error with its line")
    s.add_argument("file")
    s = cs.add_parser("secrets", help="make the generated secrets once: NATS identities and auth.conf, admin key")
    s.add_argument("file", nargs="?", help="deployment file (its [nats] credentials_dir or data_dir/secrets)")
    s = cs.add_parser("models", help="register the file's [[models]] in the registry (deploying the new ones)")
    s.add_argument("file")
    s.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the registry")
    s = cs.add_parser("streams", help="create the platform's streams, KV buckets and object stores")
    s.add_argument("file", nargs="?", help="deployment file: [nats] url, credentials_dir and replicas")
    s.add_argument("--replicas", type=int, help="override [nats] replicas")


def run(args: argparse.Namespace) -> int:
    if args.config_command == "check":
        return _check_command(args.file)
    loaded = _load_or_default(args.file)
    if loaded is None:
        return 1
    if args.config_command == "secrets":
        made = write_secrets(loaded)
        print(f"secrets in {credentials_dir(loaded)} (0600): " + (", ".join(made) or "all there already"))
        return 0
    if args.config_command == "streams":
        return asyncio.run(_streams_command(loaded, args.replicas))
    if args.config_command == "models":
        return asyncio.run(_models_command(loaded, args.wait))
    return 2


# ---- check -------------------------------------------------------------------------------------------------------


def check(path: str | Path) -> tuple[Deployment | None, list[Problem]]:
    """The file's deployment and every problem in it, each with its line."""
    text = Path(path).read_text()
    found, problems = deployment.parse(text, str(path))
    if found is None:
        return None, problems
    lines = deployment.line_index(text)

    def problem(where: tuple[str | int, ...], message: str) -> None:
        problems.append(Problem(where, message, deployment.line_of(lines, where)))

    deployment.convert_fields(found.common, CommonSettings, ("common",), problem, skip=deployment.OWN_SETTINGS)
    for entry in found.services:
        cls = settings_class(entry.spec)
        deployment.convert_fields(entry.settings, cls, (entry.name,), problem, skip=deployment.OWN_SETTINGS)
    for i, entry in enumerate(found.workers):
        path_ = ("workers", i)
        cls = settings_class(entry.spec)
        deployment.convert_fields(entry.settings, cls, path_, problem, skip=deployment.OWN_SETTINGS)
        engine = entry.settings.get("engine")
        names = tuple(n for n in _engines(entry.spec) if n not in deployment.REMOTE_ENGINES)
        if isinstance(engine, str) and engine and engine not in deployment.REMOTE_ENGINES and engine not in names:
            problem((*path_, "engine"), f"unknown {entry.kind} engine {engine!r}"
                                        f"{deployment.suggest(engine, list(names))}; choose one of {', '.join(names)}")
    for i, model in enumerate(found.models):
        if model.kind not in deployment.WORKERS:
            continue
        names = (*_engines(deployment.WORKERS[model.kind]), *deployment.REMOTE_ENGINES)
        if model.engine not in names:
            problem(("models", i, "engine"), f"unknown engine {model.engine!r}"
                                             f"{deployment.suggest(model.engine, list(names))}; choose one of "
                                             f"{', '.join(names)}")
    problems.sort(key=lambda p: (p.line or 10**9, p.warning))
    return found, problems


def settings_class(spec: deployment.Spec) -> type[Any]:
    module, _, name = spec.settings.partition(":")
    cls: type[Any] = getattr(importlib.import_module(module), name)
    return cls


def _engines(spec: deployment.Spec) -> tuple[str, ...]:
    if not spec.engines:
        return ()
    module, _, name = spec.engines.partition(":")
    return tuple(getattr(importlib.import_module(module), name))


def checked(path: str | Path) -> Deployment:
    """The deployment in `path`, or DeploymentError with every error (warnings are printed)."""
    found, problems = check(path)
    errors = [p for p in problems if not p.warning]
    for p in problems:
        if p.warning:
            print(p.render(str(path)), file=sys.stderr)
    if errors or found is None:
        raise deployment.DeploymentError(str(path), errors)
    return found


def _check_command(path: str) -> int:
    try:
        found, problems = check(path)
    except FileNotFoundError:
        print(f"{path}: no such file", file=sys.stderr)
        return 2
    for p in problems:
        print(p.render(path), file=sys.stderr)
    errors = [p for p in problems if not p.warning]
    if errors or found is None:
        print(f"{path}: {len(errors)} error{'s' * (len(errors) != 1)}", file=sys.stderr)
        return 1
    print(f"{path}: ok")
    print(summary(found))
    return 0


def summary(d: Deployment) -> str:
    """What the deployment runs, one line per service or worker."""
    infra = [f"nats {d.nats.url or 'embedded'}" + (f" (JetStream R{d.nats.replicas})" if d.nats.replicas > 1 else ""),
             f"postgres {d.postgres.url or 'embedded'}", f"redis {d.redis.url or 'embedded'}"]
    lines = ["  " + ", ".join(infra), f"  data dir {d.data_dir}"]
    for entry in (*d.services, *d.workers):
        if not entry.replicas:
            continue
        what = " ".join(f"{k}={entry.settings[k]}" for k in ("model", "version", "engine", "port")
                        if k in entry.settings)
        lines.append(f"  {entry.name:<16} x{entry.replicas}  {entry.spec.module:<24} {what}".rstrip())
    for m in d.models:
        lines.append(f"  model {m.model} {m.version} ({m.engine}{', deployed' if m.deploy else ''})")
    return "\n".join(lines)


def _load_or_default(path: str | None) -> Deployment | None:
    if not path:
        return deployment.default()
    try:
        return checked(path)
    except deployment.DeploymentError as exc:
        print(exc, file=sys.stderr)
        return None


# ---- NATS: identities and the cluster's auth.conf ----------------------------------------------------------------


def credentials_dir(d: Deployment) -> Path:
    return Path(d.nats.credentials_dir or Path(d.data_dir) / "secrets").resolve()


def nats_auth(secrets_: Secrets) -> str:
    """The accounts, role users and auth callout of `server_config`, without its listener: a node's include."""
    listen, rest = server_config(secrets_).split("\n", 1)
    assert listen.startswith("listen:"), listen
    return "# Generated by `inferbus config secrets`: accounts, role users, auth callout. Keep it 0600.\n" + rest


def route_password(secrets_: Secrets) -> str:
    """The cluster routes' shared secret, made once beside the other identities (nats-route.json).

    A letter, then hex: cluster.conf takes it as `$NATS_ROUTE_PASSWORD`, and nats-server parses a variable's value
    as a config value, so one that starts like a number or a date ("-z...", "123-z...", shapes `token_urlsafe` can
    make) stopped the server with a parse error (a test cluster failed to start that way)."""
    path = secrets_.credentials("route")
    if not path.exists():
        _private(path, json.dumps({"user": "route", "password": new_route_password()}))
    return str(json.loads(path.read_text())["password"])


def new_route_password() -> str:
    return "r" + secrets.token_hex(24)


def write_secrets(d: Deployment) -> list[str]:
    """Make what is missing of the deployment's generated secrets (0600, in a 0700 directory); their names."""
    from services.gateway.auth import new_key
    from services.registry.vault import KEY_FILE

    root = credentials_dir(d)
    before = set(p.name for p in root.iterdir()) if root.is_dir() else set()
    secrets_ = Secrets(root).ensure()
    route_password(secrets_)
    _private(root / "auth.conf", nats_auth(secrets_))  # follows the identities: rewritten every time
    if not (root / "admin-key").exists():
        _private(root / "admin-key", new_key())
    if not (root / KEY_FILE).exists():
        _private(root / KEY_FILE, base64.b64encode(secrets.token_bytes(32)).decode())
    return sorted(p.name for p in root.iterdir() if p.name not in before)


def _private(path: Path, text: str) -> None:
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(text)


# ---- JetStream: the platform's streams, KV buckets and object stores ---------------------------------------------


async def _assets(js: bus.JetStreamContext) -> None:
    """Every stream, KV bucket and object store the platform uses, made by the function its service calls."""
    from services.batch import lifecycle, objects
    from services.batch.main import BatchSettings
    from services.gateway.audio_routes import MEDIA_TTL_S
    from services.metering import deadletters
    from services.registry.controller import Lease
    from services.registry.main import RegistrySettings
    from services.runtime import breakers, requestlog, routing, usage

    await usage.ensure_stream(js)
    await deadletters.ensure_stream(js)
    await requestlog.ensure_stream(js)
    await routing.routing_bucket(js)
    await breakers.breaker_bucket(js)
    await Lease("inferbus-config", RegistrySettings().leader_lease_s).open(js)
    await lifecycle.ensure_stream(js, BatchSettings().stream_max_age_s)
    await objects.Objects(js).ensure()
    from contracts.speech import MEDIA_BUCKET

    try:
        await js.object_store(MEDIA_BUCKET)
    except bus.js_errors.BucketNotFoundError:  # as the gateway creates it on the first large upload
        await js.create_object_store(MEDIA_BUCKET, bus.ObjectStoreConfig(
            description="InferBus media too large to send inline", ttl=MEDIA_TTL_S))


def _with_replicas(js: bus.JetStreamContext, replicas: int) -> bus.JetStreamContext:
    """`js` whose stream creations (KV buckets and object stores are streams too) ask for `replicas`."""
    create: Callable[..., Awaitable[Any]] = js.add_stream

    async def add_stream(config: Any = None, **params: Any) -> Any:
        return await create(config, **{**params, "num_replicas": replicas})

    js.add_stream = add_stream  # type: ignore[method-assign]
    return js


async def provision(nc: bus.Connection, replicas: int, say: Say = print) -> dict[str, int]:
    """Create the platform's JetStream assets with `replicas`, scale up existing streams; stream -> replicas."""
    js = _with_replicas(nc.jetstream(), replicas)
    await _assets(js)
    out: dict[str, int] = {}
    for info in await js.streams_info():
        config = info.config
        assert config.name is not None
        have = config.num_replicas or 1
        if have < replicas:
            say(f"scaling stream {config.name} from {have} to {replicas} replicas")
            await js.update_stream(config.evolve(num_replicas=replicas))
            have = replicas
        out[config.name] = have
    return out


async def _streams_command(d: Deployment, replicas: int | None) -> int:
    identity = bus.Identity(str(credentials_dir(d) / "nats-operator.json"), tls_ca=d.nats.tls_ca,
                            tls_cert=d.nats.tls_cert, tls_key=d.nats.tls_key)
    nc = await _connect(d, identity)
    if nc is None:
        return 2
    try:
        result = await provision(nc, replicas or d.nats.replicas)
    finally:
        await nc.close()
    for name, have in sorted(result.items()):
        print(f"  {name:<28} R{have}")
    return 0


# ---- the file's models -------------------------------------------------------------------------------------------


async def _models_command(d: Deployment, wait_s: float) -> int:
    """What `inferbus up` does once its registry answers, for deployments whose processes run on their own."""
    from services.cli import up

    try:
        values = up.model_secrets(d)
    except (ValueError, OSError) as exc:
        print(f"{d.source}: {exc}", file=sys.stderr)
        return 1
    identity = bus.Identity(str(credentials_dir(d) / "nats-admin.json"), tls_ca=d.nats.tls_ca,
                            tls_cert=d.nats.tls_cert, tls_key=d.nats.tls_key)
    nc = await _connect(d, identity)
    if nc is None:
        return 2
    try:
        await up.register_models(nc, d, values, wait_s)
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        await nc.close()
    return 0


async def _connect(d: Deployment, identity: bus.Identity) -> bus.Connection | None:
    url = d.nats.url
    if not url:
        from services.cli import state

        url = state.nats_url()
    try:
        return await bus.connect(url.split(",")[0], "inferbus-config", connect_timeout=5, identity=identity,
                                 reconnect=False)
    except Exception as exc:
        print(f"cannot reach NATS at {url}: {exc}", file=sys.stderr)
        return None
