"""`inferbus up` as a user runs it: ready, serves a request, stops on SIGTERM leaving no process."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
from pathlib import Path

import openai
import psutil
import pytest

from services.runtime.embedded import free_port

KEY = "ib-up-test-" + "k" * 24


@pytest.mark.slow
async def test_up_serves_and_stops_cleanly() -> None:
    data = Path(tempfile.mkdtemp(prefix="inferbus-up-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERBUS_")}
    env.update(INFERBUS_DATA_DIR=str(data), INFERBUS_GATEWAY_PORT=str(port), INFERBUS_ADMIN_KEY=KEY,
               PYTHONUNBUFFERED="1")
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
        descendants = psutil.Process(proc.pid).children(recursive=True)
        assert len(descendants) >= 5  # nats, postgres (+ its workers), redis, gateway, llm

        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        resp = await client.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
        )
        assert resp.usage is not None and resp.usage.completion_tokens > 0

        status = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli.main", "status", env=env, stdout=asyncio.subprocess.PIPE
        )
        table = (await status.communicate())[0].decode()
        assert status.returncode == 0 and "inferbus-gateway" in table and "inferbus-llm" in table

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
