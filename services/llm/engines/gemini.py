"""Google Gemini (generativelanguage API) as a translator: contents, systemInstruction, generationConfig."""

from __future__ import annotations

from typing import Any

import msgspec

from contracts.errors import InferBusError
from contracts.llm import GenerateRequest
from services.llm.engines.remote import Fault, RemoteEngine, SSEEvent, Turn, arguments_object, conversation

FINISH = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
}
ROLES = {"user": "user", "assistant": "model"}


class _FunctionCall(msgspec.Struct):
    name: str
    args: dict[str, Any] = {}
    id: str | None = None


class _Part(msgspec.Struct, rename="camel"):
    text: str | None = None
    thought: bool = False
    function_call: _FunctionCall | None = None


class _Content(msgspec.Struct):
    parts: list[_Part] = []


class _Candidate(msgspec.Struct, rename="camel"):
    content: _Content | None = None
    finish_reason: str | None = None


class _Usage(msgspec.Struct, rename="camel"):
    prompt_token_count: int | None = None
    candidates_token_count: int | None = None
    thoughts_token_count: int = 0


class _Feedback(msgspec.Struct, rename="camel"):
    block_reason: str | None = None


class _Error(msgspec.Struct):
    message: str = ""
    status: str = ""


class _Chunk(msgspec.Struct, rename="camel"):
    candidates: list[_Candidate] = []
    usage_metadata: _Usage | None = None
    prompt_feedback: _Feedback | None = None
    error: _Error | None = None


_chunk = msgspec.json.Decoder(_Chunk)


def contents(request: GenerateRequest, turns: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Turns as Gemini contents: calls as functionCall parts, results as functionResponse parts of a user turn."""
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # call id -> function name: a functionResponse names the function, not the call
    for i, (role, text) in enumerate(turns):
        m = request.messages[i] if request.messages is not None else None
        if role == "system":
            continue
        if role == "tool" and m is not None:
            name = names.get(m.tool_call_id or "")
            if name is None:
                param = f"messages[{i}].tool_call_id"
                raise InferBusError("invalid_request", f"{param}: no earlier assistant call has this id", param=param)
            try:
                result = msgspec.json.decode(text)
            except msgspec.DecodeError:
                result = text
            part = {"functionResponse": {"name": name, "response": {"content": result}}}
            if out and out[-1]["role"] == "user" and "functionResponse" in out[-1]["parts"][0]:
                out[-1]["parts"].append(part)
            else:
                out.append({"role": "user", "parts": [part]})
        elif m is not None and m.tool_calls:
            parts: list[dict[str, Any]] = [{"text": text}] if text else []
            for j, c in enumerate(m.tool_calls):
                names[c.id] = c.name
                args = arguments_object(c.arguments, f"messages[{i}].tool_calls[{j}].function.arguments")
                parts.append({"functionCall": {"name": c.name, "args": args}})
            out.append({"role": "model", "parts": parts})
        else:
            out.append({"role": ROLES[role], "parts": [{"text": text}]})
    return out


def tools_fields(request: GenerateRequest, config: dict[str, Any]) -> dict[str, Any]:
    """tools and toolConfig for the body; a response format goes into generationConfig (`config`)."""
    fmt = request.response_format
    if fmt is not None:
        config["responseMimeType"] = "application/json"
        if fmt.schema is not None:
            config["responseJsonSchema"] = fmt.schema
    for name, field in (("frequency_penalty", "frequencyPenalty"), ("presence_penalty", "presencePenalty")):
        if value := getattr(request, name):
            config[field] = value
    if not request.tools:
        return {}
    if not request.parallel_tool_calls:
        raise InferBusError("unsupported_parameter", "parallel_tool_calls false is not supported by the gemini engine",
                            param="parallel_tool_calls")
    declarations = []
    for t in request.tools:
        declaration: dict[str, Any] = {"name": t.name, "description": t.description or ""}
        if t.parameters is not None:
            declaration["parametersJsonSchema"] = t.parameters
        declarations.append(declaration)
    calling: dict[str, Any] = {"mode": {"auto": "AUTO", "required": "ANY", "none": "NONE"}[request.tool_choice]}
    if request.tool_name is not None:
        calling["allowedFunctionNames"] = [request.tool_name]
    return {"tools": [{"functionDeclarations": declarations}], "toolConfig": {"functionCallingConfig": calling}}


class GeminiEngine(RemoteEngine):
    name = "gemini"
    default_base_url = "https://generativelanguage.googleapis.com"
    supported = frozenset({"tools", "response_format", "seed", "frequency_penalty", "presence_penalty"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.model = self.model.removeprefix("models/")

    def body(self, request: GenerateRequest) -> dict[str, Any]:
        turns = conversation(request, tools=True)
        config: dict[str, Any] = {
            "temperature": request.temperature,
            "topP": request.top_p,
            "maxOutputTokens": request.max_tokens,
        }
        if request.stop:
            config["stopSequences"] = request.stop
        if request.seed is not None:
            config["seed"] = request.seed
        body: dict[str, Any] = {"contents": contents(request, turns), "generationConfig": config}
        if not request.plain:
            body.update(tools_fields(request, config))
        if system := "\n\n".join(text for role, text in turns if role == "system"):
            body["systemInstruction"] = {"parts": [{"text": system}]}
        return body

    def stream_url(self) -> str:
        return f"{self.base_url}/v1beta/models/{self.model}:streamGenerateContent?alt=sse"

    def models_url(self) -> str:
        return f"{self.base_url}/v1beta/models"

    def auth_headers(self) -> dict[str, str]:
        # The header, never ?key=: a key in the URL ends up in logs and error messages.
        return {"x-goog-api-key": self.api_key} if self.api_key else {}

    def read(self, event: SSEEvent, turn: Turn) -> str:
        chunk = self.decode(_chunk, event)
        if chunk.error is not None:
            raise self.upstream.fail("upstream_error", f"failed mid-stream: {chunk.error.status} {chunk.error.message}")
        if chunk.prompt_feedback is not None and chunk.prompt_feedback.block_reason:
            raise self.upstream.fail("content_filter", f"blocked the prompt ({chunk.prompt_feedback.block_reason})")
        if (usage := chunk.usage_metadata) is not None:
            turn.prompt_tokens = usage.prompt_token_count
            if usage.candidates_token_count is not None:  # thinking tokens are billed as output
                turn.completion_tokens = usage.candidates_token_count + usage.thoughts_token_count
        if not chunk.candidates:
            return ""
        candidate = chunk.candidates[0]
        parts = candidate.content.parts if candidate.content else []
        for part in parts:
            if part.function_call is not None:  # whole, never split across events
                call = part.function_call
                turn.call(call.id, call.name, msgspec.json.encode(call.args).decode())
        if candidate.finish_reason:
            turn.finish = FINISH.get(candidate.finish_reason, "stop")
            if turn.finish == "stop" and turn.called:
                turn.finish = "tool_calls"
        return "".join(p.text for p in parts if p.text and not p.thought)

    def refine(self, status: int, fault: Fault) -> str | None:
        # Gemini answers a bad key with 400 INVALID_ARGUMENT, reason API_KEY_INVALID.
        return "upstream_auth_failed" if "API_KEY_INVALID" in fault.kinds else None
