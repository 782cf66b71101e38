"""A batch input file checked line by line before anything runs: what is wrong, on which line."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from contracts.batch import (
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
from contracts.errors import InferBusError
from contracts.llm import ChatCompletionRequest, CompletionRequest, chat_to_generate, completion_to_generate

Known = Callable[[str], bool]  # is a model served (registry table, configured, or a live worker)?


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


_BODY_TYPES: dict[str, Any] = {
    "/v1/chat/completions": (ChatCompletionRequest, chat_to_generate),
    "/v1/completions": (CompletionRequest, completion_to_generate),
}


def check_line(raw: bytes, endpoint: str, caller: Caller, known: Known) -> InputLine:
    """One line as the request it names, or LineError saying what is wrong with it."""
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
    body_type, to_generate = _BODY_TYPES[endpoint]
    try:
        body = msgspec.convert(item.body, body_type)
    except msgspec.ValidationError as exc:
        text = str(exc)
        raise LineError("invalid_request", f"invalid body: {text}", _param(text, "body")) from None
    if body.stream:
        raise LineError("invalid_request", "stream is not supported in a batch", "body.stream")
    try:
        to_generate(body, "validation", 16)
    except InferBusError as exc:
        raise LineError(exc.code, exc.message, f"body.{exc.param}" if exc.param else "body") from None
    if not scope_allows(caller.scopes, "llm", body.model):
        raise LineError("permission_denied", f"this API key may not use the model '{body.model}'", "body.model")
    if not known(body.model):
        raise LineError("model_not_found", f"the model '{body.model}' does not exist", "body.model")
    return item


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
            item = check_line(raw, endpoint, caller, known)
        except LineError as exc:
            report.add(exc.code, exc.message, number, exc.param)
            continue
        if item.custom_id in seen:
            report.add("duplicate_custom_id", f"custom_id {item.custom_id!r} is used by an earlier line", number,
                       "custom_id")
            continue
        seen.add(item.custom_id)
        report.models.add(str(item.body["model"]))
    if report.requests == 0 and not report.errors:
        report.add("empty_file", "the input file holds no requests", None)
    return report


async def work_items(chunks: AsyncIterator[bytes], batch_id: str) -> AsyncIterator[WorkItem]:
    """The lines of a file that passed `validate`, as work queue items."""
    async for number, raw in lines(chunks):
        if raw is None or not raw.strip():
            continue
        item = input_line_decoder.decode(raw)
        yield WorkItem(batch_id=batch_id, line=number, custom_id=item.custom_id, model=str(item.body["model"]),
                       body=msgspec.json.encode(item.body))


async def custom_ids(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[int, str]]:
    """(line, custom_id) of each request line (to answer the lines a cancelled or expired batch never ran)."""
    async for number, raw in lines(chunks):
        if raw is None or not raw.strip():
            continue
        try:
            yield number, input_line_decoder.decode(raw).custom_id
        except msgspec.DecodeError:
            continue
