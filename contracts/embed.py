"""Embeddings: the OpenAI-shaped request the edge accepts, and what travels on the bus.

The bus protocol is the streaming one every kind shares (`infer.embed.<model>.<version>`): Accepted,
Heartbeats while queued or batching, one or more Vectors chunks, then EmbedDone or an ErrorChunk.
Vectors are raw little-endian float32 rows in msgpack (never JSON floats or base64 on the bus), at most
VECTOR_CHUNK bytes per chunk, so no message exceeds the server's max payload whatever the batch.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta, Struct

from contracts.errors import InferBusError, invalid
from contracts.llm import Accepted, Attempt, Bundle, ErrorChunk, Heartbeat

MAX_INPUTS: Final = 2048  # OpenAI's limit on inputs per request
VECTOR_CHUNK: Final = 256 * 1024
DTYPE: Final = "<f4"  # every vector on the bus and in base64 answers: little-endian float32

# ---- OpenAI HTTP shape (JSON) -----------------------------------------------------------------


class EmbeddingsBody(Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    input: str | list[Any]  # a string, strings, one token array, or token arrays: checked by `inputs`
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Meta(ge=1)] | None = None
    user: str | None = None
    # InferBus: an input longer than the model's window is refused (False) or cut to it (True).
    truncate: bool = False
    # InferBus, for asymmetric models (E5): a search query (and similarity tasks) or a passage to be found.
    input_type: Literal["query", "passage"] = "query"


Inputs = tuple[list[str] | None, list[list[int]] | None]


def inputs(body: EmbeddingsBody) -> Inputs:
    """The input as texts or token arrays (exactly one is set), checked as OpenAI checks it."""
    raw = body.input
    if isinstance(raw, str):
        raw = [raw]
    if not raw:
        raise invalid("input must not be empty", "input")
    if len(raw) > MAX_INPUTS:
        raise invalid(f"input holds {len(raw)} items; the limit is {MAX_INPUTS} per request", "input")
    if all(isinstance(item, str) for item in raw):
        for i, text in enumerate(raw):
            if not text:
                raise invalid(f"input[{i}] is an empty string; every input must hold text", "input")
        return raw, None
    if all(_token(item) for item in raw):
        return None, [list(raw)]
    if all(isinstance(item, list) for item in raw):
        for i, ids in enumerate(raw):
            if not ids:
                raise invalid(f"input[{i}] is an empty token array", "input")
            if not all(_token(t) for t in ids):
                raise invalid(f"input[{i}] must hold token ids (non-negative integers)", "input")
        return None, raw
    raise invalid("input must be a string, an array of strings, an array of token ids or an array of such arrays",
                  "input")


def _token(item: Any) -> bool:
    return isinstance(item, int) and not isinstance(item, bool) and 0 <= item < 1 << 31


# ---- Bus shapes (msgpack) ---------------------------------------------------------------------


class EmbedRequest(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Texts or token arrays (exactly one), already checked at the edge; the worker checks the rest."""

    request_id: str
    model: str
    texts: list[str] | None = None
    tokens: list[list[int]] | None = None
    dimensions: int | None = None  # refused unless the model can give that many
    truncate: bool = False
    query: bool = True  # input_type "query" (True) or "passage"; models without prefixes ignore it
    attempt: Attempt = 0  # see contracts.llm.GenerateRequest

    @property
    def count(self) -> int:
        return len(self.texts or self.tokens or [])


class Vectors(Struct, frozen=True, tag="v", array_like=True):
    """Rows `start`..`start + len(data) / (4 * dim)` of the answer, float32 little-endian, row-major."""

    seq: int
    start: int
    dim: int
    data: bytes


class EmbedDone(Struct, frozen=True, tag="ed", array_like=True):
    """Terminal: how many vectors were sent and the prompt tokens they took (what usage counts)."""

    seq: int
    count: int
    dim: int
    prompt_tokens: int
    truncated: int  # inputs cut to the model's window (only when the request allowed it)
    version: str


EmbedChunk = Accepted | Heartbeat | Vectors | EmbedDone | ErrorChunk | Bundle

embed_encoder = msgspec.msgpack.Encoder()
embed_request_decoder = msgspec.msgpack.Decoder(EmbedRequest)
embed_chunk_decoder = msgspec.msgpack.Decoder(EmbedChunk)


def too_long(index: int, tokens: int, window: int, model: str) -> InferBusError:
    """An input over the model's window, refused (the request did not ask to truncate)."""
    return InferBusError(
        "context_length_exceeded",
        f"input[{index}] is {tokens} tokens; the model '{model}' takes at most {window}. "
        "Shorten it, or send \"truncate\": true to embed its first tokens",
        param="input",
    )
