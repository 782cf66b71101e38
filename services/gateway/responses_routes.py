"""OpenAI's Responses API: POST /v1/responses (whole or streamed as typed events), GET/DELETE a stored one.

A response is one generation on the bus like a chat completion (same dispatch, limits, billing and request
log). Stored responses (`store`, true by default) live in PostgreSQL with the conversation they end, so that
`previous_response_id` continues it; they belong to the caller's tenant.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

import asyncpg
import msgspec
from aiohttp import web

from contracts.errors import InferBusError, invalid
from contracts.llm import (
    Delta,
    Final,
    GenerateRequest,
    Message,
    ResponseFormat,
    ToolCall,
    schema_format,
    tool_of,
    tools_of,
)
from contracts.responses import (
    ContentPart,
    CreateResponse,
    FunctionCallItem,
    IncompleteDetails,
    InputItem,
    NamedFunctionChoice,
    OutputMessage,
    OutputText,
    Reasoning,
    Response,
    ResponseError,
    ResponseUsage,
    TextConfig,
)
from services.gateway.auth import KeyRecord
from services.gateway.errors import json_response
from services.gateway.formats import Outcome, named_sse
from services.gateway.openai_routes import ADMITTED, Finished, _decode, engine_params, respond
from services.gateway.state import GATEWAY, Gateway

routes = web.RouteTableDef()
_messages = msgspec.json.Decoder(list[Message])
TEXT_PARTS = ("input_text", "output_text")
SERVICE_TIERS = (None, "auto", "default")
_FORMAT = re.compile(r"^response_format\.")
ENGINE_PARAMS = (_FORMAT, "text.format.")  # an engine's `response_format.` is this API's `text.format.`


def _unsupported(param: str, message: str) -> InferBusError:
    return InferBusError("unsupported_parameter", message, param=param)


# ---- request -> generation ----------------------------------------------------------------------


def _check(req: CreateResponse) -> None:
    if not req.model:
        raise invalid("model must not be empty", "model")
    refused = {
        "background": bool(req.background),
        "include": bool(req.include),
        "conversation": req.conversation is not None,
        "prompt": req.prompt is not None,
        "max_tool_calls": req.max_tool_calls is not None,
        "truncation": req.truncation == "auto",
        "reasoning.summary": req.reasoning is not None
        and bool(req.reasoning.summary or req.reasoning.generate_summary),
        "text.verbosity": req.text is not None and req.text.verbosity not in (None, "medium"),
    }
    for param, wanted in refused.items():
        if wanted:
            raise _unsupported(param, f"{param} is not supported")
    if req.service_tier not in SERVICE_TIERS:
        raise _unsupported("service_tier", f"service_tier {req.service_tier!r} is not offered: use 'auto' or 'default'")
    if req.stream_options is not None and not req.stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")


def _text(content: str | list[ContentPart] | None, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type in TEXT_PARTS:
            texts.append(part.text or "")
        elif part.type != "refusal":
            raise _unsupported(f"{param}[{j}].type", f"content of type {part.type!r} is not supported: text only")
    return "".join(texts)


def input_messages(items: str | list[InputItem]) -> list[Message]:
    """Input items as bus messages: function calls join their assistant turn, outputs become tool turns."""
    if isinstance(items, str):
        return [Message("user", items)]
    out: list[Message] = []
    for i, item in enumerate(items):
        kind = item.type or "message"
        if kind == "message":
            if item.role is None:
                raise invalid(f"input[{i}].role is required", f"input[{i}].role")
            out.append(Message(item.role, _text(item.content, f"input[{i}].content")))
        elif kind == "function_call":
            if not (item.call_id and item.name and item.arguments is not None):
                raise invalid(f"input[{i}]: a function_call needs call_id, name and arguments", f"input[{i}]")
            call = ToolCall(item.call_id, item.name, item.arguments)
            last = out[-1] if out else None
            if last is not None and last.role == "assistant" and last.tool_call_id is None:
                out[-1] = Message("assistant", last.content, tool_calls=[*(last.tool_calls or []), call])
            else:
                out.append(Message("assistant", "", tool_calls=[call]))
        elif kind == "function_call_output":
            if not item.call_id:
                raise invalid(f"input[{i}].call_id is required", f"input[{i}].call_id")
            out.append(Message("tool", _text(item.output, f"input[{i}].output"), tool_call_id=item.call_id))
        else:
            raise _unsupported(f"input[{i}].type", f"input items of type {kind!r} are not supported")
    return out


def _format(req: CreateResponse) -> ResponseFormat | None:
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ResponseFormat(type="json_object")
    if not fmt.name:
        raise invalid("text.format.name is required for json_schema", "text.format.name")
    return schema_format(fmt.name, fmt.schema, bool(fmt.strict), "text.format")


def to_generate(req: CreateResponse, rid: str, history: list[Message], default_max_tokens: int) -> GenerateRequest:
    _check(req)
    messages = ([Message("system", req.instructions)] if req.instructions else []) + history + input_messages(req.input)
    if not messages:
        raise invalid("input must hold at least one item", "input")
    tools = [tool_of(t.name, t.description, t.parameters, t.strict, f"tools[{i}]")
             for i, t in enumerate(req.tools or ())]
    named = req.tool_choice.name if isinstance(req.tool_choice, NamedFunctionChoice) else None
    choice, tool_name = tools_of(tools, req.tool_choice if isinstance(req.tool_choice, str) else None, named)
    return GenerateRequest(
        request_id=rid,
        model=req.model,
        messages=messages,
        max_tokens=req.max_output_tokens or default_max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        user=req.user or req.safety_identifier,
        tools=tools or None,
        tool_choice=choice,
        tool_name=tool_name,
        parallel_tool_calls=req.parallel_tool_calls is not False,
        response_format=_format(req),
        logprobs=req.top_logprobs,
        reasoning_effort=req.reasoning.effort if req.reasoning is not None else None,
    )


# ---- generation -> response object and events --------------------------------------------------


def _item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


class ResponsesFormat:
    """A response object, or the typed events of its stream (response.created ... response.completed)."""

    include_usage = True

    def __init__(self, rid: str, req: CreateResponse, created: int) -> None:
        self.rid = rid
        self.req = req
        self.created = created
        self.model = req.model
        self.seq = 0
        self.message_id: str | None = None  # the output message item, once text arrived
        self.text: list[str] = []
        self.calls: list[list[str]] = []  # [item id, call id, name, arguments] by index
        self.order: list[tuple[str, int]] = []  # ("message", 0) / ("call", index) by output_index
        self._result: Response | None = None

    def served(self, model: str, provider: str | None, version: str) -> None:
        self.model = model

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return named_sse(kind, payload)

    def _base(self, status: str, **fields: Any) -> Response:
        req = self.req
        fmt = req.text.format if req.text is not None and req.text.format is not None else None
        return Response(
            id=self.rid, created_at=self.created, status=status, model=self.model,  # type: ignore[arg-type]
            instructions=req.instructions, max_output_tokens=req.max_output_tokens,
            parallel_tool_calls=req.parallel_tool_calls is not False, previous_response_id=req.previous_response_id,
            reasoning=Reasoning(effort=req.reasoning.effort if req.reasoning else None), store=req.store is not False,
            temperature=1.0 if req.temperature is None else req.temperature,
            text=TextConfig(format=msgspec.to_builtins(fmt) if fmt is not None else {"type": "text"}),
            tool_choice=msgspec.to_builtins(req.tool_choice) if req.tool_choice is not None else "auto",
            tools=[msgspec.to_builtins(t) for t in req.tools or ()], top_p=1.0 if req.top_p is None else req.top_p,
            user=req.user if req.user is not None else msgspec.UNSET, metadata=req.metadata or {}, **fields,
        )

    def start(self) -> bytes | None:
        snapshot = msgspec.to_builtins(self._base("in_progress"))
        return self._event("response.created", response=snapshot) + self._event("response.in_progress",
                                                                                 response=snapshot)

    def _message_item(self, status: str) -> OutputMessage:
        assert self.message_id is not None
        content = [OutputText("".join(self.text))] if status != "in_progress" else []
        return OutputMessage(self.message_id, status, "assistant", content)  # type: ignore[arg-type]

    def _call_item(self, index: int, status: str) -> FunctionCallItem:
        item_id, call_id, name, arguments = self.calls[index]
        return FunctionCallItem(item_id, call_id, name, arguments, status)  # type: ignore[arg-type]

    def delta(self, chunk: Delta) -> bytes:
        out = b""
        if chunk.text:
            if self.message_id is None:
                self.message_id = _item_id("msg")
                self.order.append(("message", 0))
                index = len(self.order) - 1
                out += self._event("response.output_item.added", output_index=index,
                                   item=msgspec.to_builtins(self._message_item("in_progress")))
                out += self._event("response.content_part.added", item_id=self.message_id, output_index=index,
                                   content_index=0, part=msgspec.to_builtins(OutputText("")))
            self.text.append(chunk.text)
            out += self._event("response.output_text.delta", item_id=self.message_id,
                               output_index=self._index("message"), content_index=0, delta=chunk.text, logprobs=[])
        for d in chunk.tool_calls or ():
            if d.index >= len(self.calls):
                self.calls.append([_item_id("fc"), d.id or _item_id("call"), d.name or "", d.arguments])
                self.order.append(("call", d.index))
                out += self._event("response.output_item.added", output_index=len(self.order) - 1,
                                   item=msgspec.to_builtins(self._call_item(d.index, "in_progress")))
            else:
                self.calls[d.index][3] += d.arguments
            if d.arguments:
                out += self._event("response.function_call_arguments.delta", item_id=self.calls[d.index][0],
                                   output_index=self._index("call", d.index), delta=d.arguments)
        return out

    def _index(self, kind: str, key: int = 0) -> int:
        return self.order.index((kind, key))

    def result(self, outcome: Outcome, final: Final) -> Response:
        """The finished response (built once: what is stored, returned and sent in response.completed)."""
        if self._result is not None:
            return self._result
        if not self.order:  # not streamed: the outcome says it all
            if outcome.text:
                self.message_id, self.text = _item_id("msg"), [outcome.text]
                self.order.append(("message", 0))
            for i, (call_id, name, arguments) in enumerate(outcome.tool_calls.calls if outcome.tool_calls else ()):
                self.calls.append([_item_id("fc"), call_id, name, arguments])
                self.order.append(("call", i))
        output = [self._message_item("completed") if kind == "message" else self._call_item(key, "completed")
                  for kind, key in self.order]
        usage = ResponseUsage(final.usage.prompt_tokens, final.usage.completion_tokens, final.usage.total_tokens)
        incomplete = None
        status = "completed"
        if final.finish_reason in ("length", "content_filter"):
            status = "incomplete"
            reason = "max_output_tokens" if final.finish_reason == "length" else "content_filter"
            incomplete = IncompleteDetails(reason)  # type: ignore[arg-type]
        self._result = self._base(status, output=output, usage=usage, incomplete_details=incomplete)
        return self._result

    def end(self, final: Final) -> bytes:
        assert self._result is not None, "finished() builds the result before the end"
        out = b""
        for index, (kind, key) in enumerate(self.order):
            if kind == "message":
                text = "".join(self.text)
                assert self.message_id is not None
                out += self._event("response.output_text.done", item_id=self.message_id, output_index=index,
                                   content_index=0, text=text, logprobs=[])
                out += self._event("response.content_part.done", item_id=self.message_id, output_index=index,
                                   content_index=0, part=msgspec.to_builtins(OutputText(text)))
                out += self._event("response.output_item.done", output_index=index,
                                   item=msgspec.to_builtins(self._message_item("completed")))
            else:
                item_id, _, name, arguments = self.calls[key]
                out += self._event("response.function_call_arguments.done", item_id=item_id, output_index=index,
                                   name=name, arguments=arguments)
                out += self._event("response.output_item.done", output_index=index,
                                   item=msgspec.to_builtins(self._call_item(key, "completed")))
        kind = "response.completed" if self._result.status == "completed" else "response.incomplete"
        return out + self._event(kind, response=msgspec.to_builtins(self._result))

    def error(self, exc: InferBusError) -> bytes:
        failed = self._base("failed", error=ResponseError(exc.code, exc.message))
        body = exc.openai_body()
        return (self._event("error", code=exc.code, message=exc.message, param=exc.param, error=body["error"])
                + self._event("response.failed", response=msgspec.to_builtins(failed)))

    def whole(self, outcome: Outcome, final: Final) -> dict[str, Any]:
        return msgspec.to_builtins(self.result(outcome, final))  # type: ignore[no-any-return]


# ---- storage --------------------------------------------------------------------------------------


def _pool(gw: Gateway) -> asyncpg.Pool:
    assert gw.pool is not None
    return gw.pool


def _not_found(rid: str, param: str | None = None) -> InferBusError:
    return InferBusError("not_found", f"Response with id '{rid}' not found.", param=param)


async def load_history(gw: Gateway, tenant_id: str, rid: str) -> list[Message]:
    row = await _pool(gw).fetchrow("SELECT history FROM responses WHERE id=$1 AND tenant_id=$2", rid, tenant_id)
    if row is None:
        raise _not_found(rid, "previous_response_id")
    return _messages.decode(row["history"])


def output_messages(response: Response) -> list[Message]:
    text = "".join(p.text for item in response.output if isinstance(item, OutputMessage) for p in item.content)
    calls = [ToolCall(i.call_id, i.name, i.arguments) for i in response.output if isinstance(i, FunctionCallItem)]
    return [Message("assistant", text, tool_calls=calls or None)] if text or calls else []


def input_items(req: CreateResponse) -> list[dict[str, Any]]:
    if isinstance(req.input, str):
        items: list[dict[str, Any]] = [{"type": "message", "role": "user",
                                        "content": [{"type": "input_text", "text": req.input}]}]
    else:
        items = [{"type": "message", **msgspec.to_builtins(i)} if i.type is None else msgspec.to_builtins(i)
                 for i in req.input]
    return [{"id": item.get("id") or _item_id("msg"), **item} for item in items]


@routes.post("/v1/responses")
async def create_response(request: web.Request) -> web.StreamResponse:
    """Create a response (OpenAI's Responses API)."""
    gw = request.app[GATEWAY]
    key = await gw.authorize(request)
    request[ADMITTED] = time.monotonic()
    req: CreateResponse = await _decode(request, CreateResponse)
    gen, fmt, finished = await prepare(gw, key, req, _item_id("resp"))
    with engine_params(ENGINE_PARAMS):
        return await respond(request, gw, gen, fmt, bool(req.stream), key, affinity=req.prompt_cache_key,
                             finished=finished)


async def prepare(
    gw: Gateway, key: KeyRecord, req: CreateResponse, rid: str
) -> tuple[GenerateRequest, ResponsesFormat, Finished]:
    """A decoded request (the route's, or a batch line's) as its generation, the format of its answer, and what
    stores the finished response (unless `store` is false) for `previous_response_id` to continue."""
    history = await load_history(gw, key.tenant_id, req.previous_response_id) if req.previous_response_id else []
    gen = to_generate(req, rid, history, gw.settings.default_max_tokens)
    fmt = ResponsesFormat(rid, req, int(time.time()))

    async def finished(outcome: Outcome, final: Final) -> None:
        response = fmt.result(outcome, final)
        if req.store is False:
            return
        conversation = history + input_messages(req.input) + output_messages(response)
        await _pool(gw).execute(
            "INSERT INTO responses (id, tenant_id, key_id, model, previous_response_id, response, input_items,"
            " history) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            # A batch line run again (its first run's answer was lost) stores its new answer under the same id.
            " ON CONFLICT (id) DO UPDATE SET response = EXCLUDED.response, input_items = EXCLUDED.input_items,"
            " history = EXCLUDED.history",
            rid, key.tenant_id, key.id, req.model, req.previous_response_id,
            msgspec.json.encode(response).decode(), msgspec.json.encode(input_items(req)).decode(),
            msgspec.json.encode(conversation).decode(),
        )

    return gen, fmt, finished


@routes.get("/v1/responses/{response_id}")
async def get_response(request: web.Request) -> web.Response:
    """Get a stored response."""
    gw = request.app[GATEWAY]
    key = await gw.authorize(request)
    rid = request.match_info["response_id"]
    row = await _pool(gw).fetchrow("SELECT response FROM responses WHERE id=$1 AND tenant_id=$2", rid, key.tenant_id)
    if row is None:
        raise _not_found(rid)
    return web.Response(body=row["response"].encode(), content_type="application/json")


@routes.get("/v1/responses/{response_id}/input_items")
async def get_input_items(request: web.Request) -> web.Response:
    """List a stored response's input items."""
    gw = request.app[GATEWAY]
    key = await gw.authorize(request)
    rid = request.match_info["response_id"]
    row = await _pool(gw).fetchrow("SELECT input_items FROM responses WHERE id=$1 AND tenant_id=$2", rid,
                                   key.tenant_id)
    if row is None:
        raise _not_found(rid)
    items = msgspec.json.decode(row["input_items"])
    if request.query.get("order", "desc") == "desc":
        items.reverse()
    return json_response(200, {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
                               "last_id": items[-1]["id"] if items else None, "has_more": False})


@routes.delete("/v1/responses/{response_id}")
async def delete_response(request: web.Request) -> web.Response:
    """Delete a stored response."""
    gw = request.app[GATEWAY]
    key = await gw.authorize(request)
    rid = request.match_info["response_id"]
    deleted = await _pool(gw).fetchval("DELETE FROM responses WHERE id=$1 AND tenant_id=$2 RETURNING id", rid,
                                       key.tenant_id)
    if deleted is None:
        raise _not_found(rid)
    return json_response(200, {"id": rid, "object": "response", "deleted": True})
