"""POST /v1/embeddings: OpenAI-compatible embeddings (float or base64), batched by the worker with other requests."""

from __future__ import annotations

import base64
import secrets
import time
from typing import Any

import numpy as np
from aiohttp import web

from contracts.embed import (
    DTYPE,
    EmbeddingsBody,
    EmbedDone,
    EmbedRequest,
    Vectors,
    embed_chunk_decoder,
    embed_encoder,
    inputs,
)
from contracts.errors import InferBusError
from contracts.llm import Accepted, GenerateRequest, Usage
from services.gateway.auth import KeyRecord
from services.gateway.dispatch import Dispatcher, Served
from services.gateway.errors import json_response
from services.gateway.openai_routes import ADMITTED, BODY, VERSION_HEADER, _decode, _timeout
from services.gateway.state import GATEWAY, Gateway
from services.runtime import logging as log

TRUNCATED_HEADER = "x-inferbus-truncated"  # how many inputs were cut to the model's window (truncate: true)
PAYLOAD_HEADROOM = 4096  # bus headers and framing, below the server's max payload
WORKER_REFUSALS = frozenset({"invalid_request", "unsupported_parameter", "context_length_exceeded"})

routes = web.RouteTableDef()
Matrix = np.ndarray[Any, np.dtype[np.float32]]


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    key = await gw.authorize(request)
    request[ADMITTED] = time.monotonic()
    body: EmbeddingsBody = await _decode(request, EmbeddingsBody)
    rid = "embd-" + secrets.token_hex(12)
    result, headers = await embed(gw, key, body, rid, endpoint=request.path, timeout_s=_timeout(request, gw),
                                  headers=gw.bus_headers(request, key), admitted=request[ADMITTED],
                                  request_body=request.get(BODY))
    return json_response(200, result, headers)


async def embed(
    gw: Gateway, key: KeyRecord, body: EmbeddingsBody, rid: str, *, endpoint: str, timeout_s: float,
    headers: dict[str, str], admitted: float, request_body: bytes | None, dispatcher: Dispatcher | None = None,
    attempt: int = 0, batch: bool = False, served: Served | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """POST /v1/embeddings for a decoded body (the route's and a batch line's): the response body and headers,
    the request logged. A batch line (`batch`) comes with its own dispatcher, its run's `attempt` and its
    batch's bus header; it is admitted at the batch discount."""
    texts, tokens = inputs(body)
    model = gw.settings.model_aliases.get(body.model, body.model)
    request = EmbedRequest(request_id=rid, model=model, texts=texts, tokens=tokens, dimensions=body.dimensions,
                           truncate=body.truncate, query=body.input_type == "query", attempt=attempt)
    payload = embed_encoder.encode(request)
    if len(payload) > gw.service.bus.max_payload - PAYLOAD_HEADROOM:
        raise InferBusError("request_too_large", "The input is too large for one request: split it", param="input")
    # Token budgets and tokens/min count the input: at most one token per byte of text (token arrays: exact),
    # plus each input's two special tokens; settled with the worker's count.
    items = texts if texts is not None else tokens or []
    bound = ("\n".join(texts) if texts is not None else " " * sum(map(len, tokens or []))) + "  " * len(items)
    grant = await gw.admit(key, endpoint, GenerateRequest(request_id=rid, model=model, max_tokens=0, prompt=bound),
                           kind="embed", batch=batch)
    served = Served() if served is None else served
    served.model = model
    used = 0
    error: InferBusError | None = None
    try:
        done, matrix = await _embed(gw, key, request, payload, time.time() + timeout_s, served, headers,
                                    dispatcher or gw.dispatcher, retries=0 if batch else 1)
        used = done.prompt_tokens
        out = {VERSION_HEADER: done.version, "x-request-id": rid, TRUNCATED_HEADER: str(done.truncated),
               **(grant.headers if grant else {})}
        return _body(body, matrix, used), out
    except InferBusError as exc:
        error = exc
        if exc.param is None and exc.code in WORKER_REFUSALS:
            # ErrorChunk carries no param: the worker refuses only the input, or dimensions (it says which).
            exc.param = "dimensions" if body.dimensions is not None and "dimensions" in exc.message else "input"
        raise exc.with_headers({**(grant.headers if grant else {}), **exc.headers}) from None
    except BaseException:
        error = InferBusError("cancelled", "the client closed the connection")
        raise
    finally:
        if grant is not None and gw.governor is not None:
            gw.governor.settle_later(key.id, grant, used, 0, model)
        gw.log_request(key, request_id=rid, kind="embed", model=model, admitted=admitted, served=served,
                       error=error, http_status=error.http_status if error else 200, usage=Usage(used, 0),
                       streamed=False, request_body=request_body)


async def _embed(
    gw: Gateway, key: KeyRecord, embed: EmbedRequest, payload: bytes, deadline: float, served: Served,
    headers: dict[str, str], dispatcher: Dispatcher, retries: int,
) -> tuple[EmbedDone, Matrix]:
    """The worker's vectors as one (count, dim) matrix, and its terminal chunk."""
    route = gw.catalogue.route(embed.model, "embed", key_id=key.id)
    rows: list[bytes] = []
    with log.bound(request_id=embed.request_id, model=embed.model):
        chunks = dispatcher.open(
            "embed", embed.model, route, payload, embed.request_id, decoder=embed_chunk_decoder,
            terminal=(EmbedDone,), progress=(Vectors,), retries=retries, deadline=deadline, headers=headers,
        )
        try:
            async for chunk in chunks:
                if isinstance(chunk, Accepted):
                    served.version, served.worker_id, served.attempts = chunk.version, chunk.worker_id, 1
                elif isinstance(chunk, Vectors):
                    rows.append(chunk.data)
                elif isinstance(chunk, EmbedDone):
                    matrix = np.frombuffer(b"".join(rows), dtype=DTYPE).reshape(chunk.count, chunk.dim)
                    return chunk, matrix
        finally:
            await chunks.aclose()
    raise InferBusError("stream_broken", "the stream ended without the vectors")


def _body(body: EmbeddingsBody, matrix: Matrix, tokens: int) -> dict[str, Any]:
    """OpenAI's list of embedding objects: float lists, or base64 of the little-endian float32 bytes."""
    if body.encoding_format == "base64":
        vectors: list[Any] = [base64.b64encode(row.tobytes()).decode() for row in matrix]
    else:
        vectors = matrix.tolist()
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
        "model": body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
