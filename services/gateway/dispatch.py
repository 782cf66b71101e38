"""Send a generation to the bus and stream it back; retry once if it broke before the first token."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

from contracts import subjects
from contracts.errors import InferBusError
from contracts.llm import Accepted, Chunk, Delta, GenerateRequest
from services.gateway.catalogue import Catalogue
from services.runtime import logging as log
from services.runtime.streaming import StreamClient

RETRY_CODES = frozenset({"stream_broken", "worker_timeout", "overloaded"})


class Dispatcher:
    def __init__(self, client: StreamClient, catalogue: Catalogue, *, retries: int = 1) -> None:
        self.client = client
        self.catalogue = catalogue
        self.retries = retries
        self.logger = log.get("dispatch")

    async def generate(
        self, request: GenerateRequest, *, kind: str, timeout_s: float, headers: dict[str, str] | None = None
    ) -> AsyncGenerator[Chunk, None]:
        entry = self.catalogue.resolve(request.model, kind)
        subject = subjects.infer(kind, entry.name, entry.version)
        deadline = time.time() + timeout_s
        attempt = 0
        while True:
            delivered = False
            try:
                async for chunk in self.client.stream(subject, request, deadline=deadline, extra_headers=headers):
                    if isinstance(chunk, Delta):
                        delivered = True
                    elif isinstance(chunk, Accepted):
                        log.bind(worker_id=chunk.worker_id)
                    yield chunk
                return
            except InferBusError as exc:
                if delivered or attempt >= self.retries or exc.code not in RETRY_CODES:
                    raise
                attempt += 1
                self.logger.warning("stream_retry", error=exc.code, attempt=attempt)
