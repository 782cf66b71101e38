"""`inferbus up`: the servers and services a deployment names, each a supervised process; one banner when ready.

Without `--config` it runs today's defaults on this machine (embedded NATS, PostgreSQL and Redis; every default
service and worker). With a deployment file (services/runtime/deployment.py) it runs what the file says: which
services and workers, how many of each, which models and engines, which servers. `inferbus run NAME --config
FILE` starts one process of the same file on its own (systemd units and containers use it).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from contracts import subjects
from contracts.control import Reply
from contracts.registry import Deploy, RegisterVersion
from services.cli import config
from services.gateway.auth import new_key
from services.runtime import bus, deployment
from services.runtime.deployment import Deployment, Process
from services.runtime.embedded import Embedded, NatsServer, PostgresServer, RedisServer, free_port
from services.runtime.local import SECRETS_ENV, settings_env, with_identity
from services.runtime.logging import redact
from services.runtime.natsauth import Secrets

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Children get SIGTERM if `up` itself dies, so no process is left behind even on SIGKILL."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def say(line: str) -> None:
    print(f"[inferbus] {redact(line)}", flush=True)  # configured URLs may carry passwords


class Supervised:
    def __init__(self, name: str, module: str, env: dict[str, str]) -> None:
        self.name = name
        self.module = module
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.stopping = False
        self.restarts = 0

    async def run(self) -> None:
        backoff = 1.0
        while not self.stopping:
            started = time.monotonic()
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", self.module, env=self.env, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent,
            )
            assert self.proc.stdout is not None
            pump = asyncio.create_task(self._pump(self.proc.stdout))
            code = await self.proc.wait()
            await pump
            if self.stopping:
                return
            backoff = 1.0 if time.monotonic() - started > 60 else min(backoff * 2, 30.0)
            self.restarts += 1
            say(f"{self.name} exited with code {code}; restarting in {backoff:.0f}s (restart #{self.restarts})")
            await asyncio.sleep(backoff)

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            print(f"[{self.name}] {_pretty(line)}", flush=True)

    async def stop(self, grace: float = 15.0) -> None:
        self.stopping = True
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def _pretty(line: str) -> str:
    try:
        event = json.loads(line)
    except ValueError:
        return line
    if not isinstance(event, dict):
        return line
    head = f"{event.pop('level', 'info'):5} {event.pop('event', '')}"
    event.pop("timestamp", None)
    event.pop("service", None)
    rest = " ".join(f"{k}={v}" for k, v in event.items())
    return f"{head} {rest}".rstrip()


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# ---- each process's environment ----------------------------------------------------------------------------------


class Servers(msgspec.Struct, kw_only=True):
    """Where the platform's servers are, as every process is told."""

    nats: str
    database: str
    redis: str
    secrets_dir: str = ""  # generated NATS identities: each process gets its role's


def base_env(d: Deployment) -> dict[str, str]:
    """This process's environment for the children, without a settings file that is this deployment file."""
    env = dict(os.environ)
    if d.source and env.get("INFERBUS_CONFIG") and Path(env["INFERBUS_CONFIG"]).resolve() == Path(d.source).resolve():
        env.pop("INFERBUS_CONFIG")
    env.pop("INFERBUS_PORT", None)
    return env


def process_env(
    d: Deployment, proc: Process, base: dict[str, str], servers: Servers, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """`proc`'s environment: the servers, the data dir, its role's NATS identity and its settings."""
    env = {
        **base,
        # One server: the bus seam takes one URL (nats-py learns the rest of the cluster from it and moves there).
        "INFERBUS_NATS_URL": first_url(servers.nats),
        "INFERBUS_DATABASE_URL": servers.database,
        "INFERBUS_REDIS_URL": servers.redis,
        "PYTHONUNBUFFERED": "1",
        "INFERBUS_DATA_DIR": str(Path(d.data_dir).resolve()),
        **({SECRETS_ENV: servers.secrets_dir} if servers.secrets_dir else {}),
        **({"INFERBUS_NATS_TLS_CA": d.nats.tls_ca} if d.nats.tls_ca else {}),
        **({"INFERBUS_NATS_TLS_CERT": d.nats.tls_cert, "INFERBUS_NATS_TLS_KEY": d.nats.tls_key}
           if d.nats.tls_cert else {}),
        **settings_env(**proc.settings),
        **(extra or {}),
    }
    if proc.group != "gateway":
        env.pop("INFERBUS_ADMIN_KEY", None)
    return with_identity(proc.module, env)  # each service its own NATS identity (services.runtime.natsauth)


def catalogue_env(d: Deployment, proc: Process) -> dict[str, str]:
    """The file's worker models as the registry's seed and the gateway's fallback list (unless the file sets them)."""
    seed = registry_seed(d)
    if proc.group == "registry" and "seed" not in proc.settings:
        return {"INFERBUS_SEED": json.dumps(seed)}
    if proc.group == "gateway" and "models" not in proc.settings:
        return {"INFERBUS_MODELS": json.dumps([{"name": s["model"], "version": s["version"], "kind": s["kind"]}
                                               for s in seed])}
    return {}


def registry_seed(d: Deployment) -> list[dict[str, str]]:
    """The models of the file's workers, registered and deployed by the registry at its first start."""
    seed: dict[tuple[str, str], dict[str, str]] = {}
    for entry in d.workers:
        defaults = {f.name: f.default for f in msgspec.structs.fields(config.settings_class(entry.spec))}
        row = {k: str(entry.settings.get(k) or defaults.get(k) or "") for k in ("model", "version", "engine")}
        seed.setdefault((row["model"], row["version"]), {**row, "engine": row["engine"] or "auto", "kind": entry.kind})
    return list(seed.values())


# ---- servers -----------------------------------------------------------------------------------------------------


class EmbeddedSupervisor:
    """Restarts an embedded server that died, on its own port, so services reconnect to it."""

    def __init__(self, servers: list[Embedded]) -> None:
        self.servers = servers
        self.stopping = False

    async def run(self) -> None:
        while not self.stopping:
            await asyncio.sleep(0.5)
            for server in self.servers:
                if self.stopping or server.proc is None or server.proc.poll() is None:
                    continue
                code = server.proc.returncode
                say(f"embedded {server.name} exited with code {code}; restarting it")
                port = int(server.url.rsplit(":", 1)[1].split("/", 1)[0])
                try:
                    await asyncio.to_thread(server.start, port)
                    say(f"{server.name} restarted at {server.url}")
                except Exception as exc:  # try again on the next round
                    say(f"restarting {server.name} failed: {exc}")


async def start_servers(d: Deployment, data: Path, started: list[Embedded]) -> Servers:
    """The deployment's servers: the ones it names (or INFERBUS_*_URL names), else embedded ones started now."""
    urls: dict[str, str] = {}
    secrets_dir = ""
    configured = {"NATS": d.nats.url, "DATABASE": d.postgres.url, "REDIS": d.redis.url}
    for var, cls in (("NATS", NatsServer), ("DATABASE", PostgresServer), ("REDIS", RedisServer)):
        url = configured[var] or os.environ.get(f"INFERBUS_{var}_URL", "")
        if url:
            urls[var] = url
            say(f"using configured {var.lower()} at {url}")
            continue
        server: Embedded = NatsServer(data, tls=d.nats.tls or None) if cls is NatsServer else cls(data)
        say(f"starting embedded {server.name} ...")
        urls[var] = await asyncio.to_thread(server.start)
        started.append(server)
        if isinstance(server, NatsServer) and server.secure:
            secrets_dir = str(server.secrets.root)
            say(f"nats secured: one identity per service, API keys for clients (secrets in {secrets_dir})")
        say(f"{server.name} ready at {urls[var]}")
    if not secrets_dir and (d.nats.credentials_dir or (d.source and d.nats.url)):
        secrets_dir = str(config.credentials_dir(d))  # an external server's generated identities
    if not secrets_dir and os.environ.get(SECRETS_ENV):
        secrets_dir = os.environ[SECRETS_ENV]
    return Servers(nats=urls["NATS"], database=urls["DATABASE"], redis=urls["REDIS"], secrets_dir=secrets_dir)


def identity(servers: Servers, d: Deployment, role: str = "admin") -> bus.Identity:
    if servers.secrets_dir:
        tls_ca = d.nats.tls_ca or (str(Path(servers.secrets_dir) / "tls-ca.pem") if d.nats.tls else "")
        return bus.Identity(str(Secrets(Path(servers.secrets_dir)).credentials(role)), tls_ca=tls_ca,
                            tls_cert=d.nats.tls_cert, tls_key=d.nats.tls_key)
    return bus.Identity.from_env()


def first_url(url: str) -> str:
    """The first of a comma-separated server list (the client learns the rest of the cluster from it)."""
    return url.split(",")[0].strip()


# ---- readiness and the file's models -----------------------------------------------------------------------------


async def _wait_ready(
    procs: list[Process], gateway_urls: list[str], nc: bus.Connection, limit_s: float, models: Any = None
) -> None:
    deadline = time.monotonic() + limit_s
    last = ""
    services = sorted({p.group for p in procs if not p.kind and p.group != "gateway"},
                      key=list(deployment.SERVICES).index)
    workers = {p.group: p for p in procs if p.kind}
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            waiting = []
            for url in gateway_urls:
                try:
                    async with http.get(url + "/readyz") as resp:
                        if resp.status != 200:
                            waiting.append("gateway")
                except aiohttp.ClientError:
                    waiting.append("gateway")
            for name in services:
                if not await bus.discover(nc, "PING", f"inferbus-{name}", wait=0.1):
                    waiting.append(name)
            if models is not None and "registry" not in waiting and not models.done():
                waiting.append("registering models")
            stats: dict[str, list[dict[str, Any]]] = {}
            for group, proc in workers.items():
                if proc.kind not in stats:
                    stats[proc.kind] = await bus.service_stats(nc, f"inferbus-{proc.kind}", wait=0.3)
                model = proc.settings.get("model")
                if not any(w.get("ready") and (model is None or w.get("model") == model) for w in stats[proc.kind]):
                    waiting.append(f"{group} worker (loading model)")
            if not waiting:
                return
            now = "waiting for " + ", ".join(dict.fromkeys(waiting))
            if now != last:
                say(now)
                last = now
            await asyncio.sleep(0.5)
    raise TimeoutError(f"the platform was not ready after {limit_s:.0f}s")


def model_secrets(d: Deployment) -> list[dict[str, str]]:
    """The [[models]] secrets' values (from the environment or files), in order; ValueError names a missing one."""
    from services.cli.models import secret_value

    return [dict(secret_value(f"{name}={ref}") for name, ref in m.secrets.items()) for m in d.models]


async def register_models(nc: bus.Connection, d: Deployment, values: list[dict[str, str]], limit_s: float) -> None:
    """Register the file's [[models]] (remote provider versions, ...) and deploy the new ones as stable."""
    deadline = time.monotonic() + limit_s
    while not await bus.discover(nc, "PING", "inferbus-registry", wait=0.2):
        if time.monotonic() > deadline:
            raise TimeoutError("the registry did not answer")
    for m, secrets in zip(d.models, values, strict=True):
        register = RegisterVersion(model=m.model, version=m.version, engine=m.engine, kind=m.kind,
                                   description=m.description, params=m.params, secrets=secrets, actor="inferbus-up")
        reply = await _admin(nc, "register", register)
        if reply.error is not None and "already registered" in reply.error.message:
            say(f"model {m.model} {m.version} is registered already: left as it is")
            continue
        if reply.error is not None:
            raise RuntimeError(f"registering {m.model} {m.version}: {reply.error.message}")
        say(f"registered model {m.model} {m.version} ({m.engine})")
        if m.deploy:
            reply = await _admin(nc, "deploy", Deploy(model=m.model, version=m.version, actor="inferbus-up"))
            if reply.error is not None:
                raise RuntimeError(f"deploying {m.model} {m.version}: {reply.error.message}")


async def _admin(nc: bus.Connection, op: str, body: msgspec.Struct) -> Reply:
    msg = await nc.request(subjects.registry_admin(op), msgspec.json.encode(body), timeout=10)
    return msgspec.json.decode(msg.data, type=Reply)


def admin_key(data: Path, rotate: bool) -> tuple[str, str | None]:
    """The operator's admin key, kept in the data dir (0600) across runs; (key, the one it replaced)."""
    configured = os.environ.get("INFERBUS_ADMIN_KEY")
    if configured:
        return configured, None
    path = data / "secrets" / "admin-key"
    previous = path.read_text().strip() if path.exists() else None
    if previous and not rotate:
        return previous, None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    key = new_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
    return key, previous


def _gateway_ports(procs: list[Process], port: int | None) -> None:
    """Gateways without a port in the file: --port, INFERBUS_GATEWAY_PORT, 8080 if free, else a free one."""
    first = True
    for proc in procs:
        if proc.group != "gateway" or proc.settings.get("port"):
            continue
        chosen = (port or int(os.environ.get("INFERBUS_GATEWAY_PORT", "0") or 0)) if first else 0
        if not chosen:
            chosen = 8080 if first and _port_free(8080) else free_port()
        proc.settings["port"] = chosen
        first = False


def _data_dir(d: Deployment) -> Path:
    data = Path(d.data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    data.chmod(0o755)
    return data


def _url(proc: Process) -> str:
    host = str(proc.settings.get("host") or "127.0.0.1")
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{proc.settings['port']}"


# ---- up ----------------------------------------------------------------------------------------------------------


async def up(
    port: int | None, ready_timeout: float, rotate_admin_key: bool = False, config_file: str | None = None
) -> int:
    d = config.checked(config_file) if config_file else deployment.default()
    shared = [k for k in ("port", "metrics_port") if d.common.get(k)]
    if shared and len(d.processes()) > 1:
        raise deployment.DeploymentError(d.source, [deployment.Problem(
            ("common", shared[0]), "gives every process the same port: right for `inferbus run` (one process per "
            "host or container), not for `inferbus up`; set it per service")])
    try:
        secrets = model_secrets(d)
    except (ValueError, OSError) as exc:
        raise deployment.DeploymentError(d.source, [deployment.Problem(("models",), str(exc))]) from exc
    data = _data_dir(d)
    if config_file:
        say(f"deployment {config_file}:\n{config.summary(d)}")
    embedded: list[Embedded] = []
    supervisor = EmbeddedSupervisor(embedded)
    services: list[Supervised] = []
    tasks: list[asyncio.Task[Any]] = []
    state_file = data / "run.json"
    nc: bus.Connection | None = None
    try:
        servers = await start_servers(d, data, embedded)
        tasks.append(asyncio.create_task(supervisor.run()))
        admin = identity(servers, d)
        nc = await bus.connect(first_url(servers.nats), "inferbus-up", identity=admin)
        if d.nats.replicas > 1:
            say(f"JetStream: streams, KV buckets and object stores with {d.nats.replicas} replicas")
            operator = await bus.connect(first_url(servers.nats), "inferbus-up", identity=identity(
                servers, d, "operator"), reconnect=False)
            try:
                await config.provision(operator, d.nats.replicas, say)
            finally:
                await operator.close()

        procs = d.processes()
        _gateway_ports(procs, port)
        gateways = [p for p in procs if p.group == "gateway"]
        key, previous_key = admin_key(data, rotate_admin_key) if gateways else ("", None)
        if previous_key:
            say("admin key rotated: the previous one is revoked")
        base = base_env(d)
        for proc in procs:
            extra = catalogue_env(d, proc) if config_file else {}
            if proc.group == "gateway":
                extra |= {"INFERBUS_ADMIN_KEY": key, **({"INFERBUS_ADMIN_KEY_PREVIOUS": previous_key}
                                                        if previous_key else {})}
            services.append(Supervised(proc.name, proc.module, process_env(d, proc, base, servers, extra)))
        tasks += [asyncio.create_task(s.run()) for s in services]
        gateway_urls = [_url(p) for p in gateways]
        state_file.write_text(json.dumps(
            {"pid": os.getpid(), "nats_url": first_url(servers.nats),
             "gateway_url": gateway_urls[0] if gateway_urls else None, "gateway_urls": gateway_urls,
             "nats_credentials": admin.credentials}, indent=2))

        models = asyncio.create_task(register_models(nc, d, secrets, ready_timeout)) if d.models else None
        if models is not None:
            tasks.append(models)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        ready = asyncio.create_task(_wait_ready(procs, gateway_urls, nc, ready_timeout, models))
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([ready, stopper], return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            ready.result()
            if models is not None:
                await models
            llm = [s["model"] for s in registry_seed(d) if s["kind"] == "llm"] if config_file else []
            _banner(gateway_urls, key, data, procs, llm[0] if llm else "smollm2-135m-instruct")
            await stop.wait()
        else:
            ready.cancel()
        say("stopping ...")
        return 0
    finally:
        supervisor.stopping = True
        for s in services:
            await s.stop()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if nc is not None:
            await nc.close()
        for server in reversed(embedded):
            await asyncio.to_thread(server.stop)
        state_file.unlink(missing_ok=True)
        say("stopped")


def _banner(urls: list[str], key: str, data: Path, procs: list[Process], model: str) -> None:
    if not urls:
        print(f"\n[inferbus] ready: {', '.join(p.name for p in procs)}\n  data dir   {data}\n", flush=True)
        return
    url = urls[0]
    more = "".join(f"\n  gateway    {u}" for u in urls[1:])
    print(
        f"""
[inferbus] ready
  gateway    {url}   (OpenAI-compatible: {url}/v1){more}
  playground {url}/playground   (asks for the key; or open {url}/playground#key=<admin key>)
  admin key  {key}
  data dir   {data}

  try:  curl -N {url}/v1/chat/completions -H "Authorization: Bearer {key}" \\
          -H "Content-Type: application/json" \\
          -d '{{"model": "{model}", "stream": true,
               "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}'
        inferbus models list
""",
        flush=True,
    )


def run(args: Any) -> int:
    try:
        return asyncio.run(up(args.port, args.ready_timeout, getattr(args, "rotate_admin_key", False),
                              getattr(args, "config", None)))
    except deployment.DeploymentError as exc:
        print(exc, file=sys.stderr)
        return 1


# ---- one process on its own: `inferbus run NAME --config FILE` ---------------------------------------------------


def run_one(name: str, config_file: str) -> int:
    """Replace this process with the deployment's process `name` (a service or worker, or `<name>-<n>`)."""
    try:
        d = config.checked(config_file)
    except deployment.DeploymentError as exc:
        print(exc, file=sys.stderr)
        return 1
    procs = d.processes()
    proc = next((p for p in procs if p.name == name), None) or next((p for p in procs if p.group == name), None)
    if proc is None:
        entry = d.entry(name)
        if entry is None:
            names = [p.name for p in procs]
            print(f"{config_file} has no process {name!r}; it has: {', '.join(names) or 'none'}", file=sys.stderr)
            return 2
        proc = Process(entry.name, entry.name, entry.spec.module, {**d.common, **entry.settings}, entry.kind)
    missing = [t for t, url, var in (("[nats] url", d.nats.url, "NATS"), ("[postgres] url", d.postgres.url,
                                     "DATABASE"), ("[redis] url", d.redis.url, "REDIS"))
               if not url and not os.environ.get(f"INFERBUS_{var}_URL")]
    if missing:
        print(f"{config_file}: a process started alone needs its servers: set {', '.join(missing)}", file=sys.stderr)
        return 2
    servers = Servers(nats=d.nats.url or os.environ["INFERBUS_NATS_URL"],
                      database=d.postgres.url or os.environ["INFERBUS_DATABASE_URL"],
                      redis=d.redis.url or os.environ["INFERBUS_REDIS_URL"],
                      secrets_dir=str(config.credentials_dir(d)) if config.credentials_dir(d).is_dir() else "")
    extra = catalogue_env(d, proc)
    if proc.group == "gateway":
        key_file = config.credentials_dir(d) / "admin-key"  # `inferbus config secrets` made it
        if "INFERBUS_ADMIN_KEY" not in os.environ and key_file.exists():
            extra["INFERBUS_ADMIN_KEY"] = key_file.read_text().strip()
        proc.settings.setdefault("port", 8080)
    env = process_env(d, proc, base_env(d), servers, extra)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", proc.module], env)
    return 0  # not reached
