#!/usr/bin/env python
"""Benchmark text to speech: time to first audio and real-time factor, engine alone and end to end.

    python bench/bench_tts.py [--quick]

Starts its own embedded nats-server, PostgreSQL and Redis on free loopback ports, a gateway process
and a TTS worker process (`python -m services.gateway` / `python -m services.speech.tts`, hibari),
and loads the same engine in this process for the engine-only figures. Measures:

  1. time to first audio: the engine alone (first sentence of a text, synthesized in a thread),
     over NATS (request published -> first AudioChunk, StreamClient), and through the gateway
     (POST /v1/audio/speech -> first body byte) for pcm, mp3 and opus; p50 / p90 over N requests,
     each a different multi-sentence text;
  2. real-time factor (synthesis time / seconds of audio) for a paragraph: the engine alone,
     sentence by sentence, and through the gateway as pcm and mp3 (whole response time).

Prints "[bench] ..." progress lines and a table, and writes section `tts` of bench/RESULTS.md.
Every process it starts is stopped at the end, on error too. The client, the gateway, the worker
and nats-server share the machine's cores, so the end-to-end figures are a floor.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from bench import harness  # noqa: E402
from bench.bench_spine import CpuMeter, Results, machine, say  # noqa: E402
from bench.results import write_section  # noqa: E402
from contracts import subjects  # noqa: E402
from contracts.speech import AudioChunk, SpeechDone, SpeechRequest, asr_encoder, tts_chunk_decoder  # noqa: E402
from services.runtime import bus  # noqa: E402
from services.runtime.embedded import free_port  # noqa: E402
from services.runtime.local import EmbeddedStack, ServiceProcess, settings_env, wait_http  # noqa: E402
from services.runtime.streaming import StreamClient  # noqa: E402
from services.speech.tts import sentences  # noqa: E402
from services.speech.tts.engines.hibari import HibariEngine  # noqa: E402
from services.speech.tts.worker import WorkerSettings, pcm16  # noqa: E402

ADMIN_KEY = "ib-bench-admin-" + "t" * 24
MODEL, VERSION = "hibari", "v0-2"
RESULTS_PATH = ROOT / "bench" / "RESULTS.md"
FIRST_AUDIO_TARGET_MS = 150.0
WORKER_DEFAULTS = WorkerSettings(model=MODEL, version=VERSION, worker_id="bench")
FULL = {"requests": 10, "rounds": 3}
QUICK = {"requests": 10, "rounds": 1}
OPENINGS = [
    "The morning train was late again, so everyone on the platform stamped their feet against the cold.",
    "Our quarterly results show steady growth in every region, led by strong demand for the new service.",
    "Please remember to lock the back door before you leave the office tonight.",
    "The museum reopens on Saturday with a new exhibition of maps from the sixteenth century.",
    "Turn left at the next intersection, then continue straight for about two miles.",
    "Scientists have found a new species of frog in the cloud forests of the northern mountains.",
    "Your package has been delivered and left at the front door of the building.",
    "The recipe calls for two cups of flour, a pinch of salt and a little warm water.",
    "After a long debate, the council voted to keep the library open on Sundays.",
    "The storm is expected to reach the coast late this evening, bringing heavy rain and strong winds.",
]
FOLLOW_UP = " It was the first time this had happened in years. Nobody knew quite what to do next. We waited."
PARAGRAPH = (
    "The lighthouse stood at the edge of the cliff, white against the grey sky. Every night its beam swept "
    "across the dark water, and ships far out at sea watched for it. The keeper climbed the stairs at dusk. "
    "He trimmed the wick, wound the clockwork and polished the great lens until it shone. Then he sat by the "
    "window with a cup of tea and a book, and waited for the morning. In winter the storms came in from the "
    "west, and the whole tower hummed in the wind. In summer the sea was calm and blue, and children from the "
    "village came to ask about the light. He told them it had not gone out once in forty years."
)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def texts(n: int) -> list[str]:
    return [OPENINGS[i % len(OPENINGS)] + FOLLOW_UP for i in range(n)]


# ---- engine alone ---------------------------------------------------------------------------


def first_piece(text: str) -> str:
    return sentences.split(text, WORKER_DEFAULTS.max_sentence_chars, WORKER_DEFAULTS.first_sentence_chars)[0]


def speak(engine: HibariEngine, sentence: str) -> bytes:
    return pcm16(engine.synthesize(sentence, engine.default_voice, 1.0))



async def engine_figures(cfg: dict[str, Any], res: Results) -> None:
    engine = HibariEngine()
    t0 = time.perf_counter()
    await engine.load(lambda step, fraction: None)
    res.note(f"engine load (ONNX session, G2P lexicons, warm-up) {time.perf_counter() - t0:.2f} s in-process")
    whole: list[float] = []
    piece: list[float] = []
    for _ in range(cfg["rounds"]):  # interleaved, so drift hits both
        for text in texts(cfg["requests"]):
            for first, values in ((sentences.split(text)[0], whole), (first_piece(text), piece)):
                start = time.perf_counter()
                await asyncio.to_thread(speak, engine, first)
                values.append((time.perf_counter() - start) * 1000)
    for label, values in (("whole first sentence", whole), ("first piece as the worker cuts it", piece)):
        p50 = pct(values, 0.5)
        res.add("1", f"first audio, engine alone ({label}) p50 / p90, n={len(values)}",
                f"{p50:.1f} ms / {pct(values, 0.9):.1f} ms", f"<= {FIRST_AUDIO_TARGET_MS:.0f} ms",
                p50 <= FIRST_AUDIO_TARGET_MS)
    cut = sum(first_piece(t) != sentences.split(t)[0] for t in OPENINGS)
    res.note(f"the worker cuts {cut} of the {len(OPENINGS)} first sentences at a clause break "
             f"(first_sentence_chars={WORKER_DEFAULTS.first_sentence_chars})")
    rtfs: list[tuple[float, float]] = []
    for _ in range(cfg["rounds"]):
        start = time.perf_counter()
        samples = 0
        for sentence in sentences.split(PARAGRAPH):
            samples += len(await asyncio.to_thread(speak, engine, sentence)) // 2
        rtfs.append((time.perf_counter() - start, samples / engine.sample_rate))
    wall, audio = sorted(rtfs)[len(rtfs) // 2]  # the median run
    res.add("2", f"real-time factor, engine alone, paragraph ({len(PARAGRAPH)} chars, {audio:.1f} s of audio)",
            f"{wall / audio:.4f} ({audio / wall:.0f}x real time)")
    await engine.close()


# ---- end to end -----------------------------------------------------------------------------


async def nats_first_audio(client: StreamClient, text: str, i: int) -> float:
    rid = f"bench-tts-{i}-{time.monotonic_ns()}"
    payload = asr_encoder.encode(SpeechRequest(request_id=rid, model=MODEL, input=text))
    start = time.perf_counter()
    first: float | None = None
    async for chunk in client.open(subjects.infer("tts", MODEL, VERSION), payload, rid,
                                   decoder=tts_chunk_decoder, terminal=(SpeechDone,)):
        if isinstance(chunk, AudioChunk) and first is None:
            first = (time.perf_counter() - start) * 1000
    assert first is not None
    return first


async def http_speech(http: aiohttp.ClientSession, url: str, text: str, fmt: str) -> tuple[float, float, int]:
    """(ms to the first body byte, ms to the whole body, body bytes)."""
    start = time.perf_counter()
    first: float | None = None
    size = 0
    body = {"model": "tts-1", "voice": "alloy", "input": text, "response_format": fmt}
    async with http.post(url + "/v1/audio/speech", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{resp.status}: {await resp.text()}")
        async for part in resp.content.iter_any():
            if first is None:
                first = (time.perf_counter() - start) * 1000
            size += len(part)
    assert first is not None
    return first, (time.perf_counter() - start) * 1000, size


async def wait_tts(nc: bus.Connection, proc: ServiceProcess, url: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as http:
        while time.monotonic() < deadline:
            proc.check_alive()
            ready = [d for d in await bus.service_stats(nc, "inferbus-tts", wait=0.2)
                     if d.get("pid") == proc.pid and d.get("ready")]
            if not ready:
                continue
            async with http.get(f"{url}/v1/models/{MODEL}") as resp:
                if resp.status == 200 and (await resp.json())["workers"] > 0:
                    return ready[0]
    raise TimeoutError(f"TTS worker not ready:\n{proc.log()[-3000:]}")


async def stack_figures(cfg: dict[str, Any], infra: EmbeddedStack, procs: list[ServiceProcess], res: Results) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gateway = ServiceProcess("gateway", "services.gateway",
                             infra.env(INFERBUS_PORT=str(port), INFERBUS_ADMIN_KEY=ADMIN_KEY), infra.root)
    procs.append(gateway)
    worker = ServiceProcess("tts", "services.speech.tts", infra.env(**settings_env(model=MODEL, version=VERSION)),
                            infra.root)
    procs.append(worker)
    say("starting gateway and TTS worker")
    await wait_http(url, gateway)
    nc = await bus.connect(infra.nats_url, "bench-tts", identity=infra.identity())
    http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    try:
        stats = await wait_tts(nc, worker, url)
        say(f"worker ready: engine {stats['engine']}, voices {stats['voices']}, {stats['sample_rate']} Hz")
        client = StreamClient(nc)
        await client.start()
        await nats_first_audio(client, texts(1)[0], -1)  # warm both paths once
        for fmt in ("pcm", "mp3", "opus"):
            await http_speech(http, url, texts(1)[0], fmt)
        pids = {"gateway": gateway.pid, "worker": worker.pid, "nats": infra.nats_pid}
        direct: list[float] = []
        gateway_first: dict[str, list[float]] = {"pcm": [], "mp3": [], "opus": []}
        meter = CpuMeter(pids)
        with meter:
            for _ in range(cfg["rounds"]):  # interleaved, so drift hits every path alike
                for i, text in enumerate(texts(cfg["requests"])):
                    direct.append(await nats_first_audio(client, text, i))
                    for fmt, values in gateway_first.items():
                        values.append((await http_speech(http, url, text, fmt))[0])
        n = len(direct)
        res.add("1", f"first audio over NATS (first AudioChunk) p50 / p90, n={n}",
                f"{pct(direct, 0.5):.1f} ms / {pct(direct, 0.9):.1f} ms")
        for fmt, values in gateway_first.items():
            p50 = pct(values, 0.5)
            res.add("1", f"first audio through the gateway, {fmt} (first HTTP body byte) p50 / p90, n={n}",
                    f"{p50:.1f} ms / {pct(values, 0.9):.1f} ms", f"<= {FIRST_AUDIO_TARGET_MS:.0f} ms",
                    p50 <= FIRST_AUDIO_TARGET_MS)
        res.note(f"first-audio runs: {meter.summary()}")
        audio = 0.0
        for fmt in ("pcm", "mp3"):  # pcm first: its length is the paragraph's seconds of audio
            runs = [await http_speech(http, url, PARAGRAPH, fmt) for _ in range(cfg["rounds"])]
            first, whole, size = sorted(runs, key=lambda run: run[1])[len(runs) // 2]
            if fmt == "pcm":
                audio = size / 2 / 24_000
            res.add("2", f"real-time factor through the gateway, paragraph as {fmt} (whole response)",
                    f"{whole / 1000 / audio:.4f} ({audio / (whole / 1000):.0f}x real time)")
            res.note(f"paragraph as {fmt}: first byte {first:.0f} ms, whole {whole:.0f} ms, {size:,} bytes, "
                     f"{audio:.1f} s of audio")
    finally:
        await http.close()
        await nc.close()


async def bench(cfg: dict[str, Any], infra: EmbeddedStack, procs: list[ServiceProcess], res: Results) -> None:
    say("engine alone (in this process)")
    await engine_figures(cfg, res)
    await stack_figures(cfg, infra, procs, res)


def write_results(res: Results, quick: bool, outcome: harness.Outcome) -> str:
    others = CpuMeter.others or [0.0]
    load = outcome.load
    about = [
        "Model: hibari-tts 0.2.1 (voice heart, 24 kHz, one ONNX thread, one synthesis at a time per worker).",
        "Texts: multi-sentence (a 10-20 word first sentence, then three short ones); time to first audio "
        "needs only the first sentence, or its first clause where the worker cuts it there (see the notes). "
        "Client, gateway, worker and nats-server share the same cores.",
        f"Noise: processes outside the bench used {max(others):.2f} of the {os.cpu_count()} cores during the "
        f"end-to-end first-audio runs (load average {load[0]} at start, {load[1]} at the end)"
        + ("; figures taken with that much other load are noisy (slower)." if max(others) > 0.2 else "."),
    ]
    text = harness.markdown(
        "InferBus TTS benchmark", "bench_tts.py", quick, outcome, about, res.table(), res.notes
    )
    write_section(RESULTS_PATH, "tts", text)
    return text


def main() -> int:
    args = harness.arguments(__doc__, "one round instead of three (~30 s)")
    cfg = QUICK if args.quick else FULL
    res = Results()
    outcome = harness.run(
        "tts", lambda infra, procs: bench(cfg, infra, procs, res), quick=args.quick, machine=machine()
    )
    if outcome is None:
        return 1
    write_results(res, args.quick, outcome)
    harness.report("tts", res.table(), outcome, RESULTS_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
