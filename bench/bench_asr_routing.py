#!/usr/bin/env python
"""Benchmark whisper-1's language routing: the language-identification pass, and English against German.

    python bench/bench_asr_routing.py [--quick]

Loads whisper-base in this process for the language-id figures (one encoder pass over the first 30 s, in
Whisper's full window and in a short clip's own window) and their accuracy on a small set (hibari English,
espeak-ng German, Spanish and French). Then starts an embedded nats-server, PostgreSQL and Redis, a gateway
and two ASR workers (whisper-tiny-en, whisper-base) and times whole requests through the gateway on ~5 s
clips: whisper-1 on English (identified by base, transcribed by tiny.en) and on German (identified and
transcribed by base in one request), each beside its direct route (the model named, the language given).

Prints "[bench] ..." progress lines and a table, and writes section `asr-routing` of bench/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from bench import harness  # noqa: E402
from bench.bench_spine import Results, machine, say  # noqa: E402
from bench.results import write_section  # noqa: E402
from services.runtime.embedded import free_port  # noqa: E402
from services.runtime.local import EmbeddedStack, ServiceProcess, settings_env, wait_http  # noqa: E402
from services.speech.asr import audio as audio_io  # noqa: E402
from services.speech.voiceset import wav  # noqa: E402

ADMIN_KEY = "ib-bench-admin-" + "r" * 24
RESULTS_PATH = ROOT / "bench" / "RESULTS.md"
FULL = {"runs": 7}
QUICK = {"runs": 3}
ENGLISH = [
    "The quick brown fox jumps over the lazy dog. Our train leaves the station at noon on Friday.",
    "She opened the window and listened to the birds outside. The weather was cold and windy.",
    "He bought fresh bread and cheese at the market, then walked home along the river.",
]
FOREIGN = {
    "de": ["Guten Morgen. Heute ist das Wetter sehr schön, und wir gehen in den Park.",
           "Ich wohne seit zehn Jahren in Berlin und arbeite in einer kleinen Bäckerei am Markt.",
           "Am Abend kochen wir zusammen, und danach lesen wir ein Buch im Garten."],
    "es": ["Buenos días. Hoy hace muy buen tiempo y vamos al parque con los niños.",
           "Mi hermana vive en Madrid y trabaja en un hospital grande del centro."],
    "fr": ["Bonjour. Aujourd'hui il fait très beau, et nous allons au parc avec les enfants.",
           "Ma soeur habite à Paris et travaille dans un grand hôpital du centre."],
}


def clips() -> list[tuple[str, bytes]]:
    """(language, wav file): hibari's English, espeak-ng's other languages."""
    from hibari import SAMPLE_RATE, Hibari

    tts = Hibari()
    out = [("en", wav(tts(text, seed=i), int(SAMPLE_RATE))) for i, text in enumerate(ENGLISH)]
    for language, texts in FOREIGN.items():
        for text in texts:
            out.append((language, subprocess.run(["espeak-ng", "-v", language, "--stdout", text],
                                                 check=True, capture_output=True).stdout))
    return out


def p50(values: list[float]) -> float:
    return statistics.median(values)


async def language_id(cfg: dict[str, Any], res: Results, data: list[tuple[str, bytes]], cache: Path) -> None:
    from services.speech.asr.engines.faster_whisper import FasterWhisperEngine

    engine = FasterWhisperEngine("base", cache_dir=str(cache))
    await engine.load(lambda message, fraction: None)
    decoded = [(language, audio_io.decode(blob, 60, "clip")) for language, blob in data]
    for short in (False, True):
        engine.short_language_id = short
        times, right, wrong = [], 0, []
        for language, samples in decoded:
            for _ in range(cfg["runs"]):
                t0 = time.perf_counter()
                found = engine.detect(samples)
                times.append(time.perf_counter() - t0)
            if found.language == language:
                right += 1
            else:
                wrong.append(f"{language} {samples.size / 16_000:.1f} s as {found.language} ({found.probability:.2f})")
        window = "the clip's own window (+2 s)" if short else "Whisper's 30 s window"
        res.add("1", f"language id, whisper-base, {window}: p50 / max over {len(decoded)} clips",
                f"{p50(times) * 1000:.0f} ms / {max(times) * 1000:.0f} ms")
        res.add("1", f"language id correct, {window}", f"{right} of {len(decoded)}")
        if wrong:
            res.note(f"{window}: missed {'; '.join(wrong)}")
    await engine.close()


async def post(http: aiohttp.ClientSession, url: str, blob: bytes, **fields: str) -> tuple[float, str, str]:
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("file", blob, filename="clip.wav", content_type="audio/wav")
    for name, value in {"response_format": "verbose_json", **fields}.items():
        form.add_field(name, value)
    t0 = time.perf_counter()
    async with http.post(f"{url}/v1/audio/transcriptions", data=form) as resp:
        body = await resp.json()
        elapsed = time.perf_counter() - t0
        assert resp.status == 200, body
        return elapsed, resp.headers["x-inferbus-model"], body["language"]


async def wait_models(http: aiohttp.ClientSession, url: str, models: list[str], procs: list[ServiceProcess]) -> None:
    deadline = time.monotonic() + 180
    for model in models:
        while True:
            for proc in procs:
                proc.check_alive()
            async with http.get(f"{url}/v1/models/{model}") as resp:
                if resp.status == 200 and (await resp.json())["workers"] >= 1:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{model} worker not ready")
            await asyncio.sleep(0.2)


async def end_to_end(cfg: dict[str, Any], infra: EmbeddedStack, procs: list[ServiceProcess], res: Results,
                     english: bytes, german: bytes) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs.append(ServiceProcess("gateway", "services.gateway",
                                infra.env(INFERBUS_PORT=str(port), INFERBUS_ADMIN_KEY=ADMIN_KEY), infra.root))
    for model in ("whisper-tiny-en", "whisper-base"):
        env = infra.env(**settings_env(model=model, version="int8", data_dir=str(infra.root)))
        procs.append(ServiceProcess(f"asr-{model}", "services.speech.asr", env, infra.root))
    say("starting gateway and ASR workers (whisper-tiny-en, whisper-base)")
    await wait_http(url, procs[0])
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as http:
        await wait_models(http, url, ["whisper-tiny-en", "whisper-base"], procs)
        cases = [
            ("English, whisper-1 (base identifies, tiny.en transcribes)", english, {"model": "whisper-1"}),
            ("English, whisper-tiny-en named (no identification)", english, {"model": "whisper-tiny-en"}),
            ("German, whisper-1 (base identifies and transcribes)", german, {"model": "whisper-1"}),
            ("German, whisper-1 with language=de (straight to base)", german,
             {"model": "whisper-1", "language": "de"}),
        ]
        for _, blob, fields in cases:  # warm every path once
            await post(http, url, blob, **fields)
        times: dict[str, list[float]] = {name: [] for name, _, _ in cases}
        served: dict[str, str] = {}
        for _ in range(cfg["runs"]):  # interleaved, so drift hits every path alike
            for name, blob, fields in cases:
                elapsed, model, language = await post(http, url, blob, **fields)
                times[name].append(elapsed)
                served[name] = f"{model}, {language}"
        for name, _, _ in cases:
            res.add("2", f"{name}: p50 / max, n={len(times[name])}",
                    f"{p50(times[name]) * 1000:.0f} ms / {max(times[name]) * 1000:.0f} ms")
            res.note(f"{name}: served by {served[name]}")


async def bench(cfg: dict[str, Any], infra: EmbeddedStack, procs: list[ServiceProcess], res: Results) -> None:
    say("synthesizing the clips (hibari, espeak-ng)")
    data = clips()
    say("language identification, whisper-base in this process")
    await language_id(cfg, res, data, infra.root / "models")
    english = data[0][1]
    german = next(blob for language, blob in data if language == "de")
    for name, blob in (("English", english), ("German", german)):
        res.note(f"{name} clip: {audio_io.duration(audio_io.decode(blob, 60, name)):.1f} s")
    await end_to_end(cfg, infra, procs, res, english, german)


def write_results(res: Results, quick: bool, outcome: harness.Outcome) -> str:
    about = [
        "Models: faster-whisper int8, whisper-base (language id; German) and tiny.en (English), beam 5, "
        "each worker on every core; client, gateway, workers and nats-server share them.",
        "Clips: hibari's English voice; espeak-ng's German, Spanish and French (robotic: harder to identify "
        "than people are).",
        f"Load average {outcome.load[0]} at start, {outcome.load[1]} at the end, on {os.cpu_count()} cores.",
    ]
    text = harness.markdown("InferBus ASR language routing (whisper-1)", "bench_asr_routing.py", quick, outcome,
                            about, res.table(), res.notes)
    write_section(RESULTS_PATH, "asr-routing", text)
    return text


def main() -> int:
    args = harness.arguments(__doc__, "three runs per case instead of seven")
    cfg = QUICK if args.quick else FULL
    res = Results()
    outcome = harness.run("asr-routing", lambda infra, procs: bench(cfg, infra, procs, res), quick=args.quick,
                          machine=machine())
    if outcome is None:
        return 1
    write_results(res, args.quick, outcome)
    harness.report("asr-routing", res.table(), outcome, RESULTS_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
