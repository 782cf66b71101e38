"""What the batch service answers: the Files and Batch APIs for the gateway (`batch.api.*`), uploads on each
replica's own subject, and the operator's requests (`batch.admin.*`)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from contracts.batch import (
    CHUNK_LAST,
    CHUNK_SEQ,
    ENDPOINTS,
    UPLOAD_END,
    UPLOAD_ID,
    UPLOAD_SEQ,
    AdminListBatches,
    BatchList,
    BatchObject,
    BatchRef,
    CreateBatch,
    Delivery,
    FileChunk,
    FileDeleted,
    FileList,
    FileObject,
    FileRef,
    KeyRef,
    ListBatches,
    ListDeliveries,
    ListFiles,
    SetWebhook,
    UploadEnd,
    UploadOpened,
    UploadStart,
    WebhookView,
    window_seconds,
)
from contracts.control import AdminError, Reply
from contracts.errors import InferBusError, invalid
from contracts.subjects import BATCH_CHANGED, batch_upload
from services.batch.objects import Info, ObjectMissing, Objects, Writer
from services.batch.store import Store
from services.batch.webhooks import check_url, new_secret
from services.runtime import bus
from services.runtime import logging as log

FILE_EXPIRY_RANGE = (3600, 30 * 86400)  # what `expires_after[seconds]` may be (OpenAI's bounds)


def _not_found(what: str, ident: str, param: str) -> InferBusError:
    return InferBusError("not_found", f"No such {what}: '{ident}'", param=param)


@dataclass
class Upload:
    writer: Writer
    tenant_id: str
    key_id: str
    filename: str
    max_bytes: int
    seq: int = 0
    touched: float = field(default_factory=time.monotonic)


class Uploads:
    """Uploads in progress on this replica: chunks are written to the object store as they arrive (and each
    is answered only then, so a fast client never runs ahead of storage)."""

    def __init__(self, nc: bus.Connection, objects: Objects, store: Store, instance: str, max_bytes: int,
                 file_expiry_s: float) -> None:
        self.nc = nc
        self.objects = objects
        self.store = store
        self.subject = batch_upload(instance)
        self.max_bytes = max_bytes
        self.file_expiry_s = file_expiry_s
        self.open: dict[str, Upload] = {}
        self.logger = log.get("batch-uploads")

    async def start(self) -> None:
        await self.nc.subscribe(self.subject, cb=self._on_message)

    async def begin(self, body: UploadStart) -> UploadOpened:
        upload_id = "file-" + secrets.token_hex(12)
        self.open[upload_id] = Upload(self.objects.writer(upload_id), body.caller.tenant_id, body.caller.key_id,
                                      body.filename[:255] or "upload.jsonl", self.max_bytes)
        return UploadOpened(upload_id=upload_id, subject=self.subject, max_bytes=self.max_bytes)

    async def _on_message(self, msg: bus.Msg) -> None:
        headers = msg.headers or {}
        try:
            if UPLOAD_END in headers:
                result: Any = await self._end(msgspec.json.decode(msg.data, type=UploadEnd))
            else:
                result = await self._chunk(headers.get(UPLOAD_ID, ""), int(headers.get(UPLOAD_SEQ, "-1")), msg.data)
            reply = Reply(result=result)
        except InferBusError as exc:
            reply = Reply(error=AdminError(exc.code, exc.message, exc.param))
        except (ValueError, msgspec.DecodeError) as exc:
            reply = Reply(error=AdminError("invalid_request", f"malformed upload message: {exc}"))
        except Exception as exc:
            self.logger.exception("upload_failed", error=repr(exc))
            reply = Reply(error=AdminError("internal_error", "storing the upload failed"))
        if msg.reply:
            await self.nc.publish(msg.reply, msgspec.json.encode(reply))

    def _get(self, upload_id: str) -> Upload:
        upload = self.open.get(upload_id)
        if upload is None:
            raise InferBusError("not_found", "this upload is not open (it timed out, or another replica holds it)")
        upload.touched = time.monotonic()
        return upload

    async def _chunk(self, upload_id: str, seq: int, data: bytes) -> int:
        upload = self._get(upload_id)
        if seq != upload.seq:
            await self._drop(upload_id)
            raise invalid(f"upload chunk {seq} arrived where {upload.seq} was due")
        if upload.writer.size + len(data) > upload.max_bytes:
            await self._drop(upload_id)
            raise InferBusError("request_too_large", f"files may be at most {upload.max_bytes} bytes", param="file")
        await upload.writer.add(data)
        upload.seq += 1
        return upload.writer.size

    async def _end(self, end: UploadEnd) -> FileObject | None:
        upload = self._get(end.upload_id)
        if end.abort:
            await self._drop(end.upload_id)
            return None
        if end.chunks != upload.seq:
            await self._drop(end.upload_id)
            raise invalid(f"the upload sent {end.chunks} chunks but {upload.seq} arrived")
        if end.purpose != "batch":
            await self._drop(end.upload_id)
            raise invalid(f"purpose must be 'batch' (the only one this platform stores), not {end.purpose!r}",
                          "purpose")
        expires = self.file_expiry_s or None
        if end.expires_after_s is not None:
            low, high = FILE_EXPIRY_RANGE
            if not low <= end.expires_after_s <= high:
                await self._drop(end.upload_id)
                raise invalid(f"expires_after[seconds] must be between {low} and {high}", "expires_after")
            expires = end.expires_after_s
        self.open.pop(end.upload_id)
        size = await upload.writer.close()
        return await self.store.add_file(end.upload_id, None, upload.tenant_id, upload.filename, "batch", size,
                                         time.time() + expires if expires else None)

    async def _drop(self, upload_id: str) -> None:
        upload = self.open.pop(upload_id, None)
        if upload is not None:
            await upload.writer.abort()

    async def sweep(self, idle_s: float) -> None:
        """Drop uploads whose client went quiet (a gateway that died mid-upload)."""
        now = time.monotonic()
        for upload_id in [u for u, up in self.open.items() if now - up.touched > idle_s]:
            self.logger.info("upload_abandoned", upload_id=upload_id)
            await self._drop(upload_id)


class Api:
    """The Files and Batch APIs (every request names its caller; a file or batch of another tenant is 404)."""

    def __init__(self, nc: bus.Connection, store: Store, objects: Objects, uploads: Uploads, cfg: Any,
                 poke: Callable[[], None]) -> None:
        self.nc = nc
        self.store = store
        self.objects = objects
        self.uploads = uploads
        self.cfg = cfg
        self.poke = poke
        self._infos: dict[str, tuple[Info, float]] = {}

    # ---- files ---------------------------------------------------------------------------------

    async def upload(self, body: UploadStart) -> UploadOpened:
        return await self.uploads.begin(body)

    async def get_file(self, body: FileRef) -> FileObject:
        found = await self.store.file(body.caller.tenant_id, body.file_id)
        if found is None:
            raise _not_found("file", body.file_id, "file_id")
        return found

    async def list_files(self, body: ListFiles) -> FileList:
        # Pages of at most 1,000 (OpenAI's default is 10,000: `has_more` and `after` page through the rest), so a
        # reply stays well under the bus's message size.
        return await self.store.files(body.caller.tenant_id, body.purpose, min(body.limit, 1000), body.after,
                                      body.order == "desc")

    async def delete_file(self, body: FileRef) -> FileDeleted:
        if not await self.store.delete_file(body.caller.tenant_id, body.file_id):
            raise _not_found("file", body.file_id, "file_id")
        self._infos.pop(body.file_id, None)
        await self.objects.delete(body.file_id)
        return FileDeleted(id=body.file_id)

    async def chunk(self, request: bus.MicroRequest) -> None:
        """One chunk of a file's content, as raw bytes (headers say where the next one starts, and if it is last)."""
        try:
            body = msgspec.json.decode(request.data, type=FileChunk)
            info = await self._info(body)
            if info.chunks == 0:
                data, seq = b"", 0
            else:
                data, seq = await self.objects.chunk(info, body.after)
            last = body.index + 1 >= info.chunks
            await request.respond(data, headers={CHUNK_SEQ: str(seq), CHUNK_LAST: "1" if last else "0"})
        except (InferBusError, ObjectMissing, msgspec.MsgspecError) as exc:
            error = exc if isinstance(exc, InferBusError) else InferBusError("not_found", f"file content: {exc}")
            await request.respond(msgspec.json.encode(Reply(error=AdminError(error.code, error.message, error.param))))

    async def _info(self, body: FileChunk) -> Info:
        """The file's object (checked once per download: the first chunk asks PostgreSQL, the rest use it)."""
        cached = self._infos.get(body.file_id)
        if body.index > 0 and cached is not None and cached[1] > time.monotonic():
            return cached[0]
        if await self.store.file(body.caller.tenant_id, body.file_id) is None:
            raise _not_found("file", body.file_id, "file_id")
        info = await self.objects.info(body.file_id)
        if len(self._infos) > 1000:
            self._infos.clear()
        self._infos[body.file_id] = (info, time.monotonic() + 60.0)
        return info

    # ---- batches -------------------------------------------------------------------------------

    async def create_batch(self, body: CreateBatch) -> BatchObject:
        if body.endpoint not in ENDPOINTS:
            raise invalid(f"endpoint must be one of {', '.join(ENDPOINTS)}, not {body.endpoint!r}", "endpoint")
        if body.completion_window not in self.cfg.completion_windows:
            raise invalid(f"completion_window must be {' or '.join(map(repr, self.cfg.completion_windows))}",
                          "completion_window")
        found = await self.store.file(body.caller.tenant_id, body.input_file_id)
        if found is None:
            raise _not_found("file", body.input_file_id, "input_file_id")
        if found.purpose != "batch":
            raise invalid(f"the input file's purpose is {found.purpose!r}; upload it with purpose 'batch'",
                          "input_file_id")
        webhook_url = (body.metadata or {}).get("webhook_url")
        if webhook_url:
            check_url(webhook_url, self.cfg.webhook_allow_private)
            if await self.store.webhook(body.caller.key_id) is None:
                raise invalid("this API key has no webhook signing secret: an operator sets one with"
                              " `inferbus batch webhooks set KEY_ID`", "metadata.webhook_url")
        batch_id = "batch_" + secrets.token_hex(12)
        expires = time.time() + window_seconds(body.completion_window)
        created = await self.store.add_batch(batch_id, body.caller, body.endpoint, body.input_file_id,
                                             body.completion_window, expires, body.metadata, webhook_url)
        self.poke()
        return created

    async def get_batch(self, body: BatchRef) -> BatchObject:
        found = await self.store.batch(body.caller.tenant_id, body.batch_id)
        if found is None:
            raise _not_found("batch", body.batch_id, "batch_id")
        return found

    async def list_batches(self, body: ListBatches) -> BatchList:
        return await self.store.batches(body.caller.tenant_id, body.limit, body.after)

    async def cancel_batch(self, body: BatchRef) -> BatchObject:
        found = await self.store.cancel(body.caller.tenant_id, body.batch_id)
        if found is None:
            raise _not_found("batch", body.batch_id, "batch_id")
        if found.status == "cancelling":
            await self.nc.publish(BATCH_CHANGED, body.batch_id.encode())  # every replica stops its lines now
            self.poke()
        return found

    # ---- the operator's ---------------------------------------------------------------------------

    async def admin_batches(self, body: AdminListBatches) -> BatchList:
        return await self.store.batches(body.tenant_id, body.limit, None, body.status)

    async def set_webhook(self, body: SetWebhook) -> WebhookView:
        if body.url:
            check_url(body.url, self.cfg.webhook_allow_private)
        secret = new_secret() if body.rotate or await self.store.webhook(body.key_id) is None else None
        view = await self.store.set_webhook(body.key_id, body.tenant_id, body.url, secret)
        return msgspec.structs.replace(view, secret=secret)

    async def webhooks(self, body: KeyRef) -> list[WebhookView]:
        return await self.store.webhooks(body.key_id)

    async def delete_webhook(self, body: KeyRef) -> bool:
        if not body.key_id:
            raise invalid("key_id is required", "key_id")
        return await self.store.delete_webhook(body.key_id)

    async def deliveries(self, body: ListDeliveries) -> list[Delivery]:
        return await self.store.deliveries(body.batch_id, body.limit)


async def sweep_files(store: Store, objects: Objects) -> int:
    """Delete files past their expiry (their rows first, so nothing serves them meanwhile)."""
    expired = await store.expired_files()
    for file_id in expired:
        await objects.delete(file_id)
    return len(expired)

