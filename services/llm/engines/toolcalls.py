"""Tool calls for local models: tools in the prompt, calls in the history, and calls parsed from streamed text.

The text protocol is the one Qwen2.5 and Hermes models are trained on, and the one our grammars force:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A chat template that knows tools (it reads `tools`) renders them itself; for one that does not, the tools
go into the system message in the same words, and earlier calls and results into plain turns.

Some models trained on this template leave the tags out: Qwen2.5-Coder answers `{"name": ..., "arguments": ...}`
as the whole message, sometimes in a ```json fence. With `bare` the parser takes an answer that opens so as calls
(the fence is dropped), as llama.cpp's own Hermes parser does for that model.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from contracts.llm import GenerateRequest, Message, ResponseFormat, TokenLogprob, Tool, ToolCallDelta
from services.llm.engines.base import Piece

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"arguments"\s*:\s*')
_TAIL = re.compile(r"\s*\}\s*" + re.escape(CLOSE))
_BARE_TAIL = re.compile(r"\s*\}")
_SPACE = " \t\n"


def openai_tool(tool: Tool) -> dict[str, Any]:
    """A tool in OpenAI's shape: what chat templates (and the system prompt below) show the model."""
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    function["parameters"] = tool.parameters if tool.parameters is not None else {"type": "object", "properties": {}}
    return {"type": "function", "function": function}


COMPACT = (",", ":")  # JSON in prompts without spaces: 16 % fewer tokens for a tool list (SmolLM2's tokenizer)


def tools_prompt(tools: list[Tool]) -> str:
    listing = "\n".join(json.dumps(openai_tool(t), ensure_ascii=False, separators=COMPACT) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{listing}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def format_prompt(fmt: ResponseFormat) -> str:
    if fmt.schema is None:
        return "Answer with a JSON object."
    schema = json.dumps(fmt.schema, ensure_ascii=False, separators=COMPACT)
    return "Answer with a JSON object that follows this JSON Schema:\n" + schema


def call_text(name: str, arguments: str) -> str:
    return f'{OPEN}\n{{"name": {json.dumps(name)}, "arguments": {_as_json(arguments)}}}\n{CLOSE}'


def _as_json(arguments: str) -> str:
    """Arguments as JSON text: a caller's history may hold anything, and the model should see valid JSON."""
    try:
        return json.dumps(json.loads(arguments), ensure_ascii=False)
    except ValueError:
        return json.dumps(arguments)


def template_messages(
    request: GenerateRequest, system_prompt: str | None, native_tools: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages (and tools) for a chat template: native tool turns when it knows them, plain turns otherwise."""
    assert request.messages is not None
    offered = request.tools if request.calls_tools else None
    extra = []
    if offered and not native_tools:
        extra.append(tools_prompt(offered))
    if request.response_format is not None:
        extra.append(format_prompt(request.response_format))
    rendered = [_turn(m, native_tools) for m in request.messages]
    if system_prompt and not any(m["role"] == "system" for m in rendered):
        rendered.insert(0, {"role": "system", "content": system_prompt})
    if extra:
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {**rendered[0], "content": "\n\n".join([rendered[0]["content"], *extra])}
        else:
            rendered.insert(0, {"role": "system", "content": "\n\n".join(extra)})
    tools = [openai_tool(t) for t in offered] if offered and native_tools else None
    return rendered, tools


def _turn(m: Message, native: bool) -> dict[str, Any]:
    role = "system" if m.role == "developer" else m.role
    if native:
        turn: dict[str, Any] = {"role": role, "content": m.content}
        if m.tool_calls:
            turn["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _parsed(c.arguments)}}
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            turn["tool_call_id"] = m.tool_call_id
        return turn
    if m.tool_calls:
        calls = "\n".join(call_text(c.name, c.arguments) for c in m.tool_calls)
        return {"role": role, "content": f"{m.content}\n{calls}" if m.content else calls}
    if role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{m.content}\n</tool_response>"}
    return {"role": role, "content": m.content}


def _parsed(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def parsed_piece(text: str, tokens: int, finish: str | None, parser: ToolCallParser | None,
                 logprobs: list[TokenLogprob] | None, *, end: bool) -> Piece:
    """A piece of an engine's text as content and tool call deltas (`parser` None: text only). `end`: the last
    piece; a generation that stopped after calling a tool finishes with `tool_calls`."""
    if parser is None:
        return Piece(text, tokens, finish, logprobs=logprobs)
    content, calls = parser.feed(text)
    if end:
        content += parser.flush()
        if finish == "stop" and parser.calls:
            finish = "tool_calls"
    return Piece(content, tokens, finish, tool_calls=calls or None, logprobs=logprobs)


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class ToolCallParser:
    """Streamed model text -> (content text, tool call deltas), for text in the protocol above.

    Content that might be the start of `<tool_call>` is held back until it is known not to be. Inside a call,
    arguments stream as they come: their end is where the JSON value closes (strings and escapes tracked).
    """

    def __init__(self, bare: bool = False) -> None:
        self.calls = 0
        self._state = "start" if bare else "text"  # start: the answer may still be a bare call
        self._bare = False  # the call being read has no tags
        self._buffer = ""
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._buffer += text
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        while self._buffer:
            before = (self._state, len(self._buffer))
            if self._state == "start":
                self._start()
            elif self._state == "text":
                text = self._text()
                content.append(text if not self.calls or text.strip() else "")  # only space between calls
            elif self._state == "head":
                self._head(deltas)
            elif self._state == "args":
                self._args(deltas)
            else:
                self._tail()
            if (self._state, len(self._buffer)) == before:
                break  # waiting for more text
        return "".join(content), deltas

    def flush(self) -> str:
        """What is left at the end: held-back text (never a partial call's JSON)."""
        after_calls = self.calls and self._buffer.strip(_SPACE) in ("", "```")  # space, or a fence's end
        held = self._state == "text" or (self._state == "start" and not after_calls)
        out, self._buffer = (self._buffer if held else ""), ""
        return out

    def _start(self) -> None:
        at = bare_opening(self._buffer)
        if at is None:
            return
        if at < 0:
            self._state = "text"
        else:
            self._buffer, self._state, self._bare = self._buffer[at:], "head", True

    def _text(self) -> str:
        at = self._buffer.find(OPEN)
        if at >= 0:
            out, self._buffer = self._buffer[:at], self._buffer[at + len(OPEN):]
            self._state = "head"
            return out
        keep = next((n for n in range(min(len(OPEN) - 1, len(self._buffer)), 0, -1)
                     if self._buffer.endswith(OPEN[:n])), 0)
        cut = len(self._buffer) - keep
        out, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return out

    def _head(self, deltas: list[ToolCallDelta]) -> None:
        match = _HEAD.match(self._buffer)
        if match is None:
            return
        deltas.append(ToolCallDelta(self.calls, new_call_id(), match.group(1), ""))
        self._buffer = self._buffer[match.end():]
        self._state, self._depth, self._in_string, self._escaped = "args", 0, False, False

    def _args(self, deltas: list[ToolCallDelta]) -> None:
        end = None
        for i, ch in enumerate(self._buffer):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    end = i + 1
                    break
        taken = self._buffer if end is None else self._buffer[:end]
        self._buffer = "" if end is None else self._buffer[end:]
        if taken:
            deltas.append(ToolCallDelta(self.calls, None, None, taken))
        if end is not None:
            self._state = "tail"

    def _tail(self) -> None:
        if self._bare:
            match = _BARE_TAIL.match(self._buffer)
            if match is None:
                return
            self._buffer = self._buffer[match.end():]
            self.calls += 1
            self._state, self._bare = "start", False  # another bare call may follow on the next line
            return
        match = _TAIL.match(self._buffer)
        if match is None:
            return
        self._buffer = self._buffer[match.end():].lstrip()
        self.calls += 1
        self._state = "text"


def bare_opening(text: str) -> int | None:
    """Where a bare call's `{` is in `text` (the start of an answer): -1 if it opens none, None if it may yet."""
    rest = text.lstrip(_SPACE)
    if rest.startswith("`"):
        if not rest.startswith("```"):
            return None if "```".startswith(rest) else -1
        tag = rest[3:]
        if len(tag) < 4 and "json".startswith(tag):
            return None
        rest = (tag[4:] if tag.startswith("json") else tag).lstrip(_SPACE)
    if not rest:
        return None
    if rest[0] != "{":
        return -1
    key = rest[1:].lstrip(_SPACE)
    if len(key) < len('"name"'):
        return None if '"name"'.startswith(key) else -1
    return len(text) - len(rest) if key.startswith('"name"') else -1
