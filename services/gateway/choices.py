"""`n` > 1 on chat and text completions: each choice is a generation of its own, their streams merged into one.

A choice is dispatched as a request (ids: the request's for the first, then `<id>-1`, `<id>-2`, ...), so it runs
wherever one would (on llama.cpp beside the others, in the same batch: they share a worker by affinity), falls back
and retries like one, and is metered like one: a usage row per choice, each counting the prompt it computed. The
answer's usage is their sum, which is what the ledger holds. With a `seed`, choice i samples with seed + i: the
choices differ and a repeat gives the same ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import msgspec

from contracts.errors import InferBusError
from contracts.llm import Chunk, Delta, Final, GenerateRequest, Usage
from services.gateway.formats import ChoiceDelta, ChoiceEnd
from services.runtime.streaming import Pace

_SEEDS = 1 << 64


def choice_requests(gen: GenerateRequest, n: int) -> list[GenerateRequest]:
    """The n generations of one request's choices."""
    out = [gen]
    for i in range(1, n):
        seed = None if gen.seed is None else (gen.seed + i + _SEEDS // 2) % _SEEDS - _SEEDS // 2
        out.append(msgspec.structs.replace(gen, request_id=f"{gen.request_id}-{i}", seed=seed))
    return out


async def fanned(streams: list[AsyncGenerator[Chunk, None]], pace: Pace) -> AsyncGenerator[Any, None]:
    """The choices' streams as one: the first Accepted once every choice has a worker (so an error before that
    keeps its HTTP status), then each Delta as a ChoiceDelta as it comes, a ChoiceEnd as each choice finishes,
    and one Final with their usage summed (finish reason and version: the first choice's). One choice failing
    fails the whole; leaving early cancels every choice."""
    tasks: list[asyncio.Task[None]] = []
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator[Chunk, None]) -> None:
        try:
            async for chunk in stream:
                queue.put_nowait((index, chunk))
            queue.put_nowait((index, None))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            queue.put_nowait((index, exc))

    try:
        firsts = await asyncio.gather(*(anext(s) for s in streams), return_exceptions=True)
        for first in firsts:
            if isinstance(first, BaseException):
                raise first
        yield firsts[0]
        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        finals: dict[int, Final] = {}
        while len(finals) < len(streams):
            index, chunk = await queue.get()
            pace.more = not queue.empty()
            if isinstance(chunk, BaseException):
                raise chunk
            if isinstance(chunk, Delta):
                yield ChoiceDelta(chunk.seq, chunk.text, chunk.tokens, chunk.tool_calls, chunk.logprobs, index=index)
            elif isinstance(chunk, Final):
                finals[index] = chunk
                yield ChoiceEnd(index, chunk.finish_reason)
            elif chunk is None and index not in finals:
                raise InferBusError("stream_broken", f"choice {index}'s stream ended without a final chunk")
        pace.more = False
        first_final = finals[0]
        usage = Usage(sum(f.usage.prompt_tokens for f in finals.values()),
                      sum(f.usage.completion_tokens for f in finals.values()))
        yield Final(first_final.seq, first_final.finish_reason, usage, first_final.version)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
