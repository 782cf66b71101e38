"""The Files and Batch APIs: OpenAI's shapes, and what the gateway, the CLI and the batch service send each other.

The batch service owns files (bytes in the JetStream object store `INFERBUS_FILES`, metadata in
PostgreSQL), batches and their per-line results. The gateway is its HTTP edge (`batch.api.*`, JSON
replies wrapped in `contracts.control.Reply`) and also runs each line through its own dispatch path
(`batch.exec`, msgpack): the batch service takes lines off the JetStream work queue `BATCH`
(`batch.work.<batch id>`) and asks a gateway to execute them, so a batch line gets the registry's
routing, fallbacks, budgets, the request log and usage like any request.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta, Struct

# ---- limits and names ----------------------------------------------------------------------------

# What a batch may run, and the kind of model (scopes, workers) each endpoint's lines use.
ENDPOINT_KINDS: Final = {
    "/v1/chat/completions": "llm", "/v1/completions": "llm", "/v1/responses": "llm", "/v1/embeddings": "embed",
    "/v1/moderations": "vision",
}
ENDPOINTS: Final = tuple(ENDPOINT_KINDS)
# A line's request id starts as the endpoint's interactive ids do (chatcmpl-..., resp_..., embd-...).
REQUEST_ID_PREFIXES: Final = {
    "/v1/chat/completions": "chatcmpl-", "/v1/completions": "cmpl-", "/v1/responses": "resp_",
    "/v1/embeddings": "embd-", "/v1/moderations": "modr-",
}
FILE_PURPOSES: Final = ("batch", "batch_output")  # what this platform stores files for
MAX_LINES: Final = 50_000  # requests in one batch file (OpenAI's limit)
MAX_LINE_BYTES: Final = 1 << 20  # one request line
MAX_ERRORS_LISTED: Final = 100  # validation errors returned with a failed batch
CHUNK_BYTES: Final = 256 * 1024  # object store chunk and upload/download message size (under max_payload)
BATCH_HEADER: Final = "Inferbus-Batch"  # on a batch line's bus request: the batch id (usage marker)
BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
ACTIVE: Final = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL: Final = ("failed", "completed", "expired", "cancelled")
_WINDOW = re.compile(r"^(\d{1,6})([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def window_seconds(window: str) -> int:
    """'24h' (OpenAI's only value; the service may allow others) in seconds; ValueError if malformed."""
    match = _WINDOW.match(window)
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"completion_window must look like '24h', not {window!r}")
    return int(match.group(1)) * _UNITS[match.group(2)]


def scope_allows(scopes: list[str], kind: str, model: str) -> bool:
    """Whether a key with `scopes` may use `model` of `kind` (the rule the gateway's KeyRecord.allows applies)."""
    if "admin" in scopes or "inference" in scopes:
        return True
    kinds = {s[5:] for s in scopes if s.startswith("kind:")}
    models = {s[6:] for s in scopes if s.startswith("model:")}
    if not kinds and not models:
        return False
    return (not kinds or kind in kinds) and (not models or model in models)


def request_id(endpoint: str, batch_id: str, line: int) -> str:
    """A line's platform request id: the same on every run of it, so its usage is counted once."""
    return f"{REQUEST_ID_PREFIXES[endpoint]}{batch_id}-{line}"


def line_item_id(batch_id: str, line: int) -> str:
    """The `id` of a line's record in the output or error file."""
    return f"batch_req_{batch_id.removeprefix('batch_')}_{line}"


# ---- who asks: set by the gateway from the authenticated key, never by a client ------------------


class Caller(Struct, frozen=True, kw_only=True):
    key_id: str
    tenant_id: str
    scopes: list[str]


# ---- OpenAI objects --------------------------------------------------------------------------------


class FileObject(Struct, frozen=True, kw_only=True):
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    object: str = "file"
    status: str = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileList(Struct, frozen=True, kw_only=True):
    data: list[FileObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
    object: str = "list"


class FileDeleted(Struct, frozen=True, kw_only=True):
    id: str
    deleted: bool = True
    object: str = "file"


class BatchError(Struct, frozen=True, kw_only=True):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(Struct, frozen=True, kw_only=True):
    data: list[BatchError]
    object: str = "list"


class RequestCounts(Struct, frozen=True, kw_only=True):
    total: int = 0
    completed: int = 0
    failed: int = 0


class InputTokensDetails(Struct, frozen=True, kw_only=True):
    cached_tokens: int = 0


class OutputTokensDetails(Struct, frozen=True, kw_only=True):
    reasoning_tokens: int = 0


class BatchUsage(Struct, frozen=True, kw_only=True):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails = InputTokensDetails()
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()


class BatchObject(Struct, frozen=True, kw_only=True):
    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus
    created_at: int
    request_counts: RequestCounts
    object: str = "batch"
    errors: BatchErrors | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    metadata: dict[str, str] | None = None
    model: str | None = None
    usage: BatchUsage | None = None


class BatchList(Struct, frozen=True, kw_only=True):
    data: list[BatchObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
    object: str = "list"


# ---- one input line, as a client writes it ---------------------------------------------------------

CustomId = Annotated[str, Meta(min_length=1, max_length=512)]


class InputLine(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    custom_id: CustomId
    method: str
    url: str
    body: dict[str, Any]


input_line_decoder = msgspec.json.Decoder(InputLine)

# ---- requests to the batch service (JSON; the reply is a contracts.control.Reply) -----------------

MetadataMap = Annotated[dict[Annotated[str, Meta(max_length=64)], Annotated[str, Meta(max_length=512)]],
                        Meta(max_length=16)]


class UploadStart(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Open an upload; its chunks then go to the subject in the reply (the replica that holds it)."""

    caller: Caller
    filename: str


class UploadOpened(Struct, frozen=True, kw_only=True):
    upload_id: str
    subject: str  # send chunks here (raw bytes, headers UPLOAD_ID and UPLOAD_SEQ), then an UploadEnd
    max_bytes: int
    chunk_bytes: int = CHUNK_BYTES


class UploadEnd(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The last message of an upload (multipart may name the purpose after the file, so it comes here)."""

    upload_id: str
    chunks: int  # how many chunks were sent: a lost one fails the upload
    purpose: str = ""
    expires_after_s: int | None = None
    abort: bool = False  # the client went away: drop what was written


UPLOAD_END: Final = "Inferbus-Upload-End"  # header on the UploadEnd message (chunks carry UPLOAD_SEQ)


UPLOAD_ID: Final = "Inferbus-Upload"
UPLOAD_SEQ: Final = "Inferbus-Upload-Seq"


class FileRef(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    caller: Caller
    file_id: str


class FileChunk(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The next chunk of a file's content at or after stream sequence `after` (0: the first).

    Replied with the chunk's bytes; headers CHUNK_SEQ (pass it back as `after`) and CHUNK_LAST."""

    caller: Caller
    file_id: str
    after: int = 0
    index: int = 0  # which chunk this is (0: the first)


CHUNK_SEQ: Final = "Inferbus-Chunk-Seq"
CHUNK_LAST: Final = "Inferbus-Chunk-Last"


class ListFiles(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    caller: Caller
    purpose: str | None = None
    limit: Annotated[int, Meta(ge=1, le=10_000)] = 10_000
    after: str | None = None
    order: Literal["asc", "desc"] = "desc"


class CreateBatch(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    caller: Caller
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: MetadataMap | None = None


class BatchRef(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    caller: Caller
    batch_id: str


class ListBatches(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    caller: Caller
    limit: Annotated[int, Meta(ge=1, le=100)] = 20
    after: str | None = None


# ---- operator requests (`inferbus batch ...` over NATS, admin role) -------------------------------


class AdminListBatches(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    tenant_id: str | None = None
    status: str | None = None
    limit: Annotated[int, Meta(ge=1, le=1000)] = 50


class SetWebhook(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A key's batch webhook: its URL (a batch's metadata `webhook_url` may name another) and signing secret.

    A new secret is made when none exists or `rotate` is set; the reply shows it once."""

    key_id: str
    tenant_id: str = "default"
    url: str | None = None
    rotate: bool = False


class WebhookView(Struct, frozen=True, kw_only=True, omit_defaults=True):
    key_id: str
    tenant_id: str
    url: str | None
    created_at: str
    secret: str | None = None  # only in the reply that made it


class KeyRef(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    key_id: str | None = None


class ListDeliveries(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    batch_id: str | None = None
    limit: Annotated[int, Meta(ge=1, le=1000)] = 50


class Delivery(Struct, frozen=True, kw_only=True):
    event_id: str
    type: str
    batch_id: str
    url: str
    status: str  # pending, delivered, failed (gave up)
    attempts: int
    created_at: str
    last_status: int | None = None  # the receiver's HTTP status on the last attempt
    last_error: str | None = None
    delivered_at: str | None = None
    next_attempt_at: str | None = None


# ---- webhook events (what a receiver gets; OpenAI's shape) ---------------------------------------

WEBHOOK_TYPES: Final = {"completed": "batch.completed", "failed": "batch.failed",
                        "cancelled": "batch.cancelled", "expired": "batch.expired"}


class WebhookData(Struct, frozen=True):
    id: str


class WebhookEvent(Struct, frozen=True, kw_only=True):
    id: str
    type: str
    created_at: int
    data: WebhookData
    object: str = "event"


# ---- the work queue and the gateway's line execution (msgpack) -------------------------------------


class WorkItem(Struct, frozen=True, kw_only=True, array_like=True):
    """One line on the work queue: everything needed to run it, so running never re-reads the file."""

    batch_id: str
    line: int  # 1-based line number in the input file
    custom_id: str
    model: str
    body: bytes  # the line's `body`, JSON


class ExecLine(Struct, frozen=True, kw_only=True):
    """Run one line on a gateway (`batch.exec`); the reply inbox gets ExecAlive every ALIVE_S, then ExecResult."""

    request_id: str
    batch_id: str
    key_id: str
    endpoint: str
    body: bytes
    attempt: int = 0  # the first bus attempt number (raised after an attempt a worker answered)
    timeout_s: float = 600.0


class ExecAlive(Struct, frozen=True, tag="alive"):
    """The line is still running (every ALIVE_S): silence means the gateway is gone."""


class ExecResult(Struct, frozen=True, kw_only=True, tag="result"):
    status_code: int
    body: bytes  # the endpoint's response (or error) body, JSON
    code: str | None = None  # the error code, None on success
    retryable: bool = False
    retry_after: float | None = None
    worker_attempts: int = 0  # sends a worker accepted (usage rows the run may have left)
    prompt_tokens: int = 0
    completion_tokens: int = 0


ALIVE_S: Final = 1.0
ExecReply = ExecAlive | ExecResult
work_encoder = msgspec.msgpack.Encoder()
work_decoder = msgspec.msgpack.Decoder(WorkItem)
exec_encoder = msgspec.msgpack.Encoder()
exec_line_decoder = msgspec.msgpack.Decoder(ExecLine)
exec_reply_decoder = msgspec.msgpack.Decoder(ExecReply)
