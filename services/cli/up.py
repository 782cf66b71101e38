"""`inferbus up`: embedded servers, every service as a supervised process, one banner when ready."""

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

from services.cli import state
from services.gateway.auth import new_key
from services.runtime import bus
from services.runtime.embedded import Embedded, NatsServer, PostgresServer, RedisServer, free_port
from services.runtime.local import SECRETS_ENV, with_identity
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


async def _wait_ready(gateway_url: str, nats_url: str, limit_s: float, identity: bus.Identity) -> None:
    deadline = time.monotonic() + limit_s
    nc = await bus.connect(nats_url, "inferbus-up", identity=identity)
    last = ""
    try:
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                waiting = []
                try:
                    async with http.get(gateway_url + "/readyz") as resp:
                        if resp.status != 200:
                            waiting.append("gateway")
                except aiohttp.ClientError:
                    waiting.append("gateway")
                for name in ("registry", "router", "metering"):
                    if not await bus.discover(nc, "PING", f"inferbus-{name}", wait=0.1):
                        waiting.append(name)
                for kind in ("llm", "asr", "tts"):
                    workers = await bus.service_stats(nc, f"inferbus-{kind}", wait=0.3)
                    if not any(w.get("ready") for w in workers):
                        waiting.append(f"{kind} worker (loading model)")
                if not waiting:
                    return
                now = "waiting for " + ", ".join(waiting)
                if now != last:
                    say(now)
                    last = now
                await asyncio.sleep(0.5)
    finally:
        await nc.close()
    raise TimeoutError(f"the platform was not ready after {limit_s:.0f}s")


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


async def up(port: int | None, ready_timeout: float, rotate_admin_key: bool = False) -> int:
    data = state.data_dir()
    data.mkdir(parents=True, exist_ok=True)
    data.chmod(0o755)
    servers: list[Embedded] = []
    supervisor = EmbeddedSupervisor(servers)
    secrets_dir: Path | None = None
    urls: dict[str, str] = {}
    services: list[Supervised] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for var, cls in (("NATS", NatsServer), ("DATABASE", PostgresServer), ("REDIS", RedisServer)):
            configured = os.environ.get(f"INFERBUS_{var}_URL")
            if configured:
                urls[var] = configured
                say(f"using configured {var.lower()} at {configured}")
                continue
            server: Embedded = cls(data)
            say(f"starting embedded {server.name} ...")
            urls[var] = await asyncio.to_thread(server.start)
            servers.append(server)
            if isinstance(server, NatsServer) and server.secure:
                secrets_dir = server.secrets.root
                say(f"nats secured: one identity per service, API keys for clients (secrets in {secrets_dir})")
            say(f"{server.name} ready at {urls[var]}")
        tasks.append(asyncio.create_task(supervisor.run()))

        gateway_port = port or int(os.environ.get("INFERBUS_GATEWAY_PORT", "0") or 0)
        if not gateway_port:
            gateway_port = 8080 if _port_free(8080) else free_port()
        key, previous_key = admin_key(data, rotate_admin_key)
        if previous_key:
            say("admin key rotated: the previous one is revoked")
        gateway_url = f"http://127.0.0.1:{gateway_port}"
        env = {
            **os.environ,
            "INFERBUS_NATS_URL": urls["NATS"],
            "INFERBUS_DATABASE_URL": urls["DATABASE"],
            "INFERBUS_REDIS_URL": urls["REDIS"],
            "PYTHONUNBUFFERED": "1",
            "INFERBUS_DATA_DIR": str(data),
            **({SECRETS_ENV: str(secrets_dir)} if secrets_dir else {}),
        }
        env.pop("INFERBUS_PORT", None)
        plain = {k: v for k, v in env.items() if k != "INFERBUS_ADMIN_KEY"}
        gateway_env = {**env, "INFERBUS_PORT": str(gateway_port), "INFERBUS_ADMIN_KEY": key}
        if previous_key:
            gateway_env["INFERBUS_ADMIN_KEY_PREVIOUS"] = previous_key
        services = [
            Supervised("registry", "services.registry", plain),
            Supervised("router", "services.router", plain),
            Supervised("metering", "services.metering", plain),
            Supervised("gateway", "services.gateway", gateway_env),
            Supervised("llm", "services.llm", plain),
            Supervised("providers", "services.llm.providers", plain),  # remote provider versions
            Supervised("asr", "services.speech.asr", plain),
            Supervised("tts", "services.speech.tts", plain),
        ]
        for s in services:  # each service its own NATS identity (services.runtime.natsauth)
            s.env = with_identity(s.module, s.env)
        tasks += [asyncio.create_task(s.run()) for s in services]
        identity = (bus.Identity(str(Secrets(secrets_dir).credentials("admin"))) if secrets_dir
                    else bus.Identity.from_env())
        state.state_file().write_text(json.dumps(
            {"pid": os.getpid(), "nats_url": urls["NATS"], "gateway_url": gateway_url,
             "nats_credentials": identity.credentials}, indent=2))

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        ready = asyncio.create_task(_wait_ready(gateway_url, urls["NATS"], ready_timeout, identity))
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([ready, stopper], return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            ready.result()
            _banner(gateway_url, key, data)
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
        for server in reversed(servers):
            await asyncio.to_thread(server.stop)
        state.state_file().unlink(missing_ok=True)
        say("stopped")


def _banner(url: str, key: str, data: Path) -> None:
    print(
        f"""
[inferbus] ready
  gateway    {url}   (OpenAI-compatible: {url}/v1)
  playground {url}/playground   (asks for the key; or open {url}/playground#key=<admin key>)
  admin key  {key}
  data dir   {data}

  try:  curl -N {url}/v1/chat/completions -H "Authorization: Bearer {key}" \\
          -H "Content-Type: application/json" \\
          -d '{{"model": "smollm2-135m-instruct", "stream": true,
               "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}'
        inferbus models list
""",
        flush=True,
    )


def run(args: Any) -> int:
    return asyncio.run(up(args.port, args.ready_timeout, getattr(args, "rotate_admin_key", False)))
