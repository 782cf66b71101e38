#!/usr/bin/env python
"""Benchmark speech to text: real-time factor of faster-whisper tiny.en and base, engine-only and through the gateway.

    python bench/bench_asr.py [--quick]

Synthesizes ~30 s (--quick: ~12 s) of English speech with hibari-tts, then measures, for whisper tiny.en
and whisper base (CTranslate2 int8, cpu_threads=2, greedy decoding as the worker runs them):

  1. engine only: the worker's engine class in this process, audio already decoded (plus beam search,
     beam size 5, as a reference);
  2. through the platform: POST /v1/audio/transcriptions (a WAV upload, which goes through the JetStream
     object store when larger than INLINE_MAX) to a gateway process, an ASR worker process over NATS;
     engine-only and gateway runs alternate, so drift on a shared machine hits both;
  3. word error rate and real-time factor on a test set of our own (services/speech/voiceset.py: 16
     sentences, --quick 6, by hibari at three speeds and four espeak-ng voices, clean and with noise at
     20 and 10 dB SNR), per model, beam size (1, 5) and encoder window (short: the clip's own length
     plus 2 s; full: Whisper's 30 s), the language named; and whisper-base with the language detected;
  4. speaker diarization (services/speech/asr/diarize.py) on voiceset's three-voice conversation:
     diarization error rate against its known turns, and real-time factor.

RTF = wall time / audio duration (median of the runs); the target is RTF <= 0.1. Word error rate against
the text read is reported alongside. Starts its own embedded nats-server, PostgreSQL and Redis on free
ports; every process it starts is stopped at the end, on error too. Prints "[bench] ..." progress lines
and a table, and writes section `asr` of bench/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import io
import os
import secrets
import statistics
import sys
import time
import wave
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402

from bench import harness  # noqa: E402
from bench.bench_spine import CpuMeter, Results, machine, rss_mib  # noqa: E402
from bench.harness import say  # noqa: E402
from bench.results import write_section  # noqa: E402
from contracts.speech import INLINE_MAX  # noqa: E402
from services.runtime import bus  # noqa: E402
from services.runtime.embedded import free_port  # noqa: E402
from services.runtime.local import EmbeddedStack, ServiceProcess, settings_env, wait_http  # noqa: E402
from services.speech import voiceset  # noqa: E402
from services.speech.asr import audio as audio_io  # noqa: E402
from services.speech.asr.engines import Engine, Options, Span, create  # noqa: E402
from services.speech.wer import wer, words  # noqa: E402

ADMIN_KEY = "ib-bench-admin-" + secrets.token_hex(16)
RESULTS_PATH = ROOT / "bench" / "RESULTS.md"
TARGET_RTF = 0.1
THREADS = 2
MODELS = {"whisper-tiny-en": "tiny.en", "whisper-base": "base"}
VERSION = "int8"
FULL: dict[str, Any] = {"seconds": 30.0, "runs": 3, "set": None}
QUICK: dict[str, Any] = {"seconds": 12.0, "runs": 1, "set": 6}
PARAGRAPH = [
    "The quick brown fox jumps over the lazy dog.",
    "The weather today is cold and windy near the coast.",
    "She opened the window and listened to the birds outside.",
    "He bought fresh bread and cheese at the market.",
    "Our train leaves the station at noon on Friday.",
    "The children played in the garden until the sun went down.",
    "Please remember to lock the door when you leave the house.",
    "A small boat drifted slowly across the quiet lake.",
    "The library closes early on weekends during the summer.",
    "They painted the kitchen a bright shade of yellow.",
]


# ---- speech and scoring ---------------------------------------------------------------------


def synthesize(seconds: float) -> tuple[bytes, str, float]:
    """(WAV bytes at 24 kHz, the text read, duration): sentences of PARAGRAPH until `seconds` of audio."""
    from hibari import SAMPLE_RATE, Hibari

    tts = Hibari()
    pause = np.zeros(int(SAMPLE_RATE * 0.3), np.float32)
    parts: list[npt.NDArray[np.float32]] = []
    read: list[str] = []
    total = 0
    while total < seconds * SAMPLE_RATE:
        sentence = PARAGRAPH[len(read) % len(PARAGRAPH)]
        parts += [tts(sentence, seed=len(read)), pause]
        read.append(sentence)
        total += parts[-2].size + pause.size
    samples = np.concatenate(parts)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes())
    return buf.getvalue(), " ".join(read), samples.size / SAMPLE_RATE


# ---- engine in this process, and the platform ---------------------------------------------


async def load_engine(weights: str, beam_size: int, cache: Path, **more: Any) -> tuple[Engine, float]:
    options = {"weights": weights, "cpu_threads": THREADS, "beam_size": beam_size, "cache_dir": str(cache), **more}
    engine = create("faster-whisper", options)
    t0 = time.perf_counter()
    await engine.load(lambda step, fraction: None)
    return engine, time.perf_counter() - t0


async def engine_run(engine: Engine, audio: audio_io.Audio, language: str | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    spans = [item async for item in engine.transcribe(audio, Options(language=language)) if isinstance(item, Span)]
    return time.perf_counter() - t0, "".join(s.text for s in spans)


async def test_set(cache: Path, res: Results, clips: list[voiceset.Clip]) -> None:
    """WER and RTF on the set for each model, beam and window; the best WER within the RTF target wins."""
    seconds = sum(c.audio.size for c in clips) / voiceset.RATE
    total_words = sum(len(words(c.text)) for c in clips)
    voices = sorted({f"{c.voice.engine}:{c.voice.name}@{c.voice.rate:g}" for c in clips})
    res.note(f"test set: {len(clips)} clips, {seconds:.1f} s, {total_words} words; voices {', '.join(voices)}")
    scores: dict[str, tuple[float, float]] = {}
    runs: list[tuple[str, str, int, str, str | None]] = [
        (model, weights, beam, window, "en")
        for model, weights in MODELS.items()
        for window in ("short", "full")
        for beam in (1, 5)
    ]
    runs.append(("whisper-base", "base", 1, "short", None))
    for model, weights, beam, window, language in runs:
        engine, _ = await load_engine(weights, beam, cache, short_window_s=20.0 if window == "short" else 0.0)
        errors = 0.0
        wall = 0.0
        by_condition: dict[str, list[float]] = {}
        meter = CpuMeter({"bench": os.getpid()})
        try:
            with meter:
                for clip in clips:
                    took, text = await engine_run(engine, clip.audio, language)
                    wall += took
                    n = len(words(clip.text))
                    errors += wer(clip.text, text) * n
                    by_condition.setdefault(clip.condition, []).append(wer(clip.text, text))
        finally:
            await engine.close()
        label = f"{model}, beam {beam}, {window} window" + ("" if language else ", language detected")
        rate, rtf = errors / total_words, wall / seconds
        if language:
            scores[label] = (rate, rtf)
        res.add("3", f"set: {label}: WER / RTF", f"{rate:.3f} / {rtf:.3f}", f"RTF <= {TARGET_RTF}", rtf <= TARGET_RTF)
        res.note(f"set, {label}: WER by condition " + ", ".join(
            f"{k} {statistics.mean(v):.3f}" for k, v in sorted(by_condition.items())) + f"; {meter.summary()}")
        say(f"set: {label}: WER {rate:.3f}, RTF {rtf:.3f}")
    within = {k: v for k, v in scores.items() if v[1] <= TARGET_RTF} or scores
    best = min(within, key=lambda k: (round(within[k][0], 3), within[k][1]))
    res.add("3", "set: best WER within the RTF target", best)


def start_gateway(infra: EmbeddedStack, procs: list[ServiceProcess]) -> tuple[ServiceProcess, str]:
    port = free_port()
    env = infra.env(INFERBUS_PORT=str(port), INFERBUS_ADMIN_KEY=ADMIN_KEY)
    proc = ServiceProcess("gateway", "services.gateway", env, infra.root)
    procs.append(proc)
    return proc, f"http://127.0.0.1:{port}"


def start_asr(infra: EmbeddedStack, model: str, procs: list[ServiceProcess]) -> ServiceProcess:
    settings = {
        "model": model,
        "version": VERSION,
        "engine_options": {"cpu_threads": THREADS},
        "data_dir": str(infra.root),
    }
    proc = ServiceProcess(f"asr-{model}", "services.speech.asr", infra.env(**settings_env(**settings)), infra.root)
    procs.append(proc)
    return proc


async def wait_asr(nc: bus.Connection, http: aiohttp.ClientSession, url: str, model: str, proc: ServiceProcess) -> None:
    """Ready in its micro stats, then listed by the gateway with a live worker."""
    deadline = time.monotonic() + 180
    ready = False
    while time.monotonic() < deadline and not ready:
        proc.check_alive()
        stats = await bus.service_stats(nc, "inferbus-asr", wait=0.2)
        ready = any(s.get("pid") == proc.pid and s.get("ready") for s in stats)
    while time.monotonic() < deadline and ready:
        async with http.get(f"{url}/v1/models/{model}") as resp:
            if resp.status == 200 and (await resp.json())["workers"] >= 1:
                return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{model} worker not ready:\n{proc.log()[-3000:]}")


async def gateway_run(http: aiohttp.ClientSession, url: str, model: str, wav: bytes) -> tuple[float, str]:
    form = aiohttp.FormData()
    form.add_field("file", wav, filename="speech.wav", content_type="audio/wav")
    form.add_field("model", model)
    t0 = time.perf_counter()
    async with http.post(f"{url}/v1/audio/transcriptions", data=form) as resp:
        body = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"transcription failed: {resp.status} {body}")
    return time.perf_counter() - t0, str(body["text"])


def runs_text(walls: list[float]) -> str:
    return ", ".join(f"{w:.2f}" for w in walls) + " s"


async def bench(cfg: dict[str, Any], infra: EmbeddedStack, procs: list[ServiceProcess], res: Results) -> None:
    say(f"synthesizing ~{cfg['seconds']:.0f} s of speech with hibari-tts")
    wav, reference, seconds = synthesize(cfg["seconds"])
    audio = audio_io.decode(wav, 3600)
    say(f"{seconds:.1f} s of audio, {len(words(reference))} words, {len(wav) / 1024:.0f} KiB WAV "
        f"({'through the object store' if len(wav) > INLINE_MAX else 'inline'})")
    say("starting gateway and ASR workers")
    gateway, url = start_gateway(infra, procs)
    workers = {model: start_asr(infra, model, procs) for model in MODELS}
    nc = await bus.connect(infra.nats_url, "bench-asr", identity=infra.identity())
    cache = infra.root / "models"
    try:
        await wait_http(url, gateway)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as http:
            for model, proc in workers.items():
                await wait_asr(nc, http, url, model, proc)
            for model, weights in MODELS.items():
                proc = workers[model]
                say(f"{model}: engine only ({weights}, int8, {THREADS} threads, beam 5) and through the gateway, "
                    f"interleaved, {cfg['runs']} run(s) each")
                engine, load_s = await load_engine(weights, 5, cache)
                await gateway_run(http, url, model, wav)  # first request: connection pool, media bucket
                engine_walls: list[float] = []
                gateway_walls: list[float] = []
                engine_meter = CpuMeter({"bench": os.getpid()})
                gateway_meter = CpuMeter({"gateway": gateway.pid, "worker": proc.pid, "nats": infra.nats_pid})
                engine_text = gateway_text = ""
                try:
                    for _ in range(cfg["runs"]):
                        with engine_meter:
                            wall, engine_text = await engine_run(engine, audio)
                        engine_walls.append(wall)
                        with gateway_meter:
                            wall, gateway_text = await gateway_run(http, url, model, wav)
                        gateway_walls.append(wall)
                finally:
                    await engine.close()
                engine_rtf = statistics.median(engine_walls) / seconds
                gateway_rtf = statistics.median(gateway_walls) / seconds
                added = statistics.median(g - e for g, e in zip(gateway_walls, engine_walls, strict=True))
                target = f"<= {TARGET_RTF}"
                res.add("1", f"{model}: engine only, RTF", f"{engine_rtf:.3f}", target, engine_rtf <= TARGET_RTF)
                res.add("2", f"{model}: gateway HTTP -> NATS -> worker, RTF", f"{gateway_rtf:.3f}", target,
                        gateway_rtf <= TARGET_RTF)
                res.add("2", f"{model}: added by the platform (paired runs, median)", f"{added * 1000:.0f} ms")
                res.add("1", f"{model}: WER engine only / through the gateway",
                        f"{wer(reference, engine_text):.3f} / {wer(reference, gateway_text):.3f}")
                rss, hwm = rss_mib(proc.pid)
                res.note(
                    f"{model}: engine load {load_s:.1f} s; engine runs {runs_text(engine_walls)}, "
                    f"{engine_meter.summary()} (last run); gateway runs {runs_text(gateway_walls)}, "
                    f"{gateway_meter.summary()} (last run); "
                    f"worker RSS {rss:.0f} MiB (peak {hwm:.0f} MiB)"
                )
                say(f"{model}: reference, engine only with greedy decoding (beam 1)")
                engine, _ = await load_engine(weights, 1, cache)
                beam: list[float] = []
                try:
                    for _ in range(cfg["runs"]):
                        wall, text = await engine_run(engine, audio)
                        beam.append(wall)
                finally:
                    await engine.close()
                res.add("1", f"{model}: reference, engine only, greedy (beam 1), RTF / WER",
                        f"{statistics.median(beam) / seconds:.3f} / {wer(reference, text):.3f}")
                res.note(f"{model} greedy: engine runs {runs_text(beam)}")
    finally:
        await nc.close()
    say("building the test set (hibari and espeak-ng voices, speeds, noise)")
    await test_set(infra.root / "models", res, voiceset.build(cfg["set"]))
    if voiceset.espeak_available():
        say("diarization: the three-voice conversation")
        await asyncio.to_thread(diarization, res, cfg["runs"])
    else:
        res.note("diarization not measured: espeak-ng (Debian) is not installed")


def diarization(res: Results, runs: int) -> None:
    from services.speech.asr.diarize import Diarizer, Turn, error_rate

    spoken = voiceset.conversation()
    truth = [Turn(*t) for t in spoken.turns]
    diarizer = Diarizer()
    diarizer.load()
    walls, rates = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        found = diarizer.diarize(spoken.audio)
        walls.append(time.perf_counter() - t0)
        rates.append(error_rate(truth, found, spoken.duration))
    rtf = statistics.median(walls) / spoken.duration
    res.add("4", "diarization (3 voices, 7 turns): error rate / RTF", f"{statistics.median(rates):.3f} / {rtf:.3f}",
            "DER <= 0.15", statistics.median(rates) <= 0.15)
    res.note(f"diarization: {spoken.duration:.1f} s conversation, runs {runs_text(walls)}; speakers found "
             f"{len({t.speaker for t in found})}")


def write_results(res: Results, quick: bool, outcome: harness.Outcome) -> str:
    others = CpuMeter.others or [0.0]
    other_mean, other_max = sum(others) / len(others), max(others)
    about = [
        "Audio: English speech synthesized by hibari-tts (24 kHz WAV), sentences of a fixed paragraph; WER is "
        "against that text (lower case, punctuation removed).",
        "Test set (rows 3): services/speech/voiceset.py, our own sentences read by hibari at 0.85/1/1.25x and "
        "four espeak-ng voices, clean and with rumble-and-hiss noise at 20 and 10 dB SNR, one clip each "
        "(2-4 s: voice-turn length); WER is word errors over all the set's words; short window = the clip's "
        "own length plus 2 s of silence, full = Whisper's 30 s. Row 4: three voices in seven turns.",
        f"Engine: faster-whisper (CTranslate2) int8 on CPU, cpu_threads={THREADS}, beam 5 (the worker's default; "
        f"greedy as a reference), capacity 1; RTF = wall time / audio duration, median of the runs; "
        f"target RTF <= {TARGET_RTF}. "
        "Engine-only runs (this process, audio already decoded) and gateway runs (HTTP upload of the WAV, object "
        "store, decode and transcription in the worker process, JSON back) alternate, so drift hits both.",
        f"Noise: processes outside the bench used {other_mean:.2f} cores on average (max {other_max:.2f}) of "
        f"the {os.cpu_count()} during the measured runs"
        + (": figures taken with other load present are slower than on a quiet machine." if other_max > 0.2 else "."),
    ]
    text = harness.markdown(
        "InferBus speech-to-text benchmark", "bench_asr.py", quick, outcome, about, res.table(), res.notes
    )
    write_section(RESULTS_PATH, "asr", text)
    return text


def main() -> int:
    args = harness.arguments(__doc__, "~12 s of audio, one run each (~1 minute)")
    cfg = QUICK if args.quick else FULL
    res = Results()
    outcome = harness.run(
        "asr", lambda infra, procs: bench(cfg, infra, procs, res), quick=args.quick, machine=machine()
    )
    if outcome is None:
        return 1
    write_results(res, args.quick, outcome)
    harness.report("asr", res.table(), outcome, RESULTS_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
