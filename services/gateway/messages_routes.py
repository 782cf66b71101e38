"""Anthropic's Messages API, inbound: POST /v1/messages and /v1/messages/count_tokens for any model we serve.

The `anthropic` SDK works against the gateway: `x-api-key` (or Bearer) auth, its request and response shapes,
its stream events, tool use, and its error shape ({"type": "error", "error": {"type", "message"}}).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from contracts.errors import InferBusError, invalid
from contracts.llm import Delta, Final, GenerateRequest, Message, ResponseFormat, ToolCall, tool_of, tools_of
from contracts.messages import (
    ERROR_TYPES,
    Block,
    CountTokensRequest,
    InputMessage,
    MessageObject,
    MessagesRequest,
    MessageUsage,
    OutputConfig,
    TextBlock,
    ToolChoiceParam,
    ToolParam,
    ToolUseBlock,
)
from services.gateway.auth import KeyRecord
from services.gateway.errors import json_response
from services.gateway.formats import Outcome, named_sse
from services.gateway.openai_routes import ADMITTED, _decode, _timeout, respond
from services.gateway.state import GATEWAY, Gateway

routes = web.RouteTableDef()
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def anthropic_error(exc: InferBusError) -> web.Response:
    kind = ERROR_TYPES.get(exc.http_status, "api_error")
    message = f"{exc.param}: {exc.message}" if exc.param and exc.param not in exc.message else exc.message
    body = {"type": "error", "error": {"type": kind, "message": message}, "request_id": None}
    return json_response(exc.http_status, body, exc.headers or None)


def anthropic_errors(handler: Handler) -> Handler:
    """Errors in Anthropic's shape (the error middleware's are OpenAI's)."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except InferBusError as exc:
            return anthropic_error(exc)

    wrapped.__name__, wrapped.__doc__ = handler.__name__, handler.__doc__
    return wrapped


async def _authorize(request: web.Request, gw: Gateway) -> KeyRecord:
    key = request.headers.get("x-api-key")
    if key is None:
        return await gw.authorize(request)
    assert gw.keys is not None
    return await gw.keys.authenticate(key.strip())


def _unsupported(param: str, message: str) -> InferBusError:
    return InferBusError("unsupported_parameter", message, param=param)


# ---- request -> generation ----------------------------------------------------------------------


def _text_of(blocks: str | list[Block] | None, param: str) -> str:
    if blocks is None:
        return ""
    if isinstance(blocks, str):
        return blocks
    texts = []
    for j, block in enumerate(blocks):
        if block.type != "text":
            raise _unsupported(f"{param}[{j}].type", f"content blocks of type {block.type!r} are not supported here")
        texts.append(block.text or "")
    return "".join(texts)


def to_messages(system: str | list[Block] | None, messages: list[InputMessage]) -> list[Message]:
    out = [Message("system", _text_of(system, "system"))] if system else []
    for i, m in enumerate(messages):
        if isinstance(m.content, str):
            out.append(Message(m.role, m.content))
            continue
        texts: list[str] = []
        calls: list[ToolCall] = []
        for j, block in enumerate(m.content):
            param = f"messages[{i}].content[{j}]"
            if block.type == "text":
                texts.append(block.text or "")
            elif block.type == "tool_use" and m.role == "assistant":
                if not block.id or not block.name:
                    raise invalid(f"{param}: tool_use needs id and name", param)
                calls.append(ToolCall(block.id, block.name, json.dumps(block.input or {})))
            elif block.type == "tool_result" and m.role == "user":
                if not block.tool_use_id:
                    raise invalid(f"{param}.tool_use_id is required", f"{param}.tool_use_id")
                result = _text_of(block.content, f"{param}.content")
                out.append(Message("tool", f"Error: {result}" if block.is_error else result,
                                   tool_call_id=block.tool_use_id))
            elif block.type in ("thinking", "redacted_thinking") and m.role == "assistant":
                continue  # our models do not think aloud; a remote model's earlier thinking is not resent
            else:
                raise _unsupported(f"{param}.type", f"content blocks of type {block.type!r} are not supported")
        if texts or calls:
            out.append(Message(m.role, "".join(texts), tool_calls=calls or None))
    return out


def _tools(tools: list[ToolParam] | None, choice: ToolChoiceParam | None) -> dict[str, Any]:
    if not tools:
        if choice is not None and choice.type in ("any", "tool"):
            raise invalid("tool_choice needs tools", "tool_choice")
        return {}
    converted = []
    for i, t in enumerate(tools):
        if t.type not in (None, "custom"):
            raise _unsupported(f"tools[{i}].type", f"server tools ({t.type}) are not supported: client tools only")
        converted.append(tool_of(t.name, t.description, t.input_schema, t.strict, f"tools[{i}]"))
    mode = {"auto": "auto", "any": "required", "tool": "required", "none": "none"}[choice.type if choice else "auto"]
    named = choice.name if choice is not None and choice.type == "tool" else None
    if choice is not None and choice.type == "tool" and not named:
        raise invalid("tool_choice.name is required with type 'tool'", "tool_choice.name")
    tool_choice, tool_name = tools_of(converted, mode, named)
    parallel = not (choice is not None and choice.disable_parallel_tool_use)
    return {"tools": converted, "tool_choice": tool_choice, "tool_name": tool_name, "parallel_tool_calls": parallel}


def _check_thinking(thinking: dict[str, Any] | None) -> None:
    if thinking is not None and thinking.get("type") != "disabled":
        raise _unsupported("thinking", "extended thinking is not supported")


def to_generate(req: MessagesRequest, rid: str) -> GenerateRequest:
    if not req.model:
        raise invalid("model must not be empty", "model")
    if not req.messages:
        raise invalid("messages must hold at least one message", "messages")
    _check_thinking(req.thinking)
    for name in ("top_k", "container", "mcp_servers", "inference_geo", "speed", "diagnostics", "workspace_id",
                 "user_profile_id"):
        if getattr(req, name) is not None:
            raise _unsupported(name, f"{name} is not supported")
    if req.service_tier not in (None, "auto", "standard_only"):
        raise _unsupported("service_tier", f"service_tier {req.service_tier!r} is not offered")
    stops = req.stop_sequences or []
    if len(stops) > 4 or any(not s for s in stops):
        raise invalid("stop_sequences may hold at most 4 non-empty sequences", "stop_sequences")
    return GenerateRequest(
        request_id=rid,
        model=req.model,
        messages=to_messages(req.system, req.messages),
        max_tokens=req.max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        stop=stops,
        user=req.metadata.user_id if req.metadata is not None else None,
        **_output(req.output_config),
        **_tools(req.tools, req.tool_choice),
    )


def _output(config: OutputConfig | None) -> dict[str, Any]:
    if config is None:
        return {}
    out: dict[str, Any] = {"reasoning_effort": config.effort}
    if config.format is not None:
        out["response_format"] = ResponseFormat(type="json_schema", schema=config.format.schema, name="output")
    return out


# ---- generation -> message and events -----------------------------------------------------------


def _input(arguments: str) -> Any:
    try:
        return json.loads(arguments) if arguments else {}
    except ValueError:  # cut short by max_tokens: what there is, as text
        return {"partial_json": arguments}


class MessagesFormat:
    """A message object, or the events of its stream (message_start ... message_stop)."""

    include_usage = True

    def __init__(self, rid: str, model: str) -> None:
        self.rid = rid
        self.model = model
        self.block: int = -1  # the open content block's index
        self.open: str | None = None  # its type: "text" or "tool_use"
        self.calls: dict[int, int] = {}  # tool call index -> block index

    def served(self, model: str, provider: str | None, version: str) -> None:
        self.model = model

    def _message(self, content: list[TextBlock | ToolUseBlock], stop: str | None, usage: MessageUsage) -> MessageObject:
        return MessageObject(id=self.rid, model=self.model, content=content, stop_reason=stop,  # type: ignore[arg-type]
                             usage=usage)

    def start(self) -> bytes | None:
        message = self._message([], None, MessageUsage(0, 0))
        return (named_sse("message_start", {"type": "message_start", "message": msgspec.to_builtins(message)})
                + named_sse("ping", {"type": "ping"}))

    def _close(self) -> bytes:
        if self.open is None:
            return b""
        self.open = None
        return named_sse("content_block_stop", {"type": "content_block_stop", "index": self.block})

    def _start(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._close()
        self.block += 1
        self.open = kind
        return out + named_sse("content_block_start", {"type": "content_block_start", "index": self.block,
                                                       "content_block": block})

    def delta(self, chunk: Delta) -> bytes:
        out = b""
        if chunk.text:
            if self.open != "text":
                out += self._start("text", {"type": "text", "text": "", "citations": None})
            out += named_sse("content_block_delta", {"type": "content_block_delta", "index": self.block,
                                                     "delta": {"type": "text_delta", "text": chunk.text}})
        for d in chunk.tool_calls or ():
            if d.id is not None:
                out += self._start("tool_use", {"type": "tool_use", "id": d.id, "name": d.name, "input": {},
                                                "caller": {"type": "direct"}})
                self.calls[d.index] = self.block
            if d.arguments:
                out += named_sse("content_block_delta", {
                    "type": "content_block_delta", "index": self.calls.get(d.index, self.block),
                    "delta": {"type": "input_json_delta", "partial_json": d.arguments}})
        return out

    def end(self, final: Final) -> bytes:
        usage = {"input_tokens": final.usage.prompt_tokens, "output_tokens": final.usage.completion_tokens,
                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens_details": None,
                 "server_tool_use": None}
        stop = {"stop_reason": STOP_REASONS.get(final.finish_reason, "end_turn"), "stop_sequence": None,
                "stop_details": None, "container": None}
        return (self._close()
                + named_sse("message_delta", {"type": "message_delta", "delta": stop, "usage": usage})
                + named_sse("message_stop", {"type": "message_stop"}))

    def error(self, exc: InferBusError) -> bytes:
        kind = ERROR_TYPES.get(exc.http_status, "api_error")
        return named_sse("error", {"type": "error", "error": {"type": kind, "message": exc.message}})

    def whole(self, outcome: Outcome, final: Final) -> dict[str, Any]:
        content: list[TextBlock | ToolUseBlock] = [TextBlock(outcome.text)] if outcome.text else []
        for call_id, name, arguments in outcome.tool_calls.calls if outcome.tool_calls else ():
            content.append(ToolUseBlock(call_id, name, _input(arguments)))
        usage = MessageUsage(final.usage.prompt_tokens, final.usage.completion_tokens)
        message = self._message(content, STOP_REASONS.get(final.finish_reason, "end_turn"), usage)
        return msgspec.to_builtins(message)  # type: ignore[no-any-return]


@routes.post("/v1/messages")
@anthropic_errors
async def create_message(request: web.Request) -> web.StreamResponse:
    """Create a message (Anthropic's Messages API)."""
    gw = request.app[GATEWAY]
    key = await _authorize(request, gw)
    request[ADMITTED] = time.monotonic()
    req: MessagesRequest = await _decode(request, MessagesRequest)
    rid = "msg_" + secrets.token_hex(12)
    gen = to_generate(req, rid)
    return await respond(request, gw, gen, MessagesFormat(rid, req.model), bool(req.stream), key)


@routes.post("/v1/messages/count_tokens")
@anthropic_errors
async def count_tokens(request: web.Request) -> web.Response:
    """Count the input tokens of a message, with the serving model's own tokenizer and chat template."""
    gw = request.app[GATEWAY]
    key = await _authorize(request, gw)
    req: CountTokensRequest = await _decode(request, CountTokensRequest)
    if not req.messages:
        raise invalid("messages must hold at least one message", "messages")
    _check_thinking(req.thinking)
    rid = "count_" + secrets.token_hex(12)
    gen = GenerateRequest(request_id=rid, model=req.model, max_tokens=1, count_only=True,
                          messages=to_messages(req.system, req.messages), **_output(req.output_config),
                          **_tools(req.tools, req.tool_choice))
    grant = await gw.admit_request(key, request.path, "llm", req.model, rid)
    try:
        chunks = gw.dispatcher.generate(gen, kind="llm", timeout_s=_timeout(request, gw),
                                        headers=gw.bus_headers(request, key), key_id=key.id)
        try:
            async for chunk in chunks:
                if isinstance(chunk, Final):
                    return json_response(200, {"input_tokens": chunk.usage.prompt_tokens})
        finally:
            await chunks.aclose()
    finally:
        gw.release(key, grant, req.model)
    raise InferBusError("stream_broken", "the worker did not answer with a count")
