#!/usr/bin/env python
"""Benchmark a real-time voice turn: end of user speech -> first audio byte of the answer, stage by stage.

    python bench/bench_voice.py [--quick]

Starts the embedded stack, a gateway, the default LLM worker (llama.cpp, SmolLM2-135M), the ASR
worker (faster-whisper tiny.en) and the TTS worker (hibari), then runs N turns per turn-detection
setting (full 20, quick 4), each on a fresh `/v1/realtime` session as a microphone would: 20 ms pcm16
frames sent in real time, a question spoken by hibari, then silence until the answer's first audio
arrives. Per turn it times, from the moment the last frame of speech was sent, what the client sees
(speech_stopped, the transcript, the first text delta, the first audio delta) and, from the gateway's
`speculation_taken` log line (time.monotonic(), the clock perf_counter uses on Linux), the stages of
the speculative answer: the pause detected, its transcript, the first LLM token, the first synthesized
audio, and the moment the turn ended and the held answer went out. Writes section `voice` of
bench/RESULTS.md.
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
from typing import Any

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


SETTINGS = {  # label -> turn_detection
    "server_vad (500 ms)": {"type": "server_vad"},
    "semantic_vad (auto)": {"type": "semantic_vad", "eagerness": "auto"},
}
STAGES = (("pause", "pause detected (speculation starts)"), ("transcript", "speculative transcript"),
          ("first_token", "first LLM token"), ("first_audio", "first audio synthesized (held)"),
          ("taken", "turn ended, held answer sent"))
CLIENT = (("stopped", "speech_stopped"), ("transcript_event", "transcript event"),
          ("first_text", "first answer text"), ("first_audio_event", "first answer audio (the voice turn)"))


def server_marks(gateway: ServiceProcess, start: float, since: float) -> dict[str, float]:
    """The stages of the newest speculation the gateway took after `since` (absolute monotonic seconds), and
    how many it dropped after `start` (pauses the user went on after) as `dropped`."""
    marks: dict[str, float] = {}
    dropped = 0
    for line in reversed(gateway.log().splitlines()):
        if '"speculation_' not in line:
            continue
        entry = json.loads(line)
        if entry.get("pause", 0) < start:
            break
        if entry["event"] == "speculation_taken" and not marks and entry.get("taken", 0) > since:
            marks = {k: float(entry[k]) for k, _ in STAGES if k in entry}
        elif entry["event"] == "speculation_dropped" and marks and entry["pause"] < marks["pause"]:
            dropped += 1
    return {**marks, "dropped": dropped} if marks else {}


async def turn(http: aiohttp.ClientSession, url: str, pcm: bytes, td: dict[str, Any],
               gateway: ServiceProcess) -> dict[str, float]:
    marks: dict[str, float] = {}
    async with http.ws_connect(url + "/v1/realtime?model=smollm2-135m-instruct",
                               headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as ws:
        await ws.send_str(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "max_output_tokens": 48, "temperature": 0,
            "audio": {"input": {"turn_detection": td}}}}))
        done = asyncio.Event()

        async def listen() -> None:
            async for msg in ws:
                event = json.loads(msg.data)
                kind = event["type"]
                now = time.perf_counter()
                names = {"input_audio_buffer.speech_stopped": "stopped",
                         "conversation.item.input_audio_transcription.completed": "transcript_event",
                         "response.output_audio_transcript.delta": "first_text",
                         "response.output_audio.delta": "first_audio_event"}
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
    marks.update(server_marks(gateway, start, end))
    dropped = marks.pop("dropped", 0.0)
    return {**{k: (v - end) * 1000 for k, v in marks.items() if k != "end_of_speech"}, "dropped": dropped}


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
        async with aiohttp.ClientSession() as http:
            await turn(http, url, spoken[0], SETTINGS["server_vad (500 ms)"], gateway)  # warm-up
            for label, td in SETTINGS.items():
                results: list[dict[str, float]] = []
                for n in range(turns):
                    marks = await turn(http, url, spoken[n % len(spoken)], td, gateway)
                    results.append(marks)
                    say(f"{label} turn {n + 1}/{turns}: " + ", ".join(f"{k} {v:.0f}" for k, v in marks.items()))
                rows.extend(table_rows(label, results))
                drops = sum(r["dropped"] for r in results)
                rows.append([label, "speculations dropped (the user went on after a pause)", f"{drops:.0f}",
                             "—", f"{len(results)} turns", "—", "—"])
    finally:
        await nc.close()


def table_rows(label: str, results: list[dict[str, float]]) -> list[list[str]]:
    out = []
    for key, name in (*STAGES, *CLIENT):
        values = [r[key] for r in results if key in r]
        if not values:
            continue
        voice = key == "first_audio_event"
        side = "server" if key in dict(STAGES) else "client"
        out.append([label, f"{side}: {name}", f"{pct(values, 0.5):.0f} ms", f"{pct(values, 0.9):.0f} ms",
                    f"{len(values)}/{len(results)}", "<= 800 ms" if voice else "—",
                    ("yes" if pct(values, 0.5) <= 800 else "no") if voice else "—"])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    turns = 4 if args.quick else 20
    rows: list[list[str]] = []
    outcome = harness.run(
        "voice", lambda infra, procs: bench(turns, infra, procs, rows), quick=args.quick, machine=machine()
    )
    if outcome is None:
        return 1
    table = ["| Turn detection | From the end of the user's speech to ... | p50 | p90 | turns | Target | Met? |",
             "|---|---|---|---|---|---|---|", *["| " + " | ".join(r) + " |" for r in rows]]
    text = "\n".join([
        "# Real-time voice turn (`/v1/realtime`)",
        "",
        f"- Date: {outcome.started.strftime('%Y-%m-%d %H:%M UTC')} "
        f"({'--quick' if args.quick else 'full'} run, {outcome.elapsed:.0f} s)",
        f"- Machine: {machine()}",
        "- Command: `python bench/bench_voice.py" + (" --quick" if args.quick else "") + "`",
        "- Each turn: a fresh session, 20 ms pcm16 frames sent in real time (0.3 s of silence, a question "
        "spoken by hibari, then silence as a live microphone would); Silero VAD turn detection, a speculative "
        "answer started at the first 160 ms pause (held until the turn ends), faster-whisper tiny.en in a "
        "short encoder window, SmolLM2-135M on llama.cpp (temperature 0), hibari from the answer's first "
        "clause; all on the same 2 cores as the client.",
        "- `server:` rows are the gateway's own stage times for the speculation it took (log line "
        "`speculation_taken`); `client:` rows are what the client saw. A turn with no server row was "
        "answered without speculation.",
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
