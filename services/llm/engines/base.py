"""The engine seam: what every LLM engine implements. The worker around it does policy."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple, Protocol

from contracts.errors import InferBusError
from contracts.llm import GenerateRequest, Message, TokenLogprob, ToolCallDelta

Progress = Callable[[str, float], None]


class Prepared(NamedTuple):
    """A request rendered for the engine: prompt in the engine's own form, and its token count."""

    prompt: object
    prompt_tokens: int
    plan: object = None  # how the engine samples a request that is not plain (its grammar, say)


class Piece(NamedTuple):
    text: str
    tokens: int
    finish_reason: str | None = None
    # A remote provider's own counts, on its last piece: they replace the prompt's prepared count and
    # the completion tokens counted so far (a provider's usage is what it bills).
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tool_calls: list[ToolCallDelta] | None = None
    logprobs: list[TokenLogprob] | None = None


def refuse(engine: str, request: GenerateRequest, supported: frozenset[str] = frozenset()) -> None:
    """An engine's refusal of what a request asks that it cannot do (`supported` names what it can)."""
    asked = {
        "tools": request.calls_tools,
        "response_format": request.response_format is not None,
        "logit_bias": bool(request.logit_bias),
        "logprobs": request.logprobs is not None,
        "frequency_penalty": bool(request.frequency_penalty),
        "presence_penalty": bool(request.presence_penalty),
        "reasoning_effort": request.reasoning_effort is not None,
        "seed": request.seed is not None,
    }
    for param, wanted in asked.items():
        if wanted and param not in supported:
            raise InferBusError("unsupported_parameter", f"{param} is not supported by the {engine} engine",
                                param=param)


class Engine(Protocol):
    name: str
    capacity: int  # generations it runs at once

    async def load(self, progress: Progress) -> None: ...

    def prepare(self, request: GenerateRequest) -> Prepared: ...

    def generate(self, prepared: Prepared, request: GenerateRequest) -> AsyncIterator[Piece]: ...

    async def close(self) -> None: ...


class Put(Protocol):
    def __call__(self, item: Piece | BaseException, /) -> None: ...


class Feeding(Protocol):
    """An engine that can also hand its pieces straight to the worker, from event-loop callbacks: no task and
    no async generator per generation (the worker uses `generate` through a pump task otherwise). `feed` puts
    each piece (or the exception that ends it) with `put`, calls `done` after the last, and returns what stops
    it early (the caller left); what it raises at once is the request's error."""

    def feed(self, prepared: Prepared, request: GenerateRequest, put: Put,
             done: Callable[[], None]) -> Callable[[], None]: ...


def with_system_prompt(messages: list[Message], system_prompt: str | None) -> list[dict[str, str]]:
    """Messages as template dicts; a deployment's default system prompt when the caller sent none."""
    rendered = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in messages]
    if system_prompt and not any(m["role"] == "system" for m in rendered):
        rendered.insert(0, {"role": "system", "content": system_prompt})
    return rendered


def within_context(ids: list[int], n_ctx: int) -> Prepared:
    """Token ids as a Prepared prompt, refused when they leave no room to generate."""
    if len(ids) >= n_ctx:
        raise InferBusError(
            "context_length_exceeded", f"this model's context is {n_ctx} tokens; the prompt has {len(ids)}"
        )
    return Prepared(prompt=ids, prompt_tokens=len(ids))


def hf_token_ids(tokenizer: Any, request: GenerateRequest, system_prompt: str | None) -> list[int]:
    """A request as token ids through a Hugging Face tokenizer and its chat template."""
    if request.messages is None:
        return [int(i) for i in tokenizer.encode(request.prompt or "")]
    return chat_template_ids(tokenizer, with_system_prompt(request.messages, system_prompt))


def chat_template_ids(tokenizer: Any, messages: list[dict[str, Any]], **extra: Any) -> list[int]:
    """Template messages (and the template's extras: `tools`) as token ids through a Hugging Face tokenizer."""
    if not getattr(tokenizer, "chat_template", None):
        raise InferBusError("invalid_request", "this model has no chat template; use /v1/completions")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                        **extra)
    if not isinstance(ids, list):  # a BatchEncoding on tokenizers that ignore return_dict
        ids = list(ids["input_ids"])
    return [int(i) for i in ids]
