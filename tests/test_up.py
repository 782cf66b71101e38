"""`inferbus up` as a user runs it: ready, serves a request, stops on SIGTERM leaving no process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

import openai
import psutil
import pytest

from services.runtime.embedded import free_port


def state_url(data: Path) -> str:
    return str(json.loads((data / "run.json").read_text())["nats_url"])


@pytest.mark.slow
async def test_up_serves_and_stops_cleanly() -> None:
    data = Path(tempfile.mkdtemp(prefix="inferbus-up-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERBUS_")}
    env.update(INFERBUS_DATA_DIR=str(data), INFERBUS_GATEWAY_PORT=str(port), PYTHONUNBUFFERED="1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", "up", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(240):
            while "[inferbus] ready" not in (line := (await proc.stdout.readline()).decode()):
                assert line, "inferbus up exited before ready:\n" + "".join(lines)
                lines.append(line)
        output = "".join(lines)
        assert "starting embedded nats" in output and "model_loading" in output
        assert "nats secured" in output
        banner = ""
        while not banner.strip().startswith("admin key"):
            banner = (await proc.stdout.readline()).decode()
        key = banner.split()[-1]
        # The admin key persists in the data dir (0600) for the next run; no key in a URL.
        assert (data / "secrets" / "admin-key").read_text() == key
        assert (data / "secrets" / "admin-key").stat().st_mode & 0o777 == 0o600
        assert (data / "secrets").stat().st_mode & 0o777 == 0o700
        descendants = psutil.Process(proc.pid).children(recursive=True)
        assert len(descendants) >= 5  # nats, postgres (+ its workers), redis, gateway, llm

        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        resp = await client.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
        )
        assert resp.usage is not None and resp.usage.completion_tokens > 0

        # nats-server killed as a new user might: `up` restarts it, services reconnect, requests succeed again.
        nats_server = next(p for p in descendants if "nats-server" in " ".join(p.cmdline()))
        nats_server.kill()
        served = None
        async with asyncio.timeout(60):
            while served is None:
                try:
                    served = await client.chat.completions.create(
                        model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hi."}], max_tokens=4,
                        timeout=5)
                except openai.APIError:
                    await asyncio.sleep(0.1)
        assert served.usage is not None and served.usage.completion_tokens > 0
        descendants = psutil.Process(proc.pid).children(recursive=True)

        status = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli.main", "status", env=env, stdout=asyncio.subprocess.PIPE
        )
        table = (await status.communicate())[0].decode()
        assert status.returncode == 0 and "inferbus-gateway" in table and "inferbus-llm" in table
        # The CLI found its admin identity through the run file; an anonymous connection is refused.
        anon = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import asyncio, nats; asyncio.run(nats.connect("
            f"'{state_url(data)}', allow_reconnect=False, max_reconnect_attempts=0))",
            stderr=asyncio.subprocess.PIPE)
        assert await anon.wait() != 0 and b"Authorization" in (await anon.communicate())[1]

        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            rest = (await proc.stdout.read()).decode()
            code = await proc.wait()
        assert code == 0, rest
        assert "[inferbus] stopped" in rest
        _, alive = psutil.wait_procs(descendants, timeout=5)
        assert alive == [], f"left behind: {[p.pid for p in alive]}"
        assert not (data / "run.json").exists()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
