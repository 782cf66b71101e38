"""Remote providers through the whole platform: registry versions with encrypted secrets, the provider host,
fallbacks, shared circuit breakers, canary rollback to a local version, and the alias router.

Upstreams: llama-cpp-python's own OpenAI-compatible server on the shipped SmolLM2 GGUF (real), and fakes of
OpenAI, Anthropic and Gemini at the HTTP boundary (tests/fakes/providers.py, their documented wire formats).
One platform for the module: registry, router, metering, the provider host and two gateways.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest
from multidict import CIMultiDict
from openai import AsyncOpenAI

from contracts import subjects
from contracts.llm import Final, GenerateRequest, Message
from services.llm.engines.llamacpp import smollm2_gguf
from services.runtime import bus
from services.runtime.embedded import free_port
from services.runtime.local import EmbeddedStack, ServiceProcess, settings_env, wait_service, wait_worker
from services.runtime.streaming import StreamClient
from tests.conftest import ADMIN_KEY, Gateway, Workers, running_gateway, start_worker
from tests.fakes.providers import FakeProvider
from tests.test_metering import start_metering, until, wait_metering
from tests.test_registry import admin

SECRET = "sk-test-" + "s3cr3t" * 6  # must never appear in a log, /metrics or a registry answer


@pytest.fixture(scope="module")
async def platform(
    infra: EmbeddedStack, nc: bus.Connection, registry: ServiceProcess, router: ServiceProcess
) -> AsyncIterator[dict[str, Any]]:
    metering = start_metering(infra, infra.database_url, "providers")
    env = infra.env(**settings_env(health_s=0.5, refresh_s=2))
    host = ServiceProcess("providers", "services.llm.providers", env, infra.root)
    try:
        await wait_metering(nc, metering)
        await wait_service(nc, "inferbus-providers", host)
        async with running_gateway(infra) as gw_a, running_gateway(infra) as gw_b:
            yield {"a": gw_a, "b": gw_b, "host": host, "metering": metering}
    finally:
        host.stop()
        metering.stop()


@pytest.fixture(scope="module")
async def fakes() -> AsyncIterator[dict[str, FakeProvider]]:
    providers = {
        "primary": FakeProvider("openai"), "backup": FakeProvider("openai"),
        "anthropic": FakeProvider("anthropic"), "gemini": FakeProvider("gemini"),
    }
    async with contextlib.AsyncExitStack() as stack:
        for fake in providers.values():
            await stack.enter_async_context(fake)
        yield providers


@pytest.fixture(autouse=True)
def clean_fakes(fakes: dict[str, FakeProvider]) -> None:
    for fake in fakes.values():
        fake.reset()
        fake.api_key = None


async def remote(
    nc: bus.Connection, http: aiohttp.ClientSession, gw: Gateway, model: str, fake_or_url: FakeProvider | str,
    engine: str = "openai", version: str = "v1", **params: Any,
) -> None:
    """Register `model`/`version` on a remote engine with SECRET as its api_key, deploy it, wait until served."""
    base_url = fake_or_url if isinstance(fake_or_url, str) else fake_or_url.base_url
    await admin(nc, "register", model=model, version=version, engine=engine,
                params={"base_url": base_url, "model": params.pop("upstream_model", "fake-model"), **params},
                secrets={"api_key": SECRET})
    view = await admin(nc, "deploy", model=model, version=version)

    async def served() -> bool:
        async with http.get(f"{gw.url}/v1/models/{model}", headers=gw.headers) as resp:
            if resp.status != 200:
                return False
            ib = (await resp.json())["inferbus"]
            return (ib["revision"] or 0) >= view["revision"] and any(
                w["version"] == version for w in ib["live_workers"])

    await until(served, f"{model}/{version} served through {gw.url}")


async def chat(
    http: aiohttp.ClientSession, gw: Gateway, model: str, *, stream: bool = False, deadline_s: float | None = None,
    content: str = "alpha beta gamma",
) -> tuple[int, CIMultiDict[str], Any]:
    """One chat completion: (status, headers, JSON body or the SSE events' data)."""
    headers = {**gw.headers, **({"x-inferbus-timeout": str(deadline_s)} if deadline_s else {})}
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 32,
            "stream": stream}
    async with http.post(f"{gw.url}/v1/chat/completions", headers=headers, json=body) as resp:
        if not stream or resp.status != 200:
            return resp.status, CIMultiDict(resp.headers), await resp.json()
        events = [line[6:] for line in (await resp.text()).splitlines() if line.startswith("data: ")]
        return resp.status, CIMultiDict(resp.headers), events


def client(gw: Gateway) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=ADMIN_KEY, max_retries=0)


# ---- real upstream: llama-cpp-python's OpenAI-compatible server --------------------------------


@pytest.fixture(scope="module")
async def llama_server() -> AsyncIterator[str]:
    port = free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220 (a start, not a wait)
        [sys.executable, "-m", "llama_cpp.server", "--model", smollm2_gguf(), "--port", str(port),
         "--n_ctx", "2048", "--model_alias", "smollm2",
         "--interrupt_requests", "False"],  # else its own default cuts a stream when our health check calls
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        async with aiohttp.ClientSession() as http:
            async def up() -> bool:
                assert proc.poll() is None, "llama_cpp.server exited"
                try:
                    async with http.get(f"{url}/models") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            await until(up, "llama_cpp.server", limit_s=90)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


async def test_a_remote_model_on_a_real_openai_compatible_server(
    nc: bus.Connection, platform: dict[str, Any], llama_server: str
) -> None:
    gw = platform["a"]
    async with aiohttp.ClientSession() as http:
        await remote(nc, http, gw, "llama-remote", llama_server, upstream_model="smollm2")
    sdk = client(gw)
    raw = await sdk.chat.completions.with_raw_response.create(
        model="llama-remote", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12, temperature=0,
    )
    whole = raw.parse()
    assert raw.headers["x-inferbus-provider"] == "openai" and raw.headers["x-inferbus-model-version"] == "v1"
    assert whole.choices[0].message.content and whole.usage is not None
    assert whole.usage.prompt_tokens > 5 and 0 < whole.usage.completion_tokens <= 12  # the server's own counts
    assert whole.system_fingerprint == "openai:v1"
    stream = await sdk.chat.completions.create(
        model="llama-remote", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 8
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


# ---- fakes: Anthropic and Gemini wire formats, secrets ----------------------------------------


@pytest.mark.parametrize("provider", ["anthropic", "gemini"])
async def test_anthropic_and_gemini_stream_with_their_own_usage(
    nc: bus.Connection, platform: dict[str, Any], fakes: dict[str, FakeProvider], provider: str
) -> None:
    gw, fake = platform["a"], fakes[provider]
    model = f"{provider}-model"
    async with aiohttp.ClientSession() as http:
        await remote(nc, http, gw, model, fake, engine=provider)
    stream = await client(gw).chat.completions.create(
        model=model, messages=[{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "one two three four"}],
        stream=True, stream_options={"include_usage": True}, max_tokens=50,
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.split() == ["one", "two", "three", "four"] * 2  # the fake echoes the words, 8 chunks
    prompt, completion = fake.stats.last_usage or [0, 0]
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (prompt, completion)
    assert fake.stats.last_auth == SECRET
    sent = fake.stats.last_body
    if provider == "anthropic":
        assert sent["system"] == "Be brief." and sent["max_tokens"] == 50 and sent["stream"] is True
    else:
        assert sent["systemInstruction"]["parts"][0]["text"] == "Be brief."
        assert sent["generationConfig"]["maxOutputTokens"] == 50


async def test_secrets_are_sealed_never_shown_never_logged(
    infra: EmbeddedStack, nc: bus.Connection, platform: dict[str, Any], fakes: dict[str, FakeProvider]
) -> None:
    gw = platform["a"]
    async with aiohttp.ClientSession() as http:
        await remote(nc, http, gw, "sealed", fakes["backup"])
        status, _, _ = await chat(http, gw, "sealed")
        assert status == 200
        shown = await admin(nc, "show", model="sealed")
        assert shown["versions"][0]["secrets"] == ["api_key"] and SECRET not in str(shown)
        assert SECRET not in str(await admin(nc, "list")) and SECRET not in str(await admin(nc, "history",
                                                                                              model="sealed"))
        async with http.get(f"{gw.url}/v1/models/sealed", headers=gw.headers) as resp:
            assert SECRET not in await resp.text()
    conn = await asyncpg.connect(infra.database_url)
    try:
        rows = await conn.fetch("SELECT ciphertext FROM registry_secrets WHERE model='sealed'")
        assert len(rows) == 1 and SECRET.encode() not in bytes(rows[0]["ciphertext"])
        assert not await conn.fetchval("SELECT count(*) FROM registry_versions WHERE params::text LIKE $1",
                                       f"%{SECRET}%")
    finally:
        await conn.close()
    for proc in infra.root.glob("*.log"):
        assert SECRET not in proc.read_text(errors="replace"), proc.name
    for data in await bus.service_stats(nc, None, wait=0.3):
        if data.get("metrics_port"):
            async with aiohttp.ClientSession() as http, http.get(
                    f"http://127.0.0.1:{data['metrics_port']}/metrics") as resp:
                assert SECRET not in await resp.text()


async def test_a_credential_given_as_a_param_is_refused(nc: bus.Connection, platform: dict[str, Any]) -> None:
    with pytest.raises(Exception, match="looks like a credential"):
        await admin(nc, "register", model="leaky", version="v1", engine="openai",
                    params={"base_url": "http://127.0.0.1:1/v1", "api_key": SECRET})


async def test_rotated_secret_reaches_the_engine_without_a_restart(
    nc: bus.Connection, platform: dict[str, Any], fakes: dict[str, FakeProvider]
) -> None:
    gw, fake = platform["a"], fakes["backup"]
    async with aiohttp.ClientSession() as http:
        await remote(nc, http, gw, "rotating", fake)
        workers = (await admin(nc, "show", model="rotating"))["workers"]
        fake.api_key = "sk-rotated-key"  # the upstream now wants another key
        status, _, body = await chat(http, gw, "rotating")
        assert (status, body["error"]["code"]) == (502, "upstream_auth_failed")
        await admin(nc, "secrets", model="rotating", version="v1", secrets={"api_key": "sk-rotated-key"})

        async def works() -> bool:
            return (await chat(http, gw, "rotating"))[0] == 200

        await until(works, "the rotated key in use")
        assert fake.stats.last_auth == "Bearer sk-rotated-key"
        assert (await admin(nc, "show", model="rotating"))["workers"][0]["worker_id"] == workers[0]["worker_id"]


# ---- faults -------------------------------------------------------------------------------------


async def test_cancel_closes_the_upstream_request(
    nc: bus.Connection, platform: dict[str, Any], fakes: dict[str, FakeProvider]
) -> None:
    gw, fake = platform["a"], fakes["primary"]
    async with aiohttp.ClientSession() as http:
        await remote(nc, http, gw, "cancellable", fake)
        fake.set_script(chunk_delay_s=0.2, chunks=50)
        body = {"model": "cancellable", "messages": [{"role": "user", "content": "x y"}], "stream": True}
        async with http.post(f"{gw.url}/v1/chat/completions", headers=gw.headers, json=body) as resp:
            await resp.content.readline()  # the first event: the stream runs
        await until(lambda: asyncio.sleep(0, fake.stats.disconnects >= 1), "the upstream to see the disconnect")
        assert fake.stats.completed == 0


async def test_upstream_killed_mid_stream_ends_with_an_error_and_usage_is_recorded(
    infra: EmbeddedStack, nc: bus.Connection, platform: dict[str, Any], fakes: dict[str, FakeProvider]
) -> None:
    gw, fake = platform["a"], fakes["primary"]
    async with aiohttp.ClientSession() as http:
        await remote(nc, http, gw, "dying", fake)
        fake.set_script(die_after_chunks=3)
        status, headers, events = await chat(http, gw, "dying", stream=True)
    assert status == 200 and events[-1] != "[DONE]" and '"upstream_error"' in events[-1]
    rid = headers["x-request-id"]
    conn = await asyncpg.connect(infra.database_url)
    try:
        row = await until(lambda: conn.fetchrow(
            "SELECT outcome, completion_tokens FROM usage_requests WHERE request_id=$1", rid), "the usage row")
    finally:
        await conn.close()
    assert row["outcome"] == "upstream_error" and row["completion_tokens"] >= 3


@pytest.mark.parametrize(("case", "script", "code", "status"), [
    ("throttled", {"status": 429, "retry_after": 7}, "rate_limited", 429),
    ("down", {"status": 503}, "upstream_error", 502),
    ("too-long", {"context_length": True}, "context_length_exceeded", 400),
    ("filtered", {"content_filter": True}, "content_filter", 400),
    ("garbled", {"malformed": True}, "upstream_error", 502),
])
async def test_provider_errors_reach_the_client_in_our_catalogue(
    nc: bus.Connection, platform: dict[str, Any], fakes: dict[str, FakeProvider], case: str,
    script: dict[str, Any], code: str, status: int,
) -> None:
    gw, fake = platform["b"], fakes["primary"]
    async with aiohttp.ClientSession() as http:
        await remote(nc, http, gw, f"errors-{case}", fake)
        fake.set_script(**script)
        got, headers, body = await chat(http, gw, f"errors-{case}")
    assert (got, body["error"]["code"]) == (status, code), body
    if code == "rate_limited":
        assert headers["Retry-After"] == "7"
    if script.get("malformed"):
        assert "malformed" in body["error"]["message"]


async def test_a_slow_upstream_hits_the_deadline(
    nc: bus.Connection, platform: dict[str, Any], fakes: dict[str, FakeProvider]
) -> None:
    gw, fake = platform["a"], fakes["primary"]
    async with aiohttp.ClientSession() as http:
        await remote(nc, http, gw, "sluggish", fake)
        fake.set_script(delay_s=10)
        status, _, body = await chat(http, gw, "sluggish", deadline_s=1)
        assert (status, body["error"]["code"]) == (504, "deadline_exceeded")
    await until(lambda: asyncio.sleep(0, fake.stats.disconnects >= 1), "the upstream request to be closed")


# ---- fallbacks and breakers ---------------------------------------------------------------------


async def test_429_falls_back_to_the_next_model_and_headers_say_who_served(
    nc: bus.Connection, platform: dict[str, Any], fakes: dict[str, FakeProvider]
) -> None:
    gw = platform["a"]
    async with aiohttp.ClientSession() as http:
        await remote(nc, http, gw, "fb-backup", fakes["backup"])
        await remote(nc, http, gw, "fb-primary", fakes["primary"])
        view = await admin(nc, "routing", model="fb-primary", fallbacks=["fb-backup"])
        await until(lambda: _revision(http, gw, "fb-primary", view["revision"]), "the routing change")
        fakes["primary"].set_script(status=429, retry_after=3)
        status, headers, body = await chat(http, gw, "fb-primary", stream=True)
    assert status == 200 and body[-1] == "[DONE]"
    assert headers["x-inferbus-model"] == "fb-backup" and headers["x-inferbus-provider"] == "openai"
    assert headers["x-inferbus-fallbacks"] == "fb-primary:v1=rate_limited"
    assert '"model": "fb-backup"' in body[0] or '"model":"fb-backup"' in body[0]
    assert fakes["primary"].stats.requests >= 1 and fakes["backup"].stats.completed == 1
    rid = headers["x-request-id"]

    async def logged() -> dict[str, Any] | None:  # the request log in PostgreSQL, through the admin API
        async with aiohttp.ClientSession() as http, http.get(
                f"{gw.url}/v1/admin/requests", params={"model": "fb-primary"}, headers=gw.headers) as resp:
            assert resp.status == 200
            return next((r for r in (await resp.json())["data"] if r["request_id"] == rid), None)

    record = await until(logged, "the request-log record")
    assert (record["status"], record["version"], record["provider"], record["streamed"]) == ("ok", "v1", "openai",
                                                                                              True)
    assert record["fallbacks"] == [{"target": "fb-primary:v1", "code": "rate_limited"}]
    assert record["attempts"] == 2 and record["completion_tokens"] > 0 and record["ttft_ms"] is not None


async def _revision(http: aiohttp.ClientSession, gw: Gateway, model: str, revision: int) -> bool:
    async with http.get(f"{gw.url}/v1/models/{model}", headers=gw.headers) as resp:
        return resp.status == 200 and ((await resp.json())["inferbus"]["revision"] or 0) >= revision


async def test_a_breaker_opened_on_one_gateway_is_open_on_the_other_then_recovers(
    nc: bus.Connection, platform: dict[str, Any], fakes: dict[str, FakeProvider]
) -> None:
    gw_a, gw_b, primary, backup = platform["a"], platform["b"], fakes["primary"], fakes["backup"]
    async with aiohttp.ClientSession() as http:
        await remote(nc, http, gw_a, "br-backup", backup)
        await remote(nc, http, gw_a, "br-primary", primary)
        view = await admin(nc, "routing", model="br-primary", fallbacks=["br-backup"],
                           breaker={"failures": 3, "window_s": 30, "cooldown_s": 3})
        for gw in (gw_a, gw_b):
            await until(lambda gw=gw: _revision(http, gw, "br-primary", view["revision"]), "the routing change")
        primary.set_script(status=503)
        for _ in range(3):  # three failures on gateway A, each served by the fallback
            status, headers, _ = await chat(http, gw_a, "br-primary")
            assert (status, headers["x-inferbus-model"]) == (200, "br-backup")
        assert primary.stats.requests == 3

        async def shared() -> bool:  # the registry watches the same KV key as gateway B
            return (await admin(nc, "show", model="br-primary"))["breakers"].get("v1", {}).get("state") == "open"

        await until(shared, "the open breaker in the shared KV", limit_s=5)
        status, headers, _ = await chat(http, gw_b, "br-primary")
        assert (status, headers["x-inferbus-fallbacks"]) == (200, "br-primary:v1=circuit_open")
        assert primary.stats.requests == 3  # B never sent to the dead primary: no timeout paid twice
        primary.reset()  # the upstream recovers: after the cooldown one probe closes the breaker

        async def recovered() -> bool:
            status, headers, _ = await chat(http, gw_b, "br-primary")
            return status == 200 and headers["x-inferbus-model"] == "br-primary"

        await until(recovered, "the half-open probe to close the breaker", limit_s=10)

        async def closed_on_a() -> bool:  # B's probe closed it for everyone (a KV write, then A's watch)
            status, headers, _ = await chat(http, gw_a, "br-primary")
            served_by_primary = headers["x-inferbus-model"] == "br-primary"
            return status == 200 and served_by_primary and "x-inferbus-fallbacks" not in headers

        await until(closed_on_a, "gateway A to see the closed breaker", limit_s=5)
        assert "v1" not in (await admin(nc, "show", model="br-primary"))["breakers"]


async def test_a_failing_remote_canary_is_rolled_back_to_the_local_version(
    infra: EmbeddedStack, nc: bus.Connection, platform: dict[str, Any], fakes: dict[str, FakeProvider],
    workers: Workers,
) -> None:
    gw, fake = platform["a"], fakes["primary"]
    model = "hybrid"
    await admin(nc, "register", model=model, version="local", engine="benchmark")
    workers["hybrid-local"] = start_worker(infra, model, version="local")
    await wait_worker(nc, model, workers["hybrid-local"])
    await admin(nc, "deploy", model=model, version="local")
    await admin(nc, "register", model=model, version="remote", engine="openai",
                params={"base_url": fake.base_url}, secrets={"api_key": SECRET})
    fake.set_script(status=500)
    view = await admin(nc, "canary", model=model, version="remote", weight=50,
                       analysis={"interval_s": 0.5, "window_s": 30, "min_samples": 6})
    async with aiohttp.ClientSession() as http:
        async def remote_live() -> bool:
            async with http.get(f"{gw.url}/v1/models/{model}", headers=gw.headers) as resp:
                ib = (await resp.json())["inferbus"]
                return ib["revision"] >= view["revision"] and {w["version"] for w in ib["live_workers"]} == {
                    "local", "remote"}

        await until(remote_live, "both versions live")

        async def rolled_back() -> bool:
            await asyncio.gather(*(chat(http, gw, model) for _ in range(6)))
            return (await admin(nc, "show", model=model))["policy"].get("canary") is None

        await until(rolled_back, "the automatic rollback", limit_s=40)
    history = await admin(nc, "history", model=model)
    assert (history[0]["action"], history[0]["actor"]) == ("auto_rollback", "canary-controller")
    assert fake.stats.requests >= 1
    async with aiohttp.ClientSession() as http:
        status, headers, _ = await chat(http, gw, model)
    assert (status, headers["x-inferbus-model-version"]) == (200, "local")


async def test_nats_publishers_reach_a_remote_model_through_the_alias_router(
    nc: bus.Connection, platform: dict[str, Any], fakes: dict[str, FakeProvider]
) -> None:
    async with aiohttp.ClientSession() as http:
        await remote(nc, http, platform["a"], "via-router", fakes["backup"])
    stream = StreamClient(nc)
    await stream.start()
    request = GenerateRequest(request_id="via-router-1", model="via-router", max_tokens=16,
                              messages=[Message("user", "red green")])
    chunks = [c async for c in stream.stream(subjects.infer("llm", "via-router"), request)]
    assert isinstance(chunks[-1], Final) and chunks[-1].version == "v1"
    assert "".join(getattr(c, "text", "") for c in chunks).split() == ["red", "green"] * 4


async def test_upstream_health_is_reported(
    nc: bus.Connection, platform: dict[str, Any], fakes: dict[str, FakeProvider]
) -> None:
    async with aiohttp.ClientSession() as http:
        await remote(nc, http, platform["a"], "health-dead", f"http://127.0.0.1:{free_port()}/v1")
        await remote(nc, http, platform["a"], "health-ok", fakes["gemini"], engine="gemini")

    async def reported() -> bool:
        dead = (await admin(nc, "show", model="health-dead"))["workers"]
        ok = (await admin(nc, "show", model="health-ok"))["workers"]
        return bool(dead and ok and dead[0].get("upstream") not in (None, "ok") and ok[0].get("upstream") == "ok")

    await until(reported, "health checks in models show")
