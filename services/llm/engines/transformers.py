"""transformers engine: the same GGUF dequantized (fp32 on CPU; bf16 on a GPU), decoded token by token."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from contracts.llm import GenerateRequest
from services.llm.engines.base import Piece, Prepared, Progress, hf_token_ids, refuse, within_context
from services.runtime.threads import iterate_in_thread


class TransformersEngine:
    name = "transformers"
    capacity = 1

    def __init__(
        self,
        model_path: str | None = None,
        *,
        n_ctx: int = 2048,
        n_threads: int = 0,
        system_prompt: str | None = None,
        device: str = "cpu",
        dtype: str = "auto",
    ) -> None:
        if model_path is None:
            from services.llm.engines.llamacpp import smollm2_gguf

            model_path = smollm2_gguf()
        self.model_path = model_path
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.system_prompt = system_prompt
        self.device = device  # "cpu", "cuda", "cuda:1", or "auto" (the first GPU if torch sees one)
        self.dtype = dtype  # "auto": float32 on CPU, bfloat16 on a GPU; or "float32", "bfloat16", "float16"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="transformers")
        self._model: Any = None
        self._tokenizer: Any = None

    def _load_sync(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.n_threads:
            torch.set_num_threads(self.n_threads)
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        elif self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {self.device!r}: torch sees no GPU (torch {torch.__version__})")
        if self.dtype == "auto":
            self.dtype = "float32" if self.device == "cpu" else "bfloat16"
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype {self.dtype!r}: choose auto, float32, bfloat16 or float16")
        if self.model_path.endswith(".gguf"):
            folder, name = os.path.split(self.model_path)
            kwargs: dict[str, Any] = {"gguf_file": name}
        else:
            folder, kwargs = self.model_path, {}
        self._tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, self.dtype), **kwargs)
        self._model = model.to(self.device).eval()  # type: ignore[arg-type]

    async def load(self, progress: Progress) -> None:
        progress(f"loading {os.path.basename(self.model_path)} (dequantizing; device {self.device})", 0.0)
        await asyncio.get_running_loop().run_in_executor(self._executor, self._load_sync)
        progress(f"model loaded on {self.device} ({self.dtype})", 1.0)

    def prepare(self, request: GenerateRequest) -> Prepared:
        if not request.plain:
            refuse(self.name, request, frozenset({"seed"}))
        return within_context(hf_token_ids(self._tokenizer, request, self.system_prompt), self.n_ctx)

    def generate(self, prepared: Prepared, request: GenerateRequest) -> AsyncIterator[Piece]:
        import torch

        model, tokenizer, device = self._model, self._tokenizer, self.device
        ids = prepared.prompt
        assert isinstance(ids, list)
        limit = min(request.max_tokens, self.n_ctx - len(ids))
        configured = getattr(model.generation_config, "eos_token_id", None)
        eos = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])} - {None}

        def pick(logits: torch.Tensor, gen: torch.Generator) -> int:
            if request.temperature == 0:
                return int(torch.argmax(logits))
            probs = torch.softmax(logits / request.temperature, dim=-1)
            if request.top_p < 1.0:
                sorted_p, order = torch.sort(probs, descending=True)
                keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < request.top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
            return int(torch.multinomial(probs.float(), 1, generator=gen))

        def produce(stop: threading.Event) -> Iterator[Piece]:
            gen = torch.Generator(device=device)
            gen.manual_seed(request.seed if request.seed is not None else int(torch.seed()) % 2**31)
            past: Any = None
            step = torch.tensor([ids], device=device)
            emitted: list[int] = []
            shown = ""
            with torch.inference_mode():
                for count in range(1, limit + 1):
                    if stop.is_set():
                        return
                    out = model(input_ids=step, past_key_values=past, use_cache=True)
                    past = out.past_key_values
                    token = pick(out.logits[0, -1], gen)
                    if token in eos:
                        yield Piece("", 0, "stop")
                        return
                    emitted.append(token)
                    text = tokenizer.decode(emitted, skip_special_tokens=True)
                    delta = ""
                    if not text.endswith("\ufffd"):  # an incomplete UTF-8 character waits for the next token
                        delta, shown = text[len(shown) :], text
                    yield Piece(delta, 1, "length" if count == limit else None)
                    step = torch.tensor([[token]], device=device)

        return iterate_in_thread(self._executor, produce)

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
