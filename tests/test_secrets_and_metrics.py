"""Secrets stay out of logs; metrics live on a loopback port, not the gateway's public one; every
service exports its event-loop lag, whether its NATS connections are up, and the circuit breakers it sees."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import msgspec
import psutil
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from contracts import subjects
from contracts.llm import Final, GenerateRequest, Message
from contracts.registry import Breaker
from services.cli.up import say
from services.runtime import bus
from services.runtime.breakers import Breakers, BreakerState, breaker_bucket, breaker_key
from services.runtime.embedded import NatsServer
from services.runtime.local import EmbeddedStack, wait_http, wait_worker, with_identity
from services.runtime.logging import redact
from services.runtime.metrics import sample_loop_lag
from services.runtime.metrics import url as metrics_url
from services.runtime.natsauth import read_credentials
from tests.conftest import ADMIN_KEY, BENCH_MODEL, DEFAULT_MODEL, Gateway, start_gateway, start_worker
from tests.test_registry import nats_generate

PG_PASSWORD = "pg-Pa55word-" + "k" * 12
LAG = "inferbus_event_loop_lag_seconds"


def with_password(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=f"{quote(user)}:{quote(password, safe='')}@{parts.hostname}:{parts.port}").geturl()


class PasswordGateway(Gateway):
    secrets: tuple[str, ...] = ()


@pytest.fixture(scope="module")
async def gateway(infra: EmbeddedStack) -> AsyncIterator[PasswordGateway]:
    """This module's gateway, configured with NATS and PostgreSQL URLs that carry passwords."""
    creds = with_identity("services.gateway", infra.env()).get("INFERBUS_NATS_CREDENTIALS")
    # With the generated NATS accounts the URL carries the gateway's real password; without, any is let in.
    user, nats_password = read_credentials(creds) if creds else ("inferbus", "nats-Pa55word-" + "q" * 12)
    started = start_gateway(
        infra,
        nats_url=with_password(infra.nats_url, user, nats_password),
        database_url=with_password(infra.database_url, "postgres", PG_PASSWORD),  # trust auth: not checked
        global_limits={"tpm": 10_000_000},  # so requests are settled and per-tenant spend is counted
    )
    gw = PasswordGateway(started.proc, started.url)
    gw.secrets = (nats_password, PG_PASSWORD)
    try:
        await wait_http(gw.url, gw.proc)
        yield gw
    finally:
        gw.proc.stop()


async def instance_info(nc: bus.Connection, service: str, **metadata: str) -> dict[str, Any]:
    """The `$SRV.INFO` answer of the one instance of `service` whose metadata has all of `metadata`."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [i for i in await bus.discover(nc, "INFO", service, wait=0.3)
                 if all(i.get("metadata", {}).get(k) == v for k, v in metadata.items())]
        if found:
            assert len(found) == 1, found
            return found[0]
    raise TimeoutError(f"no {service} instance with {metadata}")


async def scrape(url: str) -> list[Sample]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        text = await response.text()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    (found,) = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    return found


# ---- secrets in logs --------------------------------------------------------------------------------------


async def test_service_log_never_shows_url_passwords(gateway: PasswordGateway) -> None:
    async with aiohttp.ClientSession() as http, http.get(gateway.url + "/v1/models", headers=gateway.headers) as r:
        assert r.status == 200  # it did connect with those URLs
    text = gateway.proc.log()
    connected = [json.loads(line) for line in text.splitlines() if '"connected"' in line]
    assert connected and ":***@127.0.0.1" in connected[0]["nats"], text[-3000:]  # still says where
    for secret in gateway.secrets:
        assert secret not in text
        assert quote(secret, safe="") not in text


LOGGING_SCRIPT = """
import logging, sys
from services.runtime import logging as log
log.configure("probe")
key = sys.argv[1]
log.get("probe").info("probe", api_key=key, headers={"authorization": "Bearer " + key},
                      attempts=[{"url": "nats://svc:hunter2-nats@h:4222"}], dsn="postgresql://u:hunter2-pg@h/db",
                      redis="redis://:hunter2-redis@h:6379/0", link="https://h/x?token=hunter2-token&a=1",
                      note=f"key {key} in a sentence", error=ValueError("connect to nats://svc:hunter2-err@h failed"))
logging.getLogger("faststream").warning("connecting to nats://svc:hunter2-std@h:4222 with %s", key)
try:
    raise RuntimeError("no postgresql://u:hunter2-exc@h/db for " + key)
except RuntimeError:
    log.get("probe").exception("failed")
raise RuntimeError(f"crash with nats://svc:hunter2-crash@h and {key}")
"""


def test_log_events_redact_keys_and_credentials_anywhere() -> None:
    key = "ib-" + "Ab3_-" * 8
    done = subprocess.run([sys.executable, "-c", LOGGING_SCRIPT, key], capture_output=True, text=True, timeout=60)
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "RuntimeError: crash with" in out, out
    assert '"event": "probe"' in out and '"event": "failed"' in out and "connecting to" in out, out
    assert key not in out and key[3:15] not in out, out
    assert "hunter2" not in out, out
    assert "ib-***" in out and "nats://svc:***@h:4222" in out and "token=***" in out, out


@pytest.mark.parametrize(("text", "shown", "hidden"), [
    ("nats://gw:pa55@127.0.0.1:4222", "nats://gw:***@127.0.0.1:4222", "pa55"),
    ("nats://s3cr3t-token@127.0.0.1:4222", "nats://***@127.0.0.1:4222", "s3cr3t"),
    ("redis://:pa55@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0", "pa55"),
    ("postgresql://u:p@ss@h:5432/db", "postgresql://u:***@h:5432/db", "p@ss"),
    ("postgresql://u@h/db?sslmode=require&password=pa55", "postgresql://u@h/db?sslmode=require&password=***", "pa55"),
    ("host=h password=pa55 dbname=x", "host=h password=*** dbname=x", "pa55"),
    ("nats://a:pa55@h1:4222,nats://b:pa66@h2:4222", "nats://a:***@h1:4222,nats://b:***@h2:4222", "pa"),
    ("/playground?key=ib-abcdefghijklmnopqrstu", "/playground?key=***", "abcdef"),
    ("lib-asyncio and postgresql://postgres@h/db", "lib-asyncio and postgresql://postgres@h/db", "***"),
])
def test_redact(text: str, shown: str, hidden: str) -> None:
    assert redact(text) == shown
    assert hidden not in redact(text)


def test_up_never_prints_a_configured_password(capsys: pytest.CaptureFixture[str]) -> None:
    say("using configured nats at nats://inferbus:pa55-up@nats.internal:4222")
    out = capsys.readouterr().out
    assert "pa55-up" not in out and "nats://inferbus:***@nats.internal:4222" in out


# ---- metrics: a loopback port, never the public one -------------------------------------------------------


async def test_gateway_public_port_serves_no_metrics(gateway: PasswordGateway) -> None:
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": f"Bearer {ADMIN_KEY}"}):
            async with http.get(gateway.url + "/metrics", headers=headers) as r:
                assert r.status == 404
                assert "inferbus_" not in await r.text()


async def test_metrics_port_is_published_and_loopback_only(
    gateway: PasswordGateway, bench_worker: dict[str, Any], nc: bus.Connection
) -> None:
    body = {"model": BENCH_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.url + "/v1/chat/completions", json=body, headers=gateway.headers) as r:
            assert r.status == 200, await r.text()
    info = await instance_info(nc, "inferbus-gateway", http=gateway.url)
    url = metrics_url(info)
    assert url is not None
    deadline = time.monotonic() + 10
    while not any(s.name == "inferbus_gateway_settled_total" for s in await scrape(url)):  # per-tenant spend
        assert time.monotonic() < deadline, "the request's spend never showed on the metrics port"
    port = int(info["metadata"]["metrics_port"])
    listening = [c.laddr for c in psutil.Process(gateway.proc.pid).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening


async def test_the_llm_worker_exports_vllms_metric_names(infra: EmbeddedStack, nc: bus.Connection) -> None:
    """Time to first token, inter-token and end-to-end latency, tokens, running and waiting under vLLM's names
    (label `model_name`), with what one token-by-token generation puts in them."""
    model = "metrics-vllm-names"
    proc = start_worker(infra, model, engine_options={"tokens_per_s": 400})  # one Delta per token
    try:
        stats = await wait_worker(nc, model, proc)
        url = metrics_url(await instance_info(nc, "inferbus-llm", instance=stats["worker_id"]))
        assert url is not None
        request = GenerateRequest(request_id="vllm-names-1", model=model, max_tokens=8, prompt="one two three")
        chunks = await nats_generate(nc, subjects.infer("llm", model, "v1"), request)
        final = chunks[-1]
        assert isinstance(final, Final) and final.usage.completion_tokens == 8, chunks
        samples = await scrape(url)
        mine = {"model_name": model, "version": "v1"}
        assert value(samples, "vllm:time_to_first_token_seconds_count", **mine) == 1
        assert value(samples, "vllm:e2e_request_latency_seconds_count", **mine) == 1
        assert value(samples, "vllm:inter_token_latency_seconds_count", **mine) == 7  # between 8 tokens
        itl = value(samples, "vllm:inter_token_latency_seconds_sum", **mine) / 7
        assert 0.5 / 400 < itl < 0.5, itl  # paced at 400 tokens/s: ~2.5 ms apart
        assert value(samples, "vllm:prompt_tokens_total", **mine, traffic="live") == final.usage.prompt_tokens
        assert value(samples, "vllm:generation_tokens_total", **mine, traffic="live") == 8
        assert value(samples, "vllm:num_requests_running", **mine) == 0
        assert value(samples, "vllm:num_requests_waiting", **mine) == 0
    finally:
        proc.stop()


@pytest.mark.model
async def test_the_llama_cpp_worker_exports_its_prefix_cache_counters(
    nc: bus.Connection, default_worker: dict[str, Any]
) -> None:
    """vllm:prefix_cache_queries/hits: the prompt tokens the engine looked up and found in its slots' cells."""
    url = metrics_url(await instance_info(nc, "inferbus-llm", instance=default_worker["worker_id"]))
    assert url is not None
    mine = {"model_name": DEFAULT_MODEL, "version": default_worker["version"]}
    rules = " ".join(f"Rule {i}: the answer to question {i} is {i * 3}." for i in range(20))

    async def ask(i: int) -> int:
        request = GenerateRequest(request_id=f"prefix-{i}-{secrets.token_hex(4)}", model=DEFAULT_MODEL, max_tokens=2,
                                  temperature=0, messages=[Message("system", rules), Message("user", "Question 7?")])
        chunks = await nats_generate(nc, subjects.infer("llm", DEFAULT_MODEL, default_worker["version"]), request)
        assert isinstance(chunks[-1], Final), chunks
        return chunks[-1].usage.prompt_tokens

    before = await scrape(url)
    prompt = await ask(1)
    await ask(2)  # the same prompt again: all of it is in a slot but the last token, decoded again for its logits
    after = await scrape(url)

    def grew(name: str) -> float:
        return value(after, name, **mine) - value(before, name, **mine)

    assert grew("vllm:prefix_cache_queries_total") == 2 * prompt
    assert prompt - 2 <= grew("vllm:prefix_cache_hits_total") <= 2 * prompt - 2


def test_gpu_metrics_where_there_is_an_nvidia_gpu_and_none_elsewhere() -> None:
    """NVML's numbers per GPU on /metrics where the NVIDIA driver runs (a lent GPU machine); on a CPU machine no
    GPU sample at all (and no error)."""
    from services.runtime import gpu

    driver = Path("/proc/driver/nvidia/version").exists()
    count = gpu.export()
    assert gpu.export() == count  # once per process
    names = ("hw_gpu_utilization_ratio", "hw_gpu_memory_usage_bytes", "hw_gpu_memory_limit_bytes",
             "inferbus_worker_gpu_memory_bytes")
    samples = [s for m in REGISTRY.collect() for s in m.samples if s.name in names]
    if not driver:
        assert count == 0 and samples == []
        return
    assert count >= 1 and len(samples) == 4 * count
    for sample in samples:
        assert sample.labels["uuid"].startswith("GPU-"), sample
        if sample.name == "hw_gpu_utilization_ratio":
            assert 0 <= sample.value <= 1, sample
        elif sample.name == "hw_gpu_memory_limit_bytes":
            assert sample.value > 2**30, sample
        else:
            assert sample.value >= 0, sample


# ---- event-loop lag ---------------------------------------------------------------------------------------


async def lag_samples(url: str) -> tuple[float, float]:
    samples = await scrape(url)
    assert value(samples, f"{LAG}_bucket", le="+Inf") == value(samples, f"{LAG}_count")
    return value(samples, f"{LAG}_count"), value(samples, f"{LAG}_sum")


@pytest.mark.parametrize("service", ["gateway", "worker"])
async def test_every_service_exports_event_loop_lag(
    service: str, gateway: PasswordGateway, bench_worker: dict[str, Any], nc: bus.Connection
) -> None:
    if service == "gateway":
        info = await instance_info(nc, "inferbus-gateway", http=gateway.url)
    else:
        info = await instance_info(nc, "inferbus-llm", instance=bench_worker["worker_id"])
    url = metrics_url(info)
    assert url is not None
    first, _ = await lag_samples(url)
    deadline = time.monotonic() + 10
    while (latest := await lag_samples(url))[0] < first + 5:  # a sample every ~100 ms
        assert time.monotonic() < deadline, f"{LAG} stopped at {latest[0]} samples"
    count, total = latest
    assert 0 <= total / count < 0.25, (count, total)  # an idle service's loop is not blocked


async def test_lag_sampler_sees_a_blocked_loop() -> None:
    lags: list[float] = []
    sampler = asyncio.create_task(sample_loop_lag(0.02, lags.append))
    try:
        deadline = time.monotonic() + 5
        while not lags:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)  # let the sampler run: a yield, not a wait for a condition
        time.sleep(0.3)  # noqa: ASYNC251  # the stimulus: block this event loop for 300 ms
        while max(lags) < 0.25:
            assert time.monotonic() < deadline, lags
            await asyncio.sleep(0.01)
    finally:
        sampler.cancel()
    assert max(lags) < 1.0 and min(lags) < 0.05, lags


# ---- NATS connections and circuit breakers ----------------------------------------------------------------


async def until_true(check: Callable[[], Any], what: str, limit_s: float = 15) -> None:
    """Poll `check` (sync or async) until it is true; fail after `limit_s`."""
    deadline = time.monotonic() + limit_s
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def connected(name: str) -> float | None:
    return REGISTRY.get_sample_value("inferbus_nats_connected", {"connection": name})


async def test_nats_connected_gauge_drops_to_0_and_back_to_1_with_the_server(tmp_path: Path) -> None:
    server = NatsServer(tmp_path, secure=False)  # a server of this test's own: the session's stays up
    url = await asyncio.to_thread(server.start)
    name = "gauge-probe-" + secrets.token_hex(4)
    nc = await bus.connect(url, name, identity=bus.Identity())
    try:
        assert connected(name) == 1
        assert server.proc is not None
        server.proc.kill()
        await asyncio.to_thread(server.proc.wait)
        await until_true(lambda: connected(name) == 0, "the gauge to see the connection drop")
        await asyncio.to_thread(server.start)  # the same port: the client reconnects to it
        await until_true(lambda: connected(name) == 1, "the gauge to see the reconnect")
        await nc.flush(timeout=5)  # and the connection does work again
    finally:
        await nc.close()
        await asyncio.to_thread(server.stop)
    assert connected(name) == 0  # closed for good


async def test_every_connection_of_a_service_exports_its_nats_gauge(
    gateway: PasswordGateway, nc: bus.Connection
) -> None:
    url = metrics_url(await instance_info(nc, "inferbus-gateway", http=gateway.url))
    assert url is not None
    gauges = {s.labels["connection"]: s.value for s in await scrape(url) if s.name == "inferbus_nats_connected"}
    assert gauges and set(gauges.values()) == {1.0}, gauges
    assert any(name.startswith("inferbus-gateway-") for name in gauges), gauges


def breaker_open(model: str) -> float | None:
    return REGISTRY.get_sample_value("inferbus_circuit_breaker_open", {"kind": "llm", "model": model, "version": "v1"})


async def test_breaker_gauge_is_1_while_open_and_0_once_a_probe_closes_it() -> None:
    breakers, model = Breakers("gauge-test"), "gauge-" + secrets.token_hex(4)
    cfg = Breaker(failures=2, window_s=60, cooldown_s=0.0)
    breakers.failure("llm", model, "v1", "upstream_error", cfg)
    assert breaker_open(model) is None  # no transition yet: nothing exported
    breakers.failure("llm", model, "v1", "upstream_error", cfg)
    assert breakers.verdict("llm", model, "v1") != "closed" and breaker_open(model) == 1
    assert await breakers.claim_probe("llm", model, "v1")
    assert breaker_open(model) == 1  # half open: only the probe gets through
    breakers.success("llm", model, "v1")
    assert breakers.verdict("llm", model, "v1") == "closed" and breaker_open(model) == 0


async def test_a_breaker_opened_anywhere_shows_in_every_watching_service(
    gateway: PasswordGateway, nc: bus.Connection
) -> None:
    url = metrics_url(await instance_info(nc, "inferbus-gateway", http=gateway.url))
    assert url is not None
    model = "gauge-" + secrets.token_hex(4)
    kv = await breaker_bucket(nc.jetstream())
    key = breaker_key("llm", model, "v1")

    async def gateway_shows(expected: float) -> bool:
        found = [s.value for s in await scrape(url) if s.name == "inferbus_circuit_breaker_open"
                 and s.labels == {"kind": "llm", "model": model, "version": "v1"}]
        return found == [expected]

    try:
        opened = BreakerState(state="open", until=time.time() + 60, cooldown_s=60, reason="test", by="elsewhere")
        await kv.put(key, msgspec.json.encode(opened))
        await until_true(lambda: gateway_shows(1.0), "the gateway to export the open breaker")
        await kv.put(key, msgspec.json.encode(BreakerState(state="closed", by="elsewhere")))
        await until_true(lambda: gateway_shows(0.0), "the gateway to export the closed breaker")
    finally:
        await kv.delete(key)
