"""vLLM engine (vllm.v1 AsyncLLM): continuous batching, streamed deltas, abort frees the slot."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

from contracts.errors import InferBusError
from contracts.llm import GenerateRequest
from services.llm.engines.base import Piece, Prepared, Progress, with_system_prompt


class VllmEngine:
    name = "vllm"

    def __init__(
        self,
        model_path: str,
        *,
        n_ctx: int = 2048,
        capacity: int = 64,
        system_prompt: str | None = None,
        engine_args: dict[str, Any] | None = None,
    ) -> None:
        self.model_path = model_path
        self.n_ctx = n_ctx
        self.capacity = capacity
        self.system_prompt = system_prompt
        self.engine_args = engine_args or {}
        self._engine: Any = None
        self._tokenizer: Any = None

    async def load(self, progress: Progress) -> None:
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        progress(f"starting vLLM engine for {self.model_path}", 0.0)
        args = {
            "model": self.model_path,
            "max_model_len": self.n_ctx,
            "max_num_seqs": self.capacity,
            "enforce_eager": True,
            "disable_log_stats": True,
            **self.engine_args,
        }
        self._engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        progress("vLLM engine ready", 1.0)

    def prepare(self, request: GenerateRequest) -> Prepared:
        if request.messages is not None:
            if not getattr(self._tokenizer, "chat_template", None):
                raise InferBusError("invalid_request", "this model has no chat template; use /v1/completions")
            messages = with_system_prompt(request.messages, self.system_prompt)
            ids = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if not isinstance(ids, list):
                ids = list(ids["input_ids"])
        else:
            ids = self._tokenizer.encode(request.prompt or "")
        if len(ids) >= self.n_ctx:
            raise InferBusError(
                "context_length_exceeded", f"this model's context is {self.n_ctx} tokens; the prompt has {len(ids)}"
            )
        return Prepared(prompt=[int(i) for i in ids], prompt_tokens=len(ids))

    async def generate(self, prepared: Prepared, request: GenerateRequest) -> AsyncIterator[Piece]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        ids = prepared.prompt
        assert isinstance(ids, list)
        params = SamplingParams(
            max_tokens=min(request.max_tokens, self.n_ctx - len(ids)),
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            output_kind=RequestOutputKind.DELTA,
        )
        engine_id = f"{request.request_id}-{uuid.uuid4().hex[:6]}"
        finished = False
        try:
            async for output in self._engine.generate(TokensPrompt(prompt_token_ids=ids), params, engine_id):
                completion = output.outputs[0]
                finish = completion.finish_reason if output.finished else None
                if finish not in (None, "length"):
                    finish = "stop"
                finished = output.finished
                yield Piece(completion.text, len(completion.token_ids), finish)
        finally:
            if not finished:
                await self._engine.abort(engine_id)

    async def close(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
