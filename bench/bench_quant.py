"""The llama.cpp engine's weight types side by side: decode step times and perplexity of each `requantize` kind.

    python bench/bench_quant.py [--quick] [--kinds q4_1,q8_0,q4_0]

For SmolLM2-135M-Instruct (the shipped Q4_1, and each kind the engine's `requantize` option converts it to, made
with the engine's own `requantized` into a temporary cache), on raw llama_decode with the engine's context
settings (a KV stream per sequence, bf16 or f16 cells as `kv_cache: auto` picks, no flash attention):

  - one sequence, one token a step, on 1 and on 2 threads (the engine's single-stream step, and every core);
  - 4 and 8 sequences, one token each a step, on 2 threads (the engine's wide steps);
  - perplexity on README.md (512-token windows, the second half of each scored).

Median of `steps` steps after a 64-token prompt per sequence. Prints "[bench] ..." progress lines and a table,
and writes section `quant` of bench/RESULTS.md (or of the file INFERBUS_BENCH_RESULTS names). No bus, no
services: what the weights cost the engine, nothing else.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_spine import machine  # noqa: E402
from bench.harness import say  # noqa: E402
from bench.results import write_section  # noqa: E402
from services.llm.engines.llamacpp import REQUANTIZE, native_bf16, requantized, smollm2_gguf  # noqa: E402
from services.llm.engines.llamacpp_batch import GGML_BF16, GGML_F16  # noqa: E402

RESULTS_PATH = Path(os.environ.get("INFERBUS_BENCH_RESULTS", ROOT / "bench" / "RESULTS.md"))
SHAPES = ((1, 1), (1, 2), (4, 2), (8, 2))  # (sequences a step, threads)
WINDOW = 512


def put(batch: Any, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
    """Token `i` of a llama_batch: `token` at `pos` of sequence `seq`, with or without its logits."""
    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
    batch.seq_id[i][0] = seq


def measure(path: str, tokens: list[int], steps: int, score_windows: int) -> tuple[dict[tuple[int, int], float], float]:
    """Median ms per decode step for each shape, and perplexity."""
    import llama_cpp

    model = llama_cpp.llama_model_load_from_file(path.encode(), llama_cpp.llama_model_default_params())
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = WINDOW * 8
    params.n_seq_max = 8
    params.kv_unified = False
    params.n_batch = params.n_ubatch = WINDOW
    params.n_threads = params.n_threads_batch = 2
    params.type_k = params.type_v = GGML_BF16 if native_bf16() else GGML_F16
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model, params)
    batch = llama_cpp.llama_batch_init(WINDOW, 0, 1)
    times: dict[tuple[int, int], float] = {}
    try:
        prompt = tokens[:64]
        for seq in range(8):
            batch.n_tokens = len(prompt)
            for i, token in enumerate(prompt):
                put(batch, i, token, i, seq, i == len(prompt) - 1)
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed on the prompt")
        memory = llama_cpp.llama_get_memory(ctx)
        for sequences, threads in SHAPES:
            llama_cpp.llama_set_n_threads(ctx, threads, threads)
            took = []
            for step in range(steps):
                batch.n_tokens = sequences
                for seq in range(sequences):
                    put(batch, seq, tokens[64 + step], 64, seq, True)
                start = time.perf_counter()
                if llama_cpp.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed on a step")
                took.append(time.perf_counter() - start)
                for seq in range(sequences):  # the same position next step: every step sees the same cache
                    llama_cpp.llama_memory_seq_rm(memory, seq, 64, -1)
            times[(sequences, threads)] = sorted(took)[len(took) // 2] * 1000
    finally:
        llama_cpp.llama_free(ctx)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = WINDOW
    params.n_threads = params.n_threads_batch = 2
    ctx = llama_cpp.llama_init_from_model(model, params)
    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    nll, scored = 0.0, 0
    try:
        for start in range(0, min(len(tokens) - WINDOW, score_windows * WINDOW), WINDOW):
            chunk = tokens[start : start + WINDOW]
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            batch.n_tokens = WINDOW
            for i, token in enumerate(chunk):
                put(batch, i, token, i, 0, True)
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed on a perplexity window")
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(WINDOW, vocab)).astype(np.float64)
            rows = logits[WINDOW // 2 - 1 : WINDOW - 1]
            top = rows.max(axis=1)
            lse = top + np.log(np.exp(rows - top[:, None]).sum(axis=1))
            nll += float((lse - rows[np.arange(len(rows)), chunk[WINDOW // 2 :]]).sum())
            scored += len(rows)
    finally:
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_model_free(model)
    return times, math.exp(nll / scored)


def readme_tokens(source: str) -> list[int]:
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(source.encode(), params)
    text = (ROOT / "README.md").read_text(encoding="utf-8")[:24000].encode()
    buf = (llama_cpp.llama_token * 16000)()
    n = llama_cpp.llama_tokenize(llama_cpp.llama_model_get_vocab(model), text, len(text), buf, 16000, True, False)
    llama_cpp.llama_model_free(model)
    if n <= 0:
        raise RuntimeError("could not tokenize README.md")
    return list(buf[:n])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 steps a shape and 3 perplexity windows")
    parser.add_argument("--kinds", default="q4_1," + ",".join(REQUANTIZE), help="comma-separated; q4_1 = shipped")
    args = parser.parse_args()
    steps, windows = (20, 3) if args.quick else (60, 10)
    import llama_cpp

    llama_cpp.llama_backend_init()
    source = smollm2_gguf()
    tokens = readme_tokens(source)
    started, t0 = dt.datetime.now(dt.UTC), time.perf_counter()
    say(f"{'quick' if args.quick else 'full'} run; machine: {machine()}; {len(tokens)} README tokens")
    rows = []
    with tempfile.TemporaryDirectory(prefix="inferbus-bench-quant-") as cache:
        for kind in args.kinds.split(","):
            path = source if kind == "q4_1" else str(requantized(source, kind, Path(cache), lambda s, f: say(s)))
            say(f"{kind}: measuring {steps} steps a shape, perplexity on {windows} windows")
            times, ppl = measure(path, tokens, steps, windows)
            one = times[(1, 1)]
            rows.append(
                f"| {kind}{' (shipped)' if kind == 'q4_1' else ''} | {os.path.getsize(path) / 2**20:.0f} | "
                + " | ".join(f"{times[s]:.2f}" for s in SHAPES)
                + f" | {1000 / one:.0f} | {8 * 1000 / times[(8, 2)]:.0f} ({8 * one / times[(8, 2)]:.2f}x)"
                + f" | {ppl:.2f} |"
            )
            say(rows[-1])
    header = ("| weights | MiB | 1 seq, 1 thread (ms/step) | 1 seq, 2 threads | 4 seqs, 2 threads | "
              "8 seqs, 2 threads | tokens/s, 1 seq on 1 thread | tokens/s, 8 seqs on 2 threads (vs 1 seq on 1 "
              "thread) | perplexity |\n"
              "|---|---|---|---|---|---|---|---|---|")
    text = "\n".join([
        "# llama.cpp weight types (`requantize`): decode steps and perplexity",
        "",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC ({'quick' if args.quick else 'full'} run, "
        f"{time.perf_counter() - t0:.0f} s)",
        f"- Machine: {machine()}",
        f"- Command: `python bench/bench_quant.py{' --quick' if args.quick else ''}`",
        "- Model: SmolLM2-135M-Instruct, the shipped Q4_1 GGUF (its token embedding Q8_0) and what the engine's "
        "`requantize` converts it to; raw llama_decode with the engine's context settings (a KV stream per "
        f"sequence, {'bf16' if native_bf16() else 'f16'} cells, no flash attention); each sequence holds a "
        f"64-token prompt; median of {steps} steps. Perplexity: README.md, {WINDOW}-token windows, the second half "
        "of each scored.",
        "",
        header,
        *rows,
        "",
    ])
    write_section(RESULTS_PATH, "quant", text)
    say(f"wrote section quant of {RESULTS_PATH.name}")


if __name__ == "__main__":
    main()
