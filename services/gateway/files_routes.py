"""The Files API (`/v1/files`): uploads streamed to the batch service a chunk at a time, content streamed back.

The batch service stores the bytes (JetStream object store) and owns the metadata; the gateway relays
between HTTP and NATS and never holds a file whole: each chunk is acknowledged once stored before the
next is read from the client, so a fast client is paced by storage and memory stays at one chunk.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import BodyPartReader, web

from contracts import subjects
from contracts.batch import (
    CHUNK_LAST,
    CHUNK_SEQ,
    UPLOAD_END,
    UPLOAD_ID,
    UPLOAD_SEQ,
    Caller,
    FileChunk,
    FileDeleted,
    FileList,
    FileObject,
    FileRef,
    ListFiles,
    UploadEnd,
    UploadOpened,
    UploadStart,
)
from contracts.control import Reply
from contracts.errors import CATALOGUE, InferBusError, invalid
from services.gateway.auth import KeyRecord
from services.gateway.errors import json_response
from services.gateway.state import GATEWAY, Gateway
from services.runtime import bus

routes = web.RouteTableDef()
MAX_FIELD_BYTES = 4096  # a form field other than the file (purpose, expires_after[...])
ASK_S = 15.0  # a batch service request (a batch's creation validates nothing synchronously but the file's owner)


def caller_of(key: KeyRecord) -> Caller:
    return Caller(key_id=key.id, tenant_id=key.tenant_id, scopes=list(key.scopes))


def _error(reply: Reply) -> InferBusError:
    assert reply.error is not None
    code = reply.error.code if reply.error.code in CATALOGUE else "internal_error"
    return InferBusError(code, reply.error.message, param=reply.error.param)


async def ask(gw: Gateway, subject: str, payload: bytes, *, headers: dict[str, str] | None = None,
              wait_s: float = ASK_S) -> Any:
    """One request to the batch service; its typed error raised as the client's error."""
    try:
        msg = await gw.service.bus.request(subject, payload, timeout=wait_s, headers=headers)
    except bus.errors.NoRespondersError:
        raise InferBusError("no_worker", "the batch service is not running; try again shortly") from None
    except bus.errors.TimeoutError:
        raise InferBusError("worker_timeout", "the batch service did not answer in time") from None
    reply = msgspec.json.decode(msg.data, type=Reply)
    if reply.error is not None:
        raise _error(reply)
    return reply.result


async def call(gw: Gateway, op: str, body: msgspec.Struct, typ: type[Any]) -> Any:
    return msgspec.convert(await ask(gw, subjects.batch_api(op), msgspec.json.encode(body)), typ)


async def _field(part: BodyPartReader) -> str:
    data = bytearray()
    while chunk := await part.read_chunk(1024):
        data += chunk
        if len(data) > MAX_FIELD_BYTES:
            raise invalid(f"form field {part.name!r} is too long", part.name)
    return data.decode("utf-8", "replace").strip()


class Relay:
    """One upload's chunks to the batch service replica holding it."""

    def __init__(self, gw: Gateway, opened: UploadOpened) -> None:
        self.gw = gw
        self.opened = opened
        self.chunks = 0
        self.buffer = bytearray()

    async def feed(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= self.opened.chunk_bytes:
            await self._send(bytes(self.buffer[: self.opened.chunk_bytes]))
            del self.buffer[: self.opened.chunk_bytes]

    async def _send(self, data: bytes) -> None:
        headers = {UPLOAD_ID: self.opened.upload_id, UPLOAD_SEQ: str(self.chunks)}
        await ask(self.gw, self.opened.subject, data, headers=headers)
        self.chunks += 1

    async def end(self, purpose: str, expires_after_s: int | None) -> FileObject:
        if self.buffer:
            await self._send(bytes(self.buffer))
            self.buffer.clear()
        body = UploadEnd(upload_id=self.opened.upload_id, chunks=self.chunks, purpose=purpose,
                         expires_after_s=expires_after_s)
        result = await ask(self.gw, self.opened.subject, msgspec.json.encode(body), headers={UPLOAD_END: "1"})
        return msgspec.convert(result, FileObject)

    async def abort(self) -> None:
        body = UploadEnd(upload_id=self.opened.upload_id, chunks=self.chunks, abort=True)
        try:
            await ask(self.gw, self.opened.subject, msgspec.json.encode(body), headers={UPLOAD_END: "1"}, wait_s=2)
        except Exception:  # the batch service drops it after its idle time anyway
            pass


def _expiry(fields: dict[str, str]) -> int | None:
    anchor, seconds = fields.get("expires_after[anchor]"), fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise invalid("expires_after[anchor] must be 'created_at'", "expires_after")
    try:
        return int(seconds or "")
    except ValueError:
        raise invalid("expires_after[seconds] must be an integer", "expires_after") from None


@routes.post("/v1/files")
async def create_file(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    key = await gw.authorize(request)
    if not request.content_type.startswith("multipart/"):
        raise invalid("send multipart/form-data with a 'file' and its 'purpose'")
    reader = await request.multipart()
    fields: dict[str, str] = {}
    relay: Relay | None = None
    done = False
    try:
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise invalid("nested multipart bodies are not accepted")
            if part.name != "file":
                fields[part.name or ""] = await _field(part)
                continue
            if relay is not None:
                raise invalid("send one file per request", "file")
            start = UploadStart(caller=caller_of(key), filename=part.filename or "upload.jsonl")
            relay = Relay(gw, await call(gw, "files.upload", start, UploadOpened))
            while data := await part.read_chunk(relay.opened.chunk_bytes):
                await relay.feed(data)
        if relay is None:
            raise invalid("the 'file' field is missing", "file")
        if "purpose" not in fields:
            raise invalid("the 'purpose' field is missing", "purpose")
        created = await relay.end(fields["purpose"], _expiry(fields))
        done = True
        return json_response(200, created)
    finally:
        if relay is not None and not done:
            await relay.abort()


def _limit(params: Any, default: int, high: int) -> int:
    try:
        value = int(params.get("limit", default))
    except ValueError:
        raise invalid("limit must be an integer", "limit") from None
    if not 1 <= value <= high:
        raise invalid(f"limit must be between 1 and {high}", "limit")
    return value


@routes.get("/v1/files")
async def list_files(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    key = await gw.authorize(request)
    q = request.query
    order = q.get("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid("order must be 'asc' or 'desc'", "order")
    body = ListFiles(caller=caller_of(key), purpose=q.get("purpose"), limit=_limit(q, 10_000, 10_000),
                     after=q.get("after"), order=order)  # type: ignore[arg-type]  # checked above
    return json_response(200, await call(gw, "files.list", body, FileList))


@routes.get("/v1/files/{file_id}")
async def get_file(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    key = await gw.authorize(request)
    body = FileRef(caller=caller_of(key), file_id=request.match_info["file_id"])
    return json_response(200, await call(gw, "files.get", body, FileObject))


@routes.delete("/v1/files/{file_id}")
async def delete_file(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    key = await gw.authorize(request)
    body = FileRef(caller=caller_of(key), file_id=request.match_info["file_id"])
    return json_response(200, await call(gw, "files.delete", body, FileDeleted))


async def _chunk(gw: Gateway, body: FileChunk) -> tuple[bytes, int, bool]:
    try:
        msg = await gw.service.bus.request(subjects.batch_api("files.chunk"), msgspec.json.encode(body), timeout=ASK_S)
    except bus.errors.NoRespondersError:
        raise InferBusError("no_worker", "the batch service is not running; try again shortly") from None
    except bus.errors.TimeoutError:
        raise InferBusError("worker_timeout", "the batch service did not answer in time") from None
    headers = msg.headers or {}
    if CHUNK_SEQ not in headers:
        raise _error(msgspec.json.decode(msg.data, type=Reply))
    return msg.data, int(headers[CHUNK_SEQ]), headers.get(CHUNK_LAST) == "1"


@routes.get("/v1/files/{file_id}/content")
async def file_content(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    key = await gw.authorize(request)
    caller = caller_of(key)
    file_id = request.match_info["file_id"]
    found = await call(gw, "files.get", FileRef(caller=caller, file_id=file_id), FileObject)
    data, seq, last = await _chunk(gw, FileChunk(caller=caller, file_id=file_id))  # errors keep their status
    response = web.StreamResponse(headers={
        "Content-Type": "application/octet-stream", "Content-Length": str(found.bytes),
        "Content-Disposition": f'attachment; filename="{found.filename.replace(chr(34), "")}"'})
    await response.prepare(request)
    index = 0
    while True:
        await response.write(data)
        if last:
            break
        index += 1
        data, seq, last = await _chunk(gw, FileChunk(caller=caller, file_id=file_id, after=seq, index=index))
    await response.write_eof()
    return response
