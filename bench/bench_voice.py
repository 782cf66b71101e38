#!/usr/bin/env python
"""Benchmark a real-time voice turn: end of user speech -> first audio byte of the answer.

    python bench/bench_voice.py [--quick]

Starts the embedded stack, a gateway, the default LLM worker (llama.cpp, SmolLM2-135M), the ASR
worker (faster-whisper tiny.en) and the TTS worker (hibari), then runs N turns (full 10, quick 4), each
on a fresh `/v1/realtime` session as a microphone would: 20 ms pcm16 frames sent in real time, the
question spoken by hibari, then silence until the answer's first audio arrives. Per turn it times,
from the moment the last frame of speech was sent: speech_stopped (the VAD's 500 ms silence
hangover is part of every turn), the transcript, the first text delta, and the first audio delta.
Writes section `voice` of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import secrets
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402

from bench import harness  # noqa: E402
from bench.bench_spine import machine, pct  # noqa: E402
from bench.harness import say  # noqa: E402
from bench.results import write_section  # noqa: E402
from services.runtime import bus  # noqa: E402
from services.runtime.embedded import free_port  # noqa: E402
from services.runtime.local import EmbeddedStack, ServiceProcess, wait_http, wait_worker  # noqa: E402

RATE = 24_000
FRAME = RATE * 2 // 50  # 20 ms of pcm16
ADMIN_KEY = "ib-bench-admin-" + secrets.token_hex(16)
QUESTIONS = [
    "What is the capital of France?",
    "Name a color of the sky.",
    "How many days are in a week?",
    "What do bees make?",
    "Say hello to me.",
]


def speech(text: str) -> bytes:
    from hibari import Hibari

    audio = np.asarray(Hibari()(text), dtype=np.float32)
    voiced = np.flatnonzero(np.abs(audio) > 0.02)  # trim the synthesizer's own leading/trailing silence:
    audio = audio[voiced[0] : voiced[-1] + 1]  # "end of speech" is the last voiced sample
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


async def ready(nc: bus.Connection, service: str, proc: ServiceProcess, limit_s: float = 180) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        proc.check_alive()
        if any(d.get("pid") == proc.pid and d.get("ready") for d in await bus.service_stats(nc, service, wait=0.2)):
            return
    raise TimeoutError(f"{service} not ready:\n{proc.log()[-2000:]}")


async def turn(http: aiohttp.ClientSession, url: str, pcm: bytes) -> dict[str, float]:
    marks: dict[str, float] = {}
    async with http.ws_connect(url + "/v1/realtime?model=smollm2-135m-instruct",
                               headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as ws:
        await ws.send_str(json.dumps({"type": "session.update",
                                      "session": {"type": "realtime", "max_output_tokens": 48, "temperature": 0}}))
        done = asyncio.Event()

        async def listen() -> None:
            async for msg in ws:
                event = json.loads(msg.data)
                kind = event["type"]
                now = time.perf_counter()
                names = {"input_audio_buffer.speech_stopped": "stopped",
                         "conversation.item.input_audio_transcription.completed": "transcript",
                         "response.output_audio_transcript.delta": "first_text",
                         "response.output_audio.delta": "first_audio"}
                if kind in names and names[kind] not in marks:
                    marks[names[kind]] = now
                if kind == "response.done" or kind == "error":
                    if kind == "error":
                        say(f"  error event: {event['error']}")
                    done.set()
                    return

        listener = asyncio.create_task(listen())
        silence = bytes(FRAME)
        start = time.perf_counter()
        frames = [silence] * 15 + [pcm[i : i + FRAME] for i in range(0, len(pcm), FRAME)]
        for i, frame in enumerate(frames):  # in real time, like a microphone
            await asyncio.sleep(max(0.0, start + i * 0.02 - time.perf_counter()))
            await ws.send_str(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(frame).decode()}))
        marks["end_of_speech"] = time.perf_counter()
        i = len(frames)
        while not done.is_set() and time.perf_counter() - marks["end_of_speech"] < 30:
            await asyncio.sleep(max(0.0, start + i * 0.02 - time.perf_counter()))
            await ws.send_str(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(silence).decode()}))
            i += 1
        await ws.close()
        await asyncio.gather(listener, return_exceptions=True)
    end = marks["end_of_speech"]
    return {k: (v - end) * 1000 for k, v in marks.items() if k != "end_of_speech"}


async def bench(turns: int, infra: EmbeddedStack, procs: list[ServiceProcess], rows: list[list[str]]) -> None:
    port = free_port()
    gateway = ServiceProcess("gateway", "services.gateway",
                             infra.env(INFERBUS_PORT=str(port), INFERBUS_ADMIN_KEY=ADMIN_KEY), infra.root)
    llm = ServiceProcess("llm", "services.llm", infra.env(), infra.root)
    asr = ServiceProcess("asr", "services.speech.asr", infra.env(), infra.root)
    tts = ServiceProcess("tts", "services.speech.tts", infra.env(), infra.root)
    procs += [gateway, llm, asr, tts]
    url = f"http://127.0.0.1:{port}"
    nc = await bus.connect(infra.nats_url, "bench", identity=infra.identity())
    try:
        say("loading models (llama.cpp SmolLM2, faster-whisper tiny.en, hibari)")
        await wait_worker(nc, "smollm2-135m-instruct", llm, limit_s=180)
        await ready(nc, "inferbus-asr", asr)
        await ready(nc, "inferbus-tts", tts)
        await wait_http(url, gateway)
        say("synthesizing the questions")
        spoken = [speech(q) for q in QUESTIONS]
        results: list[dict[str, float]] = []
        async with aiohttp.ClientSession() as http:
            await turn(http, url, spoken[0])  # warm-up
            for n in range(turns):
                marks = await turn(http, url, spoken[n % len(spoken)])
                results.append(marks)
                say(f"turn {n + 1}/{turns}: " + ", ".join(f"{k} {v:.0f} ms" for k, v in marks.items()))
    finally:
        await nc.close()
    for key, label in (("stopped", "speech_stopped (VAD: 500 ms of silence)"),
                       ("transcript", "transcript ready"),
                       ("first_text", "first answer text"),
                       ("first_audio", "first answer audio (the voice turn)")):
        values = [r[key] for r in results if key in r]
        target = "<= 800 ms" if key == "first_audio" else "—"
        met = ("yes" if pct(values, 0.5) <= 800 else "no") if key == "first_audio" else "—"
        rows.append([f"end of speech -> {label}", f"{pct(values, 0.5):.0f} ms", f"{max(values):.0f} ms",
                     f"{len(values)}/{len(results)}", target, met])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    turns = 4 if args.quick else 10
    rows: list[list[str]] = []
    outcome = harness.run(
        "voice", lambda infra, procs: bench(turns, infra, procs, rows), quick=args.quick, machine=machine()
    )
    if outcome is None:
        return 1
    table = ["| From the end of the user's speech to ... | p50 | max | turns | Target | Met? |",
             "|---|---|---|---|---|---|", *["| " + " | ".join(r) + " |" for r in rows]]
    text = "\n".join([
        "# Real-time voice turn (`/v1/realtime`)",
        "",
        f"- Date: {outcome.started.strftime('%Y-%m-%d %H:%M UTC')} "
        f"({'--quick' if args.quick else 'full'} run, {outcome.elapsed:.0f} s)",
        f"- Machine: {machine()}",
        "- Command: `python bench/bench_voice.py" + (" --quick" if args.quick else "") + "`",
        "- Each turn: a fresh session, 20 ms pcm16 frames sent in real time (0.3 s of silence, a question "
        "spoken by hibari, then silence as a live microphone would), server VAD with a 500 ms silence "
        "hangover, faster-whisper tiny.en, SmolLM2-135M on llama.cpp (temperature 0), hibari per sentence; "
        "all on the same 2 cores as the client.",
        "",
        *table,
        "",
        "Warnings and errors the services logged: " + ("; ".join(outcome.findings) or "none"),
        "",
    ])
    print(text)
    write_section(ROOT / "bench" / "RESULTS.md", "voice", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
