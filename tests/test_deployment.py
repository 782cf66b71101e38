"""The deployment file: `inferbus config check` (every error, with its line), the examples, `up --config`, `run`."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import psutil
import pytest

from services.cli import config
from services.runtime import bus, deployment
from services.runtime.embedded import free_port
from services.runtime.local import EmbeddedStack, wait_http, wait_service
from services.runtime.natsauth import Secrets
from tests.conftest import stack_in_tempdir

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "infra" / "examples").glob("*.toml"))
CLI = [sys.executable, "-m", "services.cli.main"]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)


def write(folder: Path, text: str, name: str = "inferbus.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_examples_pass_the_check() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {"laptop-llm", "llm-speech", "remote-only", "benchmark", "cluster"} <= names
    for path in EXAMPLES:
        found, problems = config.check(path)
        assert found is not None and [p for p in problems if not p.warning] == [], (path, problems)
    laptop = config.checked(ROOT / "infra/examples/laptop-llm.toml")
    assert [p.name for p in laptop.processes()] == ["registry", "router", "metering", "gateway", "llm"]
    speech = config.checked(ROOT / "infra/examples/llm-speech.toml")
    assert [p.name for p in speech.processes() if p.kind] == ["llm-1", "llm-2", "asr", "tts"]
    remote = config.checked(ROOT / "infra/examples/remote-only.toml")
    assert not [p for p in remote.processes() if p.kind] and {m.engine for m in remote.models} == {"openai",
                                                                                                     "anthropic"}
    assert [p.settings["port"] for p in remote.processes() if p.group == "gateway"] == [8080, 8081]
    cluster = config.checked(ROOT / "infra/examples/cluster.toml")
    assert cluster.nats.replicas == 3 and len(cluster.nats.url.split(",")) == 3


BROKEN = """\
data_dir = "/tmp/x"
colour = "blue"

[nats]
url = "http://nats:4222"
replicas = 3

[gateway]
replicas = 2
port = 8080
dispach = "p2c"
rate_limit_failure = "maybe"
database_url = "postgresql://db/x"

[[workers]]
kind = "llm"
model = "smollm2.135m"
engine = "llamacp"
metrics_port = 8081

[[workers]]
kind = "lm"

[[workers]]
kind = "asr"
replicas = -1

[[models]]
model = "gpt"
version = "v1"
engine = "openai"
params = { api_key = "sk-123" }
secrets = { token = "sk-456" }
"""


def test_every_error_is_explained_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, BROKEN)
    result = cli("config", "check", str(path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    expected = [
        (2, "colour: unknown table or key"),
        (5, "nats.url: expected a nats:// or tls:// URL, got 'http://nats:4222'"),
        (11, "gateway.dispach: unknown setting (did you mean `dispatch`?)"),
        (12, "gateway.rate_limit_failure: expected one of 'open', 'closed', got 'maybe'"),
        (13, "gateway.database_url: set this in [postgres] url"),
        (17, "workers[0].model: expected a name without '.'"),
        (18, "workers[0].engine: unknown llm engine 'llamacp' (did you mean `llamacpp`?)"),
        (19, "workers[0].metrics_port: port 8081 of llm is also gateway-2's"),
        (22, "workers[1].kind: expected one of llm, asr, tts, embed, vision, got 'lm'"),
        (26, "workers[2].replicas: expected an integer >= 0"),
        (32, "models[0].params.api_key: looks like a credential"),
        (32, "models[0].params: an openai version needs params.base_url"),
        (33, "models[0].secrets.token: expected \"env:VARIABLE\" or \"@/path/to/file\""),
    ]
    for line, text in expected:
        assert any(f"{path}:{line}: {text}" in out for out in lines), (line, text, result.stderr)
    assert lines[-1] == f"{path}: {len(lines) - 1} errors"


def test_syntax_errors_and_missing_files(tmp_path: Path) -> None:
    path = write(tmp_path, '[gateway]\nport = 8080\nhost = "127.0.0.1\n')
    result = cli("config", "check", str(path))
    assert result.returncode == 1 and f"{path}:3: not valid TOML" in result.stderr
    assert cli("config", "check", str(path.parent / "nope.toml")).returncode == 2


def test_the_defaults_are_todays_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    d = deployment.default()
    names = [p.name for p in d.processes()]
    assert names == ["registry", "router", "metering", "gateway", "providers", "batch", "llm", "asr", "tts", "embed"]
    assert all(not p.settings for p in d.processes())  # every service keeps its own defaults
    monkeypatch.setenv("INFERBUS_UP_VISION", "efficientnet-lite0,ppocr-v4")
    vision = [p for p in deployment.default().processes() if p.kind == "vision"]
    assert [(p.name, p.settings) for p in vision] == [("vision-efficientnet-lite0", {"model": "efficientnet-lite0"}),
                                                       ("vision-ppocr-v4", {"model": "ppocr-v4"})]


def test_replicas_count_ports_up() -> None:
    d, problems = deployment.parse("[gateway]\nreplicas = 3\nport = 9000\nmetrics_port = 9100\n")
    assert d is not None and not problems
    gateways = [p for p in d.processes() if p.group == "gateway"]
    assert [(p.name, p.settings["port"], p.settings["metrics_port"]) for p in gateways] == [
        ("gateway-1", 9000, 9100), ("gateway-2", 9001, 9101), ("gateway-3", 9002, 9102)]


# ---- for real: `inferbus up --config`, `inferbus run` ------------------------------------------------------------


def bench_file(data: Path, gateway_port: int, *, extra: str = "") -> Path:
    """infra/examples/benchmark.toml with its own data dir and ports."""
    text = (ROOT / "infra/examples/benchmark.toml").read_text()
    text = text.replace('data_dir = ".inferbus/bench"', f'data_dir = "{data}"').replace(
        "port = 8090", f"port = {gateway_port}")
    path = data.parent / "inferbus.toml"
    path.write_text(text + extra)
    return path


REMOTE_MODEL = """
[[models]]
model = "upstream-chat"
version = "v1"
engine = "openai"
params = { base_url = "http://127.0.0.1:9/v1", model = "chat" }
secrets = { api_key = "env:INFERBUS_TEST_UPSTREAM_KEY" }
"""


@pytest.mark.slow
async def test_up_with_a_deployment_file() -> None:
    root = Path(tempfile.mkdtemp(prefix="inferbus-up-config-"))  # not tmp_path: PostgreSQL may run as its own user
    port = free_port()
    while not all(_free(p) for p in (port, port + 1)):
        port = free_port()
    path = bench_file(root / "data", port, extra=REMOTE_MODEL)
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERBUS_")}
    secret = "sk-test-" + "q" * 24
    env.update(PYTHONUNBUFFERED="1", INFERBUS_TEST_UPSTREAM_KEY=secret)
    proc = await asyncio.create_subprocess_exec(*CLI, "up", "--config", str(path), env=env, cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    output: list[str] = []
    try:
        async with asyncio.timeout(120):
            while "[inferbus] ready" not in (line := (await proc.stdout.readline()).decode()):
                assert line, "inferbus up exited before ready:\n" + "".join(output)
                output.append(line)
            while not line.strip().startswith("admin key"):
                line = (await proc.stdout.readline()).decode()
                output.append(line)
        key = line.split()[-1]
        text = "".join(output)
        assert "registered model upstream-chat v1 (openai)" in text
        assert f"gateway    http://127.0.0.1:{port + 1}" in text  # the second replica
        assert secret not in text
        headers = {"Authorization": f"Bearer {key}"}
        async with aiohttp.ClientSession() as http:
            for p in (port, port + 1):  # both gateway replicas serve the file's model
                body = {"model": "bench-fast", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
                async with http.post(f"http://127.0.0.1:{p}/v1/chat/completions", json=body, headers=headers) as r:
                    assert r.status == 200, await r.text()
                    assert (await r.json())["usage"]["completion_tokens"] == 4
            async with http.get(f"http://127.0.0.1:{port}/v1/models", headers=headers) as r:
                served = {m["id"] for m in (await r.json())["data"]}
        # Only what the file names: no default SmolLM2, whisper or hibari entries.
        assert served == {"bench-fast", "upstream-chat"}, served
        listing = cli("models", "--json", "list", env={**env, "INFERBUS_DATA_DIR": str(root / "data")})
        assert listing.returncode == 0, listing.stderr
        versions = {(m["name"], v["version"]) for m in json.loads(listing.stdout) for v in m["versions"]}
        assert {("bench-fast", "v1"), ("upstream-chat", "v1")} <= versions and secret not in listing.stdout
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if p.cmdline()[-2:] == ["-m", "services.llm"]]
        assert len(workers) == 2  # replicas = 2 in the file
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            rest = (await proc.stdout.read()).decode()
            assert await proc.wait() == 0, rest
        _, alive = psutil.wait_procs(children, timeout=5)
        assert alive == [] and "[inferbus] stopped" in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def stack() -> Iterator[EmbeddedStack]:
    """Servers of this module's own: what it registers and seeds stays out of the session's registry."""
    with stack_in_tempdir("inferbus-deploy-") as servers:
        yield servers


@pytest.fixture(scope="module")
async def stack_nc(stack: EmbeddedStack) -> AsyncIterator[bus.Connection]:
    conn = await bus.connect(stack.nats_url, "tests", identity=stack.identity())
    yield conn
    await conn.close()


@pytest.fixture(scope="module")
def stack_file(stack: EmbeddedStack) -> Path:
    """A deployment file naming the module's servers and identities: what a node of a real cluster has."""
    port = free_port()
    text = f"""
data_dir = "{stack.root}"

[nats]
url = "{stack.nats_url}"
credentials_dir = "{stack.nats.secrets.root}"

[postgres]
url = "{stack.database_url}"

[redis]
url = "{stack.redis_url}"

[gateway]
port = {port}
governance = false

[[workers]]
kind = "llm"
name = "alone"
model = "run-alone"
version = "v1"
engine = "benchmark"
"""
    path = stack.root / "run-alone.toml"
    path.write_text(text)
    return path


class Run:
    """`inferbus run NAME --config FILE` as a child process, its output in a log file."""

    def __init__(self, name: str, path: Path, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"run-{name}-{os.getpid()}.log"
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen([*CLI, "run", name, "--config", str(path)], env=env, cwd=ROOT,
                                          stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


@pytest.fixture(scope="module")
async def alone(stack: EmbeddedStack, stack_nc: bus.Connection, stack_file: Path) -> AsyncIterator[dict[str, str]]:
    """The file's registry, worker and gateway, each started on its own with `inferbus run NAME --config`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERBUS_")}
    env.update(INFERBUS_ADMIN_KEY="ib-run-alone-" + "z" * 24, PYTHONUNBUFFERED="1")
    started = [Run(name, stack_file, env, stack.root) for name in ("registry", "alone", "gateway")]
    try:
        await wait_service(stack_nc, "inferbus-registry", started[0])  # type: ignore[arg-type]
        gateway = config.checked(stack_file).entry("gateway")
        assert gateway is not None
        url = f"http://127.0.0.1:{gateway.settings['port']}"
        await wait_http(url, started[2])  # type: ignore[arg-type]
        yield {"url": url, "key": env["INFERBUS_ADMIN_KEY"]}
    finally:
        for proc in started:
            proc.stop()


@pytest.mark.slow
async def test_run_starts_one_process_of_the_file(alone: dict[str, str], stack_nc: bus.Connection) -> None:
    deadline = asyncio.get_running_loop().time() + 60
    async with aiohttp.ClientSession() as http:
        while True:  # until the worker has loaded and the registry's seed reached the gateway
            body = {"model": "run-alone", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
            async with http.post(alone["url"] + "/v1/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {alone['key']}"}) as r:
                if r.status == 200:
                    assert (await r.json())["usage"]["completion_tokens"] == 3
                    break
                assert asyncio.get_running_loop().time() < deadline, await r.text()
            await asyncio.sleep(0.2)
    # Each process is the service itself (exec), under its own role's identity.
    stats = await bus.service_stats(stack_nc, "inferbus-llm", wait=0.3)
    assert any(s.get("model") == "run-alone" for s in stats)


def test_run_refuses_what_the_file_does_not_have(stack_file: Path, tmp_path: Path) -> None:
    result = cli("run", "nope", "--config", str(stack_file))
    assert result.returncode == 2 and "has no process 'nope'" in result.stderr and "alone" in result.stderr
    no_servers = write(tmp_path, '[[workers]]\nkind = "llm"\nengine = "benchmark"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERBUS_")}
    result = cli("run", "llm", "--config", str(no_servers), env=env)
    assert result.returncode == 2 and "needs its servers" in result.stderr


def test_config_secrets_makes_them_once(tmp_path: Path) -> None:
    path = write(tmp_path, f'data_dir = "{tmp_path}"\n[nats]\ncredentials_dir = "{tmp_path / "creds"}"\n')
    first = cli("config", "secrets", str(path))
    assert first.returncode == 0, first.stderr
    creds = tmp_path / "creds"
    made = {p.name for p in creds.iterdir()}
    assert {"auth.conf", "admin-key", "provider-secrets.key", "nats-route.json", "nats-gateway.json",
            "nats-operator.json", "callout-issuer.nk"} <= made
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in creds.iterdir()) and creds.stat().st_mode & 0o777 == 0o700
    key = (creds / "admin-key").read_text()
    assert (creds / "auth.conf").read_text() == config.nats_auth(Secrets(creds))
    again = cli("config", "secrets", str(path))
    assert again.returncode == 0 and "all there already" in again.stdout
    assert (creds / "admin-key").read_text() == key  # kept: made once


def test_config_streams_creates_the_platforms_streams(stack_file: Path) -> None:
    result = cli("config", "streams", str(stack_file))
    assert result.returncode == 0, result.stderr
    listed = dict(line.split() for line in result.stdout.strip().splitlines())
    for name in ("USAGE", "USAGE_DLQ", "REQUESTS", "BATCH", "KV_INFERBUS_ROUTING", "KV_INFERBUS_BREAKERS",
                 "KV_INFERBUS_LEASES", "OBJ_INFERBUS_MEDIA", "OBJ_INFERBUS_FILES"):
        assert listed[name] == "R1", result.stdout  # a single node: one replica each


def test_up_refuses_a_shared_port_for_many_processes() -> None:
    # cluster.toml gives every container metrics port 9100: right for `inferbus run`, refused by `up` at once.
    result = cli("up", "--config", "infra/examples/cluster.toml")
    assert result.returncode == 1 and "common.metrics_port: gives every process the same port" in result.stderr


@pytest.mark.slow
async def test_config_models_registers_the_files_models(
    alone: dict[str, str], stack_file: Path, tmp_path: Path
) -> None:
    text = await asyncio.to_thread(stack_file.read_text) + REMOTE_MODEL.replace("upstream-chat", "file-model")
    path = await asyncio.to_thread(write, tmp_path, text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERBUS_")}
    env["INFERBUS_TEST_UPSTREAM_KEY"] = "sk-file-" + "m" * 24
    first = await asyncio.to_thread(cli, "config", "models", str(path), env=env)
    assert first.returncode == 0 and "registered model file-model v1 (openai)" in first.stdout, first.stderr
    again = await asyncio.to_thread(cli, "config", "models", str(path), env=env)
    assert again.returncode == 0 and "file-model v1 is registered already" in again.stdout, again.stderr
    missing = await asyncio.to_thread(cli, "config", "models", str(path), env={
        k: v for k, v in env.items() if k != "INFERBUS_TEST_UPSTREAM_KEY"})
    assert missing.returncode == 1 and "INFERBUS_TEST_UPSTREAM_KEY is not set" in missing.stderr
