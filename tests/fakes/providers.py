"""Fake OpenAI, Anthropic and Gemini upstreams on their documented wire formats, with scriptable faults.

In-process: `async with FakeProvider("anthropic") as fake: ...` (`fake.base_url` is an engine's base_url).
As a process: `python -m tests.fakes.providers --provider anthropic --port N [--chunks 8] [--api-key K]`.

Control, over HTTP so another process can drive it:
  POST /_fake/script  a `Script` as JSON: it replaces the current one (`{}` clears it)
  POST /_fake/reset   clears the script and the stats
  GET  /_fake/stats   a `Stats` as JSON

The answer echoes the words of the last user message, one word a chunk, `chunks` of them (fewer when
the request's max tokens say so: finish "length"); usage is 10 + the request's words for the prompt
and the chunks sent for the completion, so it differs from any client-side estimate.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import msgspec
from aiohttp import web

from services.runtime.embedded import free_port

PROVIDERS = ("openai", "anthropic", "gemini")


class Script(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Faults for the next requests (every request until replaced, or the next `times`)."""

    status: int | None = None  # answer with this HTTP status and the provider's error body
    message: str | None = None  # that error's message
    retry_after: float | None = None  # with a 429: Retry-After seconds (Gemini: RetryInfo in the body)
    retry_after_ms: int | None = None  # with a 429: OpenAI's retry-after-ms header
    times: int | None = None
    delay_s: float = 0.0  # before the response starts
    chunk_delay_s: float = 0.0  # between stream events
    die_after_chunks: int | None = None  # drop the connection after this many text chunks
    malformed: bool = False  # a chunk of broken JSON after the first text chunk
    error_event: bool = False  # the provider's mid-stream error after the first text chunk
    content_filter: bool = False  # the provider's content-policy answer
    context_length: bool = False  # the provider's context-length error
    chunks: int | None = None  # text chunks in the answer (default: the server's)
    no_usage: bool = False  # report no usage counts


class Stats(msgspec.Struct):
    requests: int = 0  # generation requests
    completed: int = 0  # streams written to the end
    disconnects: int = 0  # requests whose client went away before the end
    health_requests: int = 0  # models-list requests
    last_body: Any = None
    last_auth: str | None = None  # the credential header's value
    last_path: str | None = None  # with its query string
    last_headers: dict[str, str] = {}  # names in lower case
    last_usage: list[int] | None = None  # [prompt, completion] as reported


class Answer(NamedTuple):
    chunks: list[str]
    finish: str  # neutral: stop, length, content_filter
    prompt_tokens: int
    completion_tokens: int


def sse(data: Any, event: str | None = None, eol: bytes = b"\n") -> bytes:
    head = f"event: {event}".encode() + eol if event else b""
    return head + b"data: " + msgspec.json.encode(data) + eol + eol


# ---- the three dialects ---------------------------------------------------------------------


class OpenAIDialect:
    auth_header = "authorization"
    generate_paths = ("/v1/chat/completions",)
    models_path = "/v1/models"

    def key(self, value: str | None) -> str | None:
        return value.removeprefix("Bearer ") if value else None

    def texts(self, body: dict[str, Any]) -> tuple[str, list[str]]:
        messages = body.get("messages", [])
        users = [m["content"] for m in messages if m.get("role") == "user"]
        return (users[-1] if users else ""), [m.get("content") or "" for m in messages]

    def max_tokens(self, body: dict[str, Any]) -> int | None:
        value = body.get("max_completion_tokens", body.get("max_tokens"))
        return int(value) if value is not None else None

    def streams(self, request: web.Request, body: dict[str, Any]) -> bool:
        return bool(body.get("stream"))

    def error(self, status: int, message: str, kind: str | None = None) -> tuple[int, dict[str, Any]]:
        types = {401: "invalid_request_error", 429: "requests", 400: "invalid_request_error"}
        codes = {401: "invalid_api_key", 429: "rate_limit_exceeded"}
        error = {"message": message, "type": types.get(status, "server_error"), "param": None}
        return status, {"error": {**error, "code": kind or codes.get(status)}}

    def bad_key(self, key: str | None) -> tuple[int, dict[str, Any]]:
        return self.error(401, f"Incorrect API key provided: {key}. You can find your API key at the dashboard.")

    def context_error(self) -> tuple[int, dict[str, Any]]:
        message = (
            "This model's maximum context length is 4096 tokens. However, your messages resulted in 5210 tokens. "
            "Please reduce the length of the messages."
        )
        return self.error(400, message, "context_length_exceeded")

    def filter_answer(self) -> tuple[int, dict[str, Any]] | None:
        message = "The response was filtered due to the prompt triggering the content management policy."
        return self.error(400, message, "content_filter")

    def models(self, model: str) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "fake"}]}

    def json_answer(self, answer: Answer, model: str, no_usage: bool) -> dict[str, Any]:
        message = {"role": "assistant", "content": "".join(answer.chunks)}
        body: dict[str, Any] = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": answer.finish}],
        }
        if not no_usage:
            body["usage"] = _openai_usage(answer)
        return body

    def frames(self, answer: Answer, model: str, body: dict[str, Any], no_usage: bool) -> Iterator[tuple[bytes, bool]]:
        """(frame, is a text chunk) in order."""
        head = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return sse({**head, "choices": [choice], "usage": None})

        yield chunk({"role": "assistant", "content": ""}), False
        for text in answer.chunks:
            yield chunk({"content": text}), True
        yield chunk({}, answer.finish), False
        if (body.get("stream_options") or {}).get("include_usage") and not no_usage:
            yield sse({**head, "choices": [], "usage": _openai_usage(answer)}), False
        yield b"data: [DONE]\n\n", False

    def malformed(self) -> bytes:
        return b'data: {"choices": [{"delta": {"content": "x"\n\n'

    def error_event(self) -> bytes:
        message = "The server had an error while processing your request."
        return sse({"error": {"message": message, "type": "server_error"}})


def _openai_usage(answer: Answer) -> dict[str, int]:
    total = answer.prompt_tokens + answer.completion_tokens
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens, "total_tokens": total}


class AnthropicDialect:
    auth_header = "x-api-key"
    generate_paths = ("/v1/messages",)
    models_path = "/v1/models"
    finishes = {"stop": "end_turn", "length": "max_tokens", "content_filter": "refusal"}

    def key(self, value: str | None) -> str | None:
        return value

    def texts(self, body: dict[str, Any]) -> tuple[str, list[str]]:
        def text(content: Any) -> str:
            return content if isinstance(content, str) else "".join(b.get("text", "") for b in content)

        messages = body.get("messages", [])
        users = [text(m["content"]) for m in messages if m.get("role") == "user"]
        return (users[-1] if users else ""), [text(body.get("system", "")), *(text(m["content"]) for m in messages)]

    def max_tokens(self, body: dict[str, Any]) -> int | None:
        return int(body["max_tokens"]) if "max_tokens" in body else None

    def streams(self, request: web.Request, body: dict[str, Any]) -> bool:
        return bool(body.get("stream"))

    def error(self, status: int, message: str, kind: str | None = None) -> tuple[int, dict[str, Any]]:
        types = {
            400: "invalid_request_error",
            401: "authentication_error",
            403: "permission_error",
            404: "not_found_error",
            429: "rate_limit_error",
            529: "overloaded_error",
        }
        return status, {"type": "error", "error": {"type": kind or types.get(status, "api_error"), "message": message}}

    def bad_key(self, key: str | None) -> tuple[int, dict[str, Any]]:
        return self.error(401, "invalid x-api-key")

    def context_error(self) -> tuple[int, dict[str, Any]]:
        return self.error(400, "prompt is too long: 208310 tokens > 200000 maximum")

    def filter_answer(self) -> tuple[int, dict[str, Any]] | None:
        return None  # Anthropic refuses in the stream: stop_reason "refusal"

    def models(self, model: str) -> dict[str, Any]:
        data = [{"type": "model", "id": model, "display_name": model, "created_at": "2025-01-01T00:00:00Z"}]
        return {"data": data, "has_more": False, "first_id": model, "last_id": model}

    def _message(self, answer: Answer, model: str, no_usage: bool, content: list[Any]) -> dict[str, Any]:
        message: dict[str, Any] = {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": None,
            "stop_sequence": None,
        }
        if not no_usage:
            message["usage"] = {"input_tokens": answer.prompt_tokens, "output_tokens": 1}
        return message

    def json_answer(self, answer: Answer, model: str, no_usage: bool) -> dict[str, Any]:
        message = self._message(answer, model, no_usage, [{"type": "text", "text": "".join(answer.chunks)}])
        message["stop_reason"] = self.finishes[answer.finish]
        if not no_usage:
            message["usage"]["output_tokens"] = answer.completion_tokens
        return message

    def frames(self, answer: Answer, model: str, body: dict[str, Any], no_usage: bool) -> Iterator[tuple[bytes, bool]]:
        start = {"type": "message_start", "message": self._message(answer, model, no_usage, [])}
        yield sse(start, "message_start"), False
        block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        yield sse(block, "content_block_start"), False
        yield sse({"type": "ping"}, "ping"), False
        for text in answer.chunks:
            delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
            yield sse(delta, "content_block_delta"), True
        yield sse({"type": "content_block_stop", "index": 0}, "content_block_stop"), False
        end: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": self.finishes[answer.finish], "stop_sequence": None},
        }
        if not no_usage:
            end["usage"] = {"output_tokens": answer.completion_tokens}
        yield sse(end, "message_delta"), False
        yield sse({"type": "message_stop"}, "message_stop"), False

    def malformed(self) -> bytes:
        return b'event: content_block_delta\ndata: {"type": "content_block_delta", "delta": \n\n'

    def error_event(self) -> bytes:
        return sse({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, "error")


class GeminiDialect:
    auth_header = "x-goog-api-key"
    generate_paths = ("/v1beta/models/{call}",)
    models_path = "/v1beta/models"
    finishes = {"stop": "STOP", "length": "MAX_TOKENS", "content_filter": "SAFETY"}
    statuses = {
        400: "INVALID_ARGUMENT",
        401: "UNAUTHENTICATED",
        403: "PERMISSION_DENIED",
        404: "NOT_FOUND",
        429: "RESOURCE_EXHAUSTED",
        500: "INTERNAL",
        503: "UNAVAILABLE",
    }

    def key(self, value: str | None) -> str | None:
        return value

    def texts(self, body: dict[str, Any]) -> tuple[str, list[str]]:
        def text(content: dict[str, Any]) -> str:
            return "".join(p.get("text", "") for p in content.get("parts", []))

        contents = body.get("contents", [])
        users = [text(c) for c in contents if c.get("role", "user") == "user"]
        system = text(body.get("systemInstruction") or {})
        return (users[-1] if users else ""), [system, *(text(c) for c in contents)]

    def max_tokens(self, body: dict[str, Any]) -> int | None:
        value = (body.get("generationConfig") or {}).get("maxOutputTokens")
        return int(value) if value is not None else None

    def streams(self, request: web.Request, body: dict[str, Any]) -> bool:
        return request.match_info["call"].endswith(":streamGenerateContent")

    def error(self, status: int, message: str, kind: str | None = None) -> tuple[int, dict[str, Any]]:
        return status, {"error": {"code": status, "message": message, "status": self.statuses.get(status, "UNKNOWN")}}

    def bad_key(self, key: str | None) -> tuple[int, dict[str, Any]]:
        status, body = self.error(400, "API key not valid. Please pass a valid API key.")
        reason = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
        body["error"]["details"] = [{**reason, "domain": "googleapis.com"}]
        return status, body

    def context_error(self) -> tuple[int, dict[str, Any]]:
        message = "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576)."
        return self.error(400, message)

    def filter_answer(self) -> tuple[int, dict[str, Any]] | None:
        return None  # Gemini blocks in a 200 answer: promptFeedback.blockReason

    def models(self, model: str) -> dict[str, Any]:
        methods = ["generateContent", "streamGenerateContent", "countTokens"]
        return {"models": [{"name": f"models/{model}", "displayName": model, "supportedGenerationMethods": methods}]}

    def _usage(self, answer: Answer, completion: int | None) -> dict[str, int]:
        usage = {"promptTokenCount": answer.prompt_tokens, "totalTokenCount": answer.prompt_tokens + (completion or 0)}
        return usage if completion is None else {**usage, "candidatesTokenCount": completion}

    def _chunk(self, text: str, model: str, usage: dict[str, int] | None, finish: str | None = None) -> dict[str, Any]:
        candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
        if finish:
            candidate["finishReason"] = finish
        chunk: dict[str, Any] = {"candidates": [candidate], "modelVersion": model}
        if usage is not None:
            chunk["usageMetadata"] = usage
        return chunk

    def json_answer(self, answer: Answer, model: str, no_usage: bool) -> dict[str, Any]:
        usage = None if no_usage else self._usage(answer, answer.completion_tokens)
        return self._chunk("".join(answer.chunks), model, usage, self.finishes[answer.finish])

    def frames(self, answer: Answer, model: str, body: dict[str, Any], no_usage: bool) -> Iterator[tuple[bytes, bool]]:
        if answer.finish == "content_filter":
            feedback = {"blockReason": "SAFETY", "safetyRatings": []}
            yield self._sse({"promptFeedback": feedback, "usageMetadata": self._usage(answer, None)}), False
            return
        last = len(answer.chunks) - 1
        for i, text in enumerate(answer.chunks):
            done = i == last
            usage = None if no_usage else self._usage(answer, answer.completion_tokens if done else None)
            yield self._sse(self._chunk(text, model, usage, self.finishes[answer.finish] if done else None)), True

    def _sse(self, data: Any) -> bytes:
        return sse(data, eol=b"\r\n")  # Gemini ends its lines with CRLF

    def malformed(self) -> bytes:
        return b'data: {"candidates": [{"content": \r\n\r\n'

    def error_event(self) -> bytes:
        return self._sse({"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}})


Dialect = OpenAIDialect | AnthropicDialect | GeminiDialect
DIALECTS: dict[str, type[Dialect]] = {"openai": OpenAIDialect, "anthropic": AnthropicDialect, "gemini": GeminiDialect}


# ---- the server -----------------------------------------------------------------------------


class FakeProvider:
    """One provider's API on a free loopback port, with faults scripted in-process or over HTTP."""

    def __init__(
        self,
        provider: str,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        chunks: int = 8,
        api_key: str | None = None,
        model: str = "fake-model",
    ) -> None:
        if provider not in DIALECTS:
            raise ValueError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
        self.provider = provider
        self.dialect = DIALECTS[provider]()
        self.host = host
        self.port = port or free_port()
        self.chunks = chunks
        self.api_key = api_key  # None: any key passes
        self.model = model
        self.script = Script()
        self.stats = Stats()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What the provider's engine takes as base_url."""
        return self.url + "/v1" if self.provider == "openai" else self.url

    def set_script(self, **fields: Any) -> None:
        self.script = msgspec.convert(fields, Script)

    def reset(self) -> None:
        self.script, self.stats = Script(), Stats()

    async def start(self) -> None:
        app = web.Application()
        for path in self.dialect.generate_paths:
            app.router.add_post(path, self._generate)
        app.router.add_get(self.dialect.models_path, self._models)
        app.router.add_post("/_fake/script", self._set_script)
        app.router.add_post("/_fake/reset", self._reset)
        app.router.add_get("/_fake/stats", self._stats)
        # handler_cancellation: a client that goes away cancels its handler, which counts the disconnect.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeProvider:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- control ----

    async def _set_script(self, request: web.Request) -> web.Response:
        try:
            self.script = msgspec.json.decode(await request.read(), type=Script)
        except msgspec.DecodeError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.Response(body=msgspec.json.encode(self.script), content_type="application/json")

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def _stats(self, request: web.Request) -> web.Response:
        return web.Response(body=msgspec.json.encode(self.stats), content_type="application/json")

    # ---- the API ----

    def _take(self) -> Script:
        script = self.script
        if script.times is not None:
            left = script.times - 1
            self.script = msgspec.structs.replace(script, times=left) if left > 0 else Script()
        return script

    def _refusal(self, request: web.Request, script: Script) -> web.Response | None:
        """The error answer, if this request gets one: a wrong key, or a scripted status."""
        key = self.dialect.key(request.headers.get(self.dialect.auth_header))
        if self.api_key is not None and key != self.api_key:
            return self._json(*self.dialect.bad_key(key))
        if script.status is not None:
            status, body = self.dialect.error(script.status, script.message or f"scripted error {script.status}")
            headers: dict[str, str] = {}
            if script.status == 429 and script.retry_after is not None:
                if self.provider == "gemini":
                    delay = f"{script.retry_after:g}s"
                    info = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}
                    body["error"]["details"] = [info]
                else:
                    headers["retry-after"] = f"{script.retry_after:g}"
            if script.status == 429 and script.retry_after_ms is not None:
                headers["retry-after-ms"] = str(script.retry_after_ms)
            return self._json(status, body, headers)
        return None

    def _seen(self, request: web.Request) -> None:
        self.stats.last_auth = request.headers.get(self.dialect.auth_header)
        self.stats.last_path = request.path_qs
        self.stats.last_headers = {k.lower(): v for k, v in request.headers.items()}

    def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
        encoded = msgspec.json.encode(body)
        return web.Response(status=status, body=encoded, content_type="application/json", headers=headers)

    async def _models(self, request: web.Request) -> web.Response:
        self.stats.health_requests += 1
        self._seen(request)
        return self._refusal(request, self._take()) or self._json(200, self.dialect.models(self.model))

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        self.stats.requests += 1
        body = msgspec.json.decode(await request.read())
        self.stats.last_body = body
        self._seen(request)
        script = self._take()
        try:
            if script.delay_s:
                await asyncio.sleep(script.delay_s)  # the slow upstream being faked
            if refusal := self._refusal(request, script):
                return refusal
            if script.context_length:
                return self._json(*self.dialect.context_error())
            if script.content_filter and (answer_filter := self.dialect.filter_answer()):
                return self._json(*answer_filter)
            answer = self._answer(body, script)
            self.stats.last_usage = [answer.prompt_tokens, answer.completion_tokens]
            if not self.dialect.streams(request, body):
                return self._json(200, self.dialect.json_answer(answer, self.model, script.no_usage))
            return await self._stream(request, body, answer, script)
        except asyncio.CancelledError:
            self.stats.disconnects += 1
            raise
        except ConnectionResetError:
            self.stats.disconnects += 1
            return web.Response(status=499)  # nobody reads it

    async def _stream(self, request: web.Request, body: Any, answer: Answer, script: Script) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await resp.prepare(request)
        written = 0
        for frame, is_text in self.dialect.frames(answer, self.model, body, script.no_usage):
            await resp.write(frame)
            written += is_text
            if is_text and written == script.die_after_chunks:
                assert request.transport is not None
                request.transport.close()  # mid-stream, without the chunked encoding's last chunk
                return resp
            if is_text and written == 1 and (script.malformed or script.error_event):
                await resp.write(self.dialect.malformed() if script.malformed else self.dialect.error_event())
                await resp.write_eof()
                return resp
            if script.chunk_delay_s:
                await asyncio.sleep(script.chunk_delay_s)
        await resp.write_eof()
        self.stats.completed += 1
        return resp

    def _answer(self, body: dict[str, Any], script: Script) -> Answer:
        last_user, texts = self.dialect.texts(body)
        words = last_user.split() or ["empty"]
        count = script.chunks if script.chunks is not None else self.chunks
        limit = self.dialect.max_tokens(body)
        finish = "content_filter" if script.content_filter else "stop"
        if limit is not None and limit < count:
            count, finish = limit, "length"
        chunks = [(" " if i else "") + words[i % len(words)] for i in range(count)]
        prompt = 10 + sum(len(t.split()) for t in texts)
        return Answer(chunks, finish, prompt, count)


async def serve(provider: str, port: int, host: str, chunks: int, api_key: str | None) -> None:
    fake = FakeProvider(provider, port=port, host=host, chunks=chunks, api_key=api_key)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with fake:
        print(f"fake {provider} listening on {fake.url}", flush=True)
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--provider", choices=PROVIDERS, required=True)
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--api-key", default=None, help="the only key accepted (default: any)")
    args = parser.parse_args()
    asyncio.run(serve(args.provider, args.port or free_port(), args.host, args.chunks, args.api_key))


if __name__ == "__main__":
    main()
