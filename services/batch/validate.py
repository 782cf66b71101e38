"""A batch input file checked line by line before anything runs: what is wrong, on which line.

Each body is checked by the code its endpoint checks a request with (the gateway's route modules), so a
line that passes here is one the endpoint accepts, short of what only running it can tell (a stored
`previous_response_id`, an image URL's content)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from contracts.batch import (
    ENDPOINT_KINDS,
    MAX_ERRORS_LISTED,
    MAX_LINE_BYTES,
    MAX_LINES,
    BatchError,
    Caller,
    InputLine,
    WorkItem,
    input_line_decoder,
    scope_allows,
)
from contracts.embed import EmbeddingsBody, inputs
from contracts.errors import InferBusError
from contracts.llm import ChatCompletionRequest, CompletionRequest, chat_to_generate, completion_to_generate
from contracts.responses import CreateResponse

# The endpoints' own checks of a request (pure functions of the body, no I/O).
from services.gateway import responses_routes, vision_routes

Known = Callable[[str, str], bool]  # is a model of a kind served (registry table, configured, or a live worker)?
T = TypeVar("T")


async def lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[int, bytes | None]]:
    """(1-based line number, bytes) for each line of a streamed file; None for a line over MAX_LINE_BYTES."""
    number = 0
    partial = bytearray()
    too_long = False
    async for chunk in chunks:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if not too_long:
                partial += piece
                too_long = len(partial) > MAX_LINE_BYTES
                if too_long:
                    partial.clear()
            if end < 0:
                break
            number += 1
            yield number, None if too_long else bytes(partial)
            partial.clear()
            too_long = False
            start = end + 1
    if partial or too_long:
        yield number + 1, None if too_long else bytes(partial)


@dataclass
class Report:
    errors: list[BatchError] = field(default_factory=list)
    error_count: int = 0
    requests: int = 0
    models: set[str] = field(default_factory=set)

    def add(self, code: str, message: str, line: int | None, param: str | None = None) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_LISTED:
            self.errors.append(BatchError(code=code, message=message, param=param, line=line))


class LineError(Exception):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


_AT = re.compile(r" - at `\$\.?([^`]*)`$")
_FIELD = re.compile(r"(?:missing required|unknown) field `([^`]+)`")


def _param(text: str, prefix: str = "") -> str | None:
    """The parameter a msgspec validation message is about (`body.messages`, `custom_id`)."""
    at = _AT.search(text)
    field = _FIELD.search(text)
    path = [p for p in (prefix, at.group(1) if at else "", field.group(1) if field else "") if p]
    return ".".join(path) or None


_GENERATIONS: dict[str, Any] = {
    "/v1/chat/completions": (ChatCompletionRequest, chat_to_generate),
    "/v1/completions": (CompletionRequest, completion_to_generate),
}


def _convert(body: dict[str, Any], cls: type[T]) -> T:
    try:
        return msgspec.convert(body, cls)
    except msgspec.ValidationError as exc:
        text = str(exc)
        raise LineError("invalid_request", f"invalid body: {text}", _param(text, "body")) from None


def check_body(endpoint: str, body: dict[str, Any]) -> str:
    """A line's body checked as its endpoint checks a request before sending it on (the endpoints' own checks);
    the model it names (a moderation line's default or alias as the endpoint resolves it)."""
    try:
        if endpoint in _GENERATIONS:
            body_type, to_generate = _GENERATIONS[endpoint]
            request = _convert(body, body_type)
            if request.stream:
                raise LineError("invalid_request", "stream is not supported in a batch", "body.stream")
            to_generate(request, "validation", 16)
            return str(request.model)
        if endpoint == "/v1/responses":
            response = _convert(body, CreateResponse)
            if response.stream:
                raise LineError("invalid_request", "stream is not supported in a batch", "body.stream")
            responses_routes.to_generate(response, "validation", [], 16)
            return response.model
        if endpoint == "/v1/embeddings":
            embeddings = _convert(body, EmbeddingsBody)
            inputs(embeddings)
            return embeddings.model
        if endpoint == "/v1/moderations":
            return vision_routes.check_moderation(_convert(body, vision_routes.ModerationBody),
                                                  vision_routes.image_settings())
    except InferBusError as exc:
        raise LineError(exc.code, exc.message, f"body.{exc.param}" if exc.param else "body") from None
    raise LineError("invalid_url", f"batch lines for {endpoint} are not served", "url")


def line_model(endpoint: str, body: dict[str, Any]) -> str:
    """The model of a line that passed `check_body`."""
    if endpoint == "/v1/moderations":
        return vision_routes.moderation_model(body.get("model"))
    return str(body["model"])


def check_line(raw: bytes, endpoint: str, caller: Caller, known: Known) -> tuple[InputLine, str]:
    """One line as the request it names and its model, or LineError saying what is wrong with it."""
    try:
        item = input_line_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        text = str(exc)
        raise LineError("invalid_request", f"this line is not a batch request: {text}", _param(text)) from None
    except msgspec.DecodeError as exc:
        raise LineError("invalid_json_line", f"this line is not valid JSON: {exc}") from None
    if item.method != "POST":
        raise LineError("invalid_method", f"method must be POST, not {item.method!r}", "method")
    if item.url != endpoint:
        raise LineError("invalid_url", f"url must be the batch's endpoint {endpoint!r}, not {item.url!r}", "url")
    model = check_body(endpoint, item.body)
    kind = ENDPOINT_KINDS[endpoint]
    if not scope_allows(caller.scopes, kind, model):
        raise LineError("permission_denied", f"this API key may not use the model '{model}'", "body.model")
    if not known(kind, model):
        raise LineError("model_not_found", f"the model '{model}' does not exist", "body.model")
    return item, model


async def validate(chunks: AsyncIterator[bytes], endpoint: str, caller: Caller, known: Known) -> Report:
    """Every line checked (custom_id unique, method, url, body, model allowed); errors name their lines."""
    report = Report()
    seen: set[str] = set()
    async for number, raw in lines(chunks):
        if raw is None:
            report.add("line_too_long", f"a line may hold at most {MAX_LINE_BYTES} bytes", number)
            continue
        if not raw.strip():
            continue
        report.requests += 1
        if report.requests > MAX_LINES:
            report.add("too_many_requests", f"a batch may hold at most {MAX_LINES} requests", number)
            break
        try:
            item, model = check_line(raw, endpoint, caller, known)
        except LineError as exc:
            report.add(exc.code, exc.message, number, exc.param)
            continue
        if item.custom_id in seen:
            report.add("duplicate_custom_id", f"custom_id {item.custom_id!r} is used by an earlier line", number,
                       "custom_id")
            continue
        seen.add(item.custom_id)
        report.models.add(model)
    if report.requests == 0 and not report.errors:
        report.add("empty_file", "the input file holds no requests", None)
    return report


async def work_items(chunks: AsyncIterator[bytes], batch_id: str, endpoint: str) -> AsyncIterator[WorkItem]:
    """The lines of a file that passed `validate`, as work queue items."""
    async for number, raw in lines(chunks):
        if raw is None or not raw.strip():
            continue
        item = input_line_decoder.decode(raw)
        yield WorkItem(batch_id=batch_id, line=number, custom_id=item.custom_id,
                       model=line_model(endpoint, item.body), body=msgspec.json.encode(item.body))


async def custom_ids(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[int, str]]:
    """(line, custom_id) of each request line (to answer the lines a cancelled or expired batch never ran)."""
    async for number, raw in lines(chunks):
        if raw is None or not raw.strip():
            continue
        try:
            yield number, input_line_decoder.decode(raw).custom_id
        except msgspec.DecodeError:
            continue
