"""GBNF grammars for llama.cpp from JSON Schemas: structured output, and tool calls in the toolcalls protocol."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import msgspec

from contracts.errors import InferBusError
from contracts.llm import GenerateRequest, Tool
from contracts.structured import check_schema, strip_annotations
from services.llm.engines.toolcalls import CLOSE, OPEN

JSON_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'
NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
# Where a lazy grammar starts (auto mode): the first `<tool_call>` in the text; free text before it.
TRIGGER = r"[\s\S]*?(" + OPEN + r")[\s\S]*"
# Bare calls (a model that writes `{"name": ...}` without the tags, see toolcalls.py): only at the start of the
# answer, maybe in a ```json fence. When the pattern matches, llama.cpp feeds the grammar the text from the fence or
# `{` to the end of what was generated, and a text the grammar refuses there aborts the process: so the pattern is
# anchored at both ends (llama.cpp searches), and accepts no more than the call rules do (whitespace bounded
# alike). A token that runs past it leaves that call unconstrained (the parser still takes it).
BARE_WS = "[ \\t\\n]{0,16}"
BARE_TRIGGER = (r"^[ \t\n]*((?:```(?:json)?" + BARE_WS + r")?\{" + BARE_WS + '"name"' + BARE_WS + "(?::" + BARE_WS
                + '"?)?)$')


def _converter() -> Any:
    from llama_cpp.llama_grammar import SchemaConverter

    return SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)  # type: ignore[no-untyped-call]


def _literal(text: str) -> str:
    return json.dumps(text)  # a GBNF literal escapes as a JSON string does


def _visit(converter: Any, schema: dict[str, Any], name: str, url: str, param: str) -> str:
    check_schema(schema, param)
    try:
        resolved = converter.resolve_refs(strip_annotations(schema), url)
        return str(converter.visit(resolved, name))
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise InferBusError("unsupported_parameter", f"{param}: this schema cannot be enforced ({exc})",
                            param=param) from None


_CACHE: OrderedDict[bytes, tuple[str | None, bool]] = OrderedDict()
CACHE_SIZE = 64  # an agent sends the same tools every turn: its grammar is built once
_LOCK = threading.Lock()


def grammar_for(request: GenerateRequest, bare: bool = False) -> tuple[str | None, bool]:
    """The request's grammar and whether it is lazy, built once per distinct tools and format.

    `bare`: calls may also be written as bare JSON objects (no tags), for a model that writes them so.
    """
    key = msgspec.msgpack.encode((request.tools, request.tool_choice, request.tool_name,
                                  request.parallel_tool_calls, request.response_format, bare))
    with _LOCK:  # prepare runs on the event loop or in the prepare thread
        if (hit := _CACHE.get(key)) is not None:
            _CACHE.move_to_end(key)
            return hit
    built = _build(request, bare)
    with _LOCK:
        _CACHE[key] = built
        if len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return built


def _build(request: GenerateRequest, bare: bool) -> tuple[str | None, bool]:
    """The request's grammar and whether it is lazy (it starts at the first `<tool_call>`: tool_choice auto).

    Forced tools: only calls. Auto: free text, or calls from the first `<tool_call>` on; with a response
    format as well, an answer in that format or calls (not lazy then: the answer is constrained too).
    """
    fmt, calls = request.response_format, request.calls_tools
    if not calls and fmt is None:
        return None, False
    converter = _converter()
    if calls:
        _tool_rules(converter, request, bare and fmt is None)
    if fmt is not None:
        schema = fmt.schema if fmt.type == "json_schema" and fmt.schema is not None else {"type": "object"}
        answer = _visit(converter, schema, "answer", "format", "response_format.schema")
    if not calls:
        converter._add_rule("root", answer)
    elif fmt is not None:
        converter._add_rule("root", "calls" if request.tool_choice == "required" else f"calls | {answer}")
    else:
        converter._add_rule("root", "calls | bare-calls" if bare else "calls")
    converter._rules["char"] = JSON_CHAR  # no raw control characters inside strings: JSON forbids them
    lazy = calls and request.tool_choice == "auto" and fmt is None
    return str(converter.format_grammar()), lazy


def _tool_rules(converter: Any, request: GenerateRequest, bare: bool) -> None:
    """`<tool_call>` blocks, one or (parallel_tool_calls) several, each a call of one of the allowed tools;
    with `bare`, also the same calls as bare objects (whitespace as the model likes it) one per line."""
    assert request.tools
    alternatives, bares = [], []
    for i, tool in enumerate(request.tools):
        if request.tool_name is not None and tool.name != request.tool_name:
            continue
        args = _visit(converter, _parameters(tool, i), f"fn{i}-args", f"tool{i}", f"tools[{i}].parameters")
        head = _literal('{"name": ' + json.dumps(tool.name) + ', "arguments": ')
        alternatives.append(converter._add_rule(f"fn{i}", f'{head} {args} "}}"'))
        if bare:
            words = ['"{"', _literal('"name"'), '":"', _literal(json.dumps(tool.name)), '","',
                     _literal('"arguments"'), '":"', args, '"}"']
            bares.append(converter._add_rule(f"bare-fn{i}", " bare-ws ".join(words)))
    call = f'{_literal(OPEN + chr(10))} ( {" | ".join(alternatives)} ) {_literal(chr(10) + CLOSE)}'
    converter._add_rule("call", call)
    converter._add_rule("calls", 'call ( "\\n" call )*' if request.parallel_tool_calls else "call")
    if bare:
        converter._add_rule("bare-ws", BARE_WS)
        converter._add_rule("bare-call", " | ".join(bares))
        many = 'bare-call ( "\\n" "\\n"? bare-call )*' if request.parallel_tool_calls else "bare-call"
        converter._add_rule("bare-list", many)
        converter._add_rule("bare-calls", '"```" "json"? bare-ws bare-list bare-ws "```" | bare-list "\\n"?')


def _parameters(tool: Tool, index: int) -> dict[str, Any]:
    schema = tool.parameters if tool.parameters is not None else NO_ARGUMENTS
    if schema.get("type", "object") != "object":
        param = f"tools[{index}].parameters.type"
        raise InferBusError("invalid_request", f"{param}: a function's parameters must be an object", param=param)
    return schema
