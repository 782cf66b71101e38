"""Files as objects in the JetStream object store INFERBUS_FILES, written and read a chunk at a time.

The layout is nats-py's (and the `nats` CLI's): chunks on `$O.<bucket>.C.<nuid>`, one JSON meta message
per object on `$O.<bucket>.M.<base64url(name)>` (a rollup keeps only the latest). nats-py's own
`ObjectStore.put` and `get` need the whole object or a blocking file: here a chunk is published as it
arrives and read back one `get_msg` at a time, so a file of any size passes through in CHUNK_BYTES.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

from contracts.batch import CHUNK_BYTES
from contracts.subjects import FILES_BUCKET
from services.runtime import bus
from services.runtime.bus import JetStreamContext, ObjectStoreConfig

STREAM = f"OBJ_{FILES_BUCKET}"
ROLLUP = {"Nats-Rollup": "sub"}


class ObjectMissing(Exception):
    pass


class Info(NamedTuple):
    name: str
    nuid: str
    size: int
    chunks: int
    digest: str


def _meta_subject(name: str) -> str:
    return f"$O.{FILES_BUCKET}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"


def _chunk_subject(nuid: str) -> str:
    return f"$O.{FILES_BUCKET}.C.{nuid}"


class Objects:
    def __init__(self, js: JetStreamContext) -> None:
        self.js = js

    async def ensure(self) -> None:
        """Create the bucket (kept until deleted: files outlive every process) if it is not there."""
        try:
            await self.js.object_store(FILES_BUCKET)
        except bus.js_errors.BucketNotFoundError:
            try:
                await self.js.create_object_store(
                    FILES_BUCKET, ObjectStoreConfig(description="InferBus files: batch input and output"))
            except bus.js_errors.BadRequestError:  # created meanwhile by another replica
                await self.js.object_store(FILES_BUCKET)

    def writer(self, name: str) -> Writer:
        return Writer(self.js, name)

    async def put(self, name: str, chunks: AsyncIterator[bytes]) -> int:
        """Write `name` from `chunks` (any sizes; stored in CHUNK_BYTES pieces), replacing it; its size."""
        writer = self.writer(name)
        buffer = bytearray()
        try:
            async for piece in chunks:
                buffer += piece
                while len(buffer) >= CHUNK_BYTES:
                    await writer.add(bytes(buffer[:CHUNK_BYTES]))
                    del buffer[:CHUNK_BYTES]
            if buffer:
                await writer.add(bytes(buffer))
            return await writer.close()
        except BaseException:
            await writer.abort()
            raise

    async def info(self, name: str) -> Info:
        try:
            msg = await self.js.get_last_msg(STREAM, _meta_subject(name))
        except bus.js_errors.NotFoundError:
            raise ObjectMissing(name) from None
        meta = json.loads(msg.data or b"{}")
        if meta.get("deleted") or not meta.get("nuid"):
            raise ObjectMissing(name)
        return Info(name, meta["nuid"], int(meta.get("size", 0)), int(meta.get("chunks", 0)), meta.get("digest", ""))

    async def chunk(self, info: Info, after: int) -> tuple[bytes, int]:
        """The object's first chunk with a stream sequence above `after`: (bytes, its sequence)."""
        try:
            msg = await self.js.get_msg(STREAM, seq=after + 1, subject=_chunk_subject(info.nuid), next=True)
        except bus.js_errors.NotFoundError:
            raise ObjectMissing(info.name) from None
        assert msg.seq is not None
        return msg.data or b"", msg.seq

    async def read(self, name: str) -> AsyncIterator[bytes]:
        """The object's content, chunk by chunk, checked against its digest at the end."""
        info = await self.info(name)
        digest = hashlib.sha256()
        seq = 0
        for _ in range(info.chunks):
            data, seq = await self.chunk(info, seq)
            digest.update(data)
            yield data
        if info.digest and info.digest != _digest(digest):
            raise ObjectMissing(f"{name}: content does not match its digest")

    async def delete(self, name: str) -> bool:
        """Remove the object (meta marked deleted, chunks purged); False if it was not there."""
        try:
            info = await self.info(name)
        except ObjectMissing:
            return False
        meta = {"name": name, "bucket": FILES_BUCKET, "nuid": info.nuid, "size": 0, "chunks": 0, "digest": "",
                "deleted": True, "mtime": _now()}
        await self.js.publish(_meta_subject(name), json.dumps(meta).encode(), headers=ROLLUP)
        await self.js.purge_stream(STREAM, subject=_chunk_subject(info.nuid))
        return True


class Writer:
    """One object being written: chunks go to JetStream as they come, the meta message last."""

    def __init__(self, js: JetStreamContext, name: str) -> None:
        self.js = js
        self.name = name
        self.nuid = secrets.token_hex(11)  # fresh chunks subject: a replaced object's old chunks stay valid till then
        self.size = 0
        self.chunks = 0
        self._digest = hashlib.sha256()

    async def add(self, data: bytes) -> None:
        if not data:
            return
        await self.js.publish(_chunk_subject(self.nuid), data)
        self._digest.update(data)
        self.size += len(data)
        self.chunks += 1

    async def close(self) -> int:
        """Publish the meta message (the object now exists, or is replaced); purge a replaced one's chunks."""
        old: Info | None = None
        try:
            old = await Objects(self.js).info(self.name)
        except ObjectMissing:
            pass
        meta: dict[str, Any] = {
            "name": self.name, "bucket": FILES_BUCKET, "nuid": self.nuid, "size": self.size, "chunks": self.chunks,
            "digest": _digest(self._digest), "mtime": _now(), "options": {"max_chunk_size": CHUNK_BYTES},
        }
        await self.js.publish(_meta_subject(self.name), json.dumps(meta).encode(), headers=ROLLUP)
        if old is not None and old.nuid != self.nuid:
            await self.js.purge_stream(STREAM, subject=_chunk_subject(old.nuid))
        return self.size

    async def abort(self) -> None:
        """Drop the chunks written so far (the object was never announced)."""
        try:
            await self.js.purge_stream(STREAM, subject=_chunk_subject(self.nuid))
        except Exception:  # unreachable now: orphaned chunks take space but are never read
            pass


def _digest(digest: Any) -> str:
    return "SHA-256=" + base64.urlsafe_b64encode(digest.digest()).decode()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
