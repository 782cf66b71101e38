"""Continuous batching on one llama.cpp context: every running sequence advances in one `llama_decode` a step.

Batch lines (the worker's `batch_line()`) run below interactive requests: see `BatchDecoder._step`. They may hold
every slot: an interactive request that finds none free takes the slot of the batch sequence that joined last
(`_preempt`), which waits and later feeds again what it had fed, so the worker keeps no slots in reserve.

One thread (the engine's executor) owns the context. Each step puts one token per running sequence and a
chunk of the prompts of sequences that joined into one batch, decodes it once, then lets each sequence sample
its own next token. Sequences join and leave between steps. The KV cache is split per sequence
(`kv_unified` off): `n_seq` streams of `n_ctx` cells each, so a sequence can never crowd out another. A slot
keeps its cells after its sequence leaves, and a later sequence whose prompt begins with most of them reuses them
(an agent's loop resends the same system prompt and tools every turn); any other takes an empty slot or the one
used least recently (`_admit`), so a short chat does not evict an agent's 2,000 tokens of tools for the dozen it
shares with them.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from contracts.errors import InferBusError
from services.llm.engines.base import Piece


class Decoding(Protocol):
    """What one request does with its logits: sample, and turn the token into a Piece (engine thread only)."""

    def start(self) -> None:
        """Build the sampler; raise to refuse the request."""

    def step(self, ctx: Any, index: int) -> tuple[int, Piece]:
        """Sample the token at batch `index` of `ctx`; a Piece with a finish_reason ends the sequence."""

    def close(self) -> None: ...


@dataclass(eq=False)
class Sequence:
    """One request in the batch: the tokens it still has to feed, and the event loop its pieces go to."""

    decoding: Decoding
    prompt: list[int]
    loop: asyncio.AbstractEventLoop
    inbox: asyncio.Queue[Piece | BaseException] = field(default_factory=asyncio.Queue)
    released: asyncio.Future[None] | None = None
    cancelled: bool = False  # the caller left: set from the event loop, read by the engine thread
    slot: Slot | None = None
    feed: list[int] = field(default_factory=list)  # tokens to decode next (prompt left, or the last sample)
    started: bool = False  # its decoding has a sampler to close
    generating: bool = False  # past its prompt: one token a step
    low: bool = False  # batch work: it waits while an interactive prompt is prefilled


@dataclass(eq=False)
class Slot:
    """One llama.cpp sequence id and the tokens whose KV cells it holds."""

    seq_id: int
    cached: list[int] = field(default_factory=list)
    used: int = 0  # when a sequence last took it (BatchDecoder's admission count): least recently used goes first


# A prompt that shares this many tokens or more with a free slot it does not take gets that slot's cells copied
# (the whole KV stream, ~50 MB for SmolLM2 at n_ctx 2048: a few ms, where 32 tokens of prefill take 50-200 ms).
COPY_FROM = 32


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


GGML_F16, GGML_BF16 = 1, 30  # ggml_type values (ggml.h)


class BatchDecoder:
    """Runs the decode loop for up to `n_seq` sequences on one context (created by `open`, in the executor)."""

    def __init__(self, executor: ThreadPoolExecutor, *, n_ctx: int, n_seq: int, n_threads: int,
                 n_threads_batch: int, prefill_chunk: int, flash_attn: bool = False,
                 batch_step_tokens: int = 2, n_threads_wide: int = 0, wide_from: int = 4,
                 kv_type: int = GGML_F16) -> None:
        self.executor = executor
        self.kv_type = kv_type  # the K and V cells' ggml type (see LlamaCppEngine's kv_cache)
        self.batch_step_tokens = batch_step_tokens  # batch lines' tokens per step, at most (see `_step`)
        self._next_low = 0  # where the next step's batch tokens start (round robin)
        # Set when an interactive request arrives: a batch-only llama_decode in flight stops at its next graph
        # node. llama.cpp asks `bool abort(void *data)` after each node; libc's strlen over this two-byte buffer
        # answers it without the GIL or a Python call (0 or 1 in the return register's low byte).
        self._urgent_flag = ctypes.create_string_buffer(2)
        self._urgent = ctypes.cast(self._urgent_flag, ctypes.c_void_p)
        self._abort_check: Any = None
        self._no_abort: Any = None
        self.aborted = 0  # batch steps stopped for an interactive request (stats, tests)
        self.n_ctx = n_ctx
        self.n_seq = n_seq
        self.n_threads = n_threads
        self.n_threads_batch = n_threads_batch
        # A step that advances `wide_from` sequences or more runs on `n_threads_wide` threads (0: n_threads): one
        # token a step is too short a job to split, eight are not (see LlamaCppEngine).
        self.n_threads_wide = n_threads_wide or n_threads
        self.wide_from = wide_from
        self.prefill_chunk = prefill_chunk
        self.flash_attn = flash_attn
        self.n_batch = max(512, n_seq)
        self.ctx: Any = None
        self._memory: Any = None
        self._threads = 0
        self._batch: Any = None
        self._lock = threading.Lock()
        self._incoming: deque[Sequence] = deque()
        self._running = False
        self._closed = False
        self._free: list[Slot] = [Slot(i) for i in range(n_seq)]
        self._waiting: deque[Sequence] = deque()  # joined, no slot yet
        self._active: list[Sequence] = []
        self.steps = 0  # decode calls (stats, tests)
        self.peak = 0  # the most sequences one step decoded
        self.wide_steps = 0  # steps decoded on n_threads_wide (stats, tests)
        self.preempted = 0  # batch sequences that gave their slot to an interactive request (stats, tests)
        self.admitted = 0  # sequences given a slot (and the slots' clock for least recently used)
        self.queried = 0  # prompt tokens of every admission: the prefix cache's lookups (metrics)
        self.reused = 0  # prompt tokens whose cells a slot already held (metrics, tests)
        self.copies = 0  # slots that took another's cells for a prefix they share (stats, tests)

    # ---- set-up (executor thread) -------------------------------------------------------------

    def open(self, model: Any) -> None:
        """Create the context: `n_seq` KV streams of `n_ctx` cells each."""
        import llama_cpp
        from llama_cpp._internals import LlamaBatch, LlamaContext

        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_ctx * self.n_seq
        params.n_batch = self.n_batch
        params.n_ubatch = 512
        params.n_seq_max = self.n_seq
        params.n_threads = self.n_threads
        params.n_threads_batch = self.n_threads_batch
        params.kv_unified = False
        params.type_k = params.type_v = self.kv_type
        # Off, as llama-cpp-python's Llama has it: the same numbers as the engine gave before batching.
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        params.no_perf = True
        self.ctx = LlamaContext(model=model, params=params, verbose=False)
        per_sequence = llama_cpp.llama_n_ctx_seq(self.ctx.ctx)
        if per_sequence < self.n_ctx:
            raise RuntimeError(f"llama.cpp gave {per_sequence} cells per sequence, not {self.n_ctx}")
        self._memory = llama_cpp.llama_get_memory(self.ctx.ctx)
        _quiet_aborts()
        self._abort_check = ctypes.cast(ctypes.CDLL(None).strlen, llama_cpp.ggml_abort_callback)
        self._no_abort = llama_cpp.ggml_abort_callback()  # NULL
        self._threads = self.n_threads_batch
        self._batch = LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1, verbose=False)

    # ---- the event loop's side ----------------------------------------------------------------

    async def stream(self, decoding: Decoding, prompt: list[int], *, low: bool = False) -> AsyncIterator[Piece]:
        """Decode `prompt` in the batch; leaving early frees the slot before this returns. `low`: batch work,
        which gives way to interactive requests (see `_step`)."""
        loop = asyncio.get_running_loop()
        seq = Sequence(decoding, prompt, loop, released=loop.create_future(), low=low)
        self._submit(seq)
        try:
            while True:
                item = await seq.inbox.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            seq.cancelled = True
            assert seq.released is not None
            # A slot is free only once the engine thread has let go of it.
            await asyncio.shield(seq.released)

    def _submit(self, seq: Sequence) -> None:
        with self._lock:
            if self._closed:
                raise InferBusError("engine_error", "the llama.cpp engine is closed")
            self._incoming.append(seq)
            if not seq.low:
                self._urgent_flag[0] = b"\x01"
            if not self._running:
                self._running = True
                self.executor.submit(self._run)

    def close(self) -> None:
        with self._lock:
            self._closed = True

    # ---- the engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                self._waiting.extend(self._incoming)
                self._incoming.clear()
                self._urgent_flag[0] = b"\x00"  # whoever set it is waiting now: `_step` sees it first
                if not (self._waiting or self._active):
                    self._running = False
                    return
                closed = self._closed
            out: list[tuple[Sequence, Piece | BaseException | None]] = []
            try:
                if closed:
                    error = InferBusError("engine_error", "the llama.cpp engine is closing")
                    for seq in [*self._waiting, *self._active]:
                        self._retire(seq, out, error)
                else:
                    self._step(out)
            except BaseException as exc:  # a failed decode fails every sequence it held, not the thread
                for seq in [*self._waiting, *self._active]:
                    self._retire(seq, out, exc)
            self._deliver(out)

    def _step(self, out: list[tuple[Sequence, Piece | BaseException | None]]) -> None:
        for seq in [*self._waiting, *self._active]:
            if seq.cancelled:
                self._retire(seq, out, None)
        if self._waiting and any(not s.low for s in self._waiting):  # interactive ones first
            self._waiting = deque(sorted(self._waiting, key=lambda s: s.low))
        deferred: list[Sequence] = []
        while self._waiting:
            head = self._waiting[0]
            if not self._free and (head.low or not any(s.low for s in self._active)):
                break  # no slot, and none a batch sequence could give up (see _preempt)
            if self._prefix_coming(head):  # it waits for a running prompt's cells, then copies them
                deferred.append(self._waiting.popleft())
                continue
            if not self._free and not self._preempt():
                break
            seq = self._waiting.popleft()
            try:
                self._admit(seq)
            except BaseException as exc:
                self._retire(seq, out, exc)
        self._waiting.extendleft(reversed(deferred))
        # Running streams' next tokens and prompt chunks go to llama.cpp in separate calls: in one mixed batch
        # llama.cpp computes a one-token sequence differently, and a stream's text would depend on who joined.
        # Batch work (`low`) runs below interactive requests; a sequence's tokens do not depend on which steps
        # it joins, so it can sit out:
        # - while an interactive prompt is prefilled, batch sequences wait;
        # - with nothing interactive running, batch work runs in full steps that an arriving interactive request
        #   aborts (`_urgent`; the step's tokens are fed again later), so its first token does not wait for them;
        # - beside interactive streams, at most `batch_step_tokens` batch tokens join each step (a step with
        #   interactive tokens in it is never aborted), and batch prompts wait (fed in small pieces, a prompt
        #   could be computed differently than when fed whole: its answer would depend on the traffic).
        generating = [s for s in self._active if s.generating and not s.low]
        prefilling = [s for s in self._active if not (s.generating or s.low)]
        if prefilling:
            self._decode(generating, out, self._generation_threads(generating))
            self._decode(prefilling, out, self.n_threads_batch, self.prefill_chunk if generating else self.n_batch)
            return
        low_generating = [s for s in self._active if s.generating and s.low]
        low_prefilling = [s for s in self._active if not s.generating and s.low]
        if not generating:  # batch work alone: whole steps, aborted for an interactive request
            if self._decode(low_generating, out, self._generation_threads(low_generating), abortable=True):
                self._decode(low_prefilling, out, self.n_threads_batch,
                             self.prefill_chunk if low_generating else self.n_batch, abortable=True)
            return
        if low_generating:
            start = self._next_low % len(low_generating)
            taken = (low_generating[start:] + low_generating[:start])[:self.batch_step_tokens]
            self._next_low = start + len(taken)
            generating += taken
        self._decode(generating, out, self._generation_threads(generating))

    def _generation_threads(self, sequences: list[Sequence]) -> int:
        if len(sequences) >= self.wide_from and self.n_threads_wide != self.n_threads:
            self.wide_steps += 1
            return self.n_threads_wide
        return self.n_threads

    def _decode(self, sequences: list[Sequence], out: list[tuple[Sequence, Piece | BaseException | None]],
                threads: int, budget: int | None = None, *, abortable: bool = False) -> bool:
        """One llama_decode of what `sequences` have to feed (prompts: `budget` tokens at most), then samples.
        `abortable`: an interactive request arriving meanwhile stops it, and what it fed is fed again later
        (False then: the caller's step ends at once)."""
        import llama_cpp

        outputs, fed = self._fill(sequences, budget)
        if not self._batch.batch.n_tokens:
            return True
        if threads != self._threads:
            llama_cpp.llama_set_n_threads(self.ctx.ctx, threads, threads)
            self._threads = threads
        if abortable:
            llama_cpp.llama_set_abort_callback(self.ctx.ctx, self._abort_check, self._urgent)
        try:
            status = llama_cpp.llama_decode(self.ctx.ctx, self._batch.batch)
        finally:
            if abortable:
                llama_cpp.llama_set_abort_callback(self.ctx.ctx, self._no_abort, None)
        if status == 2 and abortable:  # aborted: the KV cells of this step go, its tokens wait in `feed` again
            self.aborted += 1
            for seq, count in fed:
                assert seq.slot is not None
                seq.feed[:0] = seq.slot.cached[len(seq.slot.cached) - count:]
                del seq.slot.cached[len(seq.slot.cached) - count:]
                llama_cpp.llama_memory_seq_rm(self._memory, seq.slot.seq_id, len(seq.slot.cached), -1)
            return False
        if status != 0:
            raise InferBusError("engine_error", f"llama_decode failed ({status})")
        self.steps += 1
        self.peak = max(self.peak, len(outputs))
        for seq, index in outputs:
            try:
                token, piece = seq.decoding.step(self.ctx, index)
            except Exception as exc:  # this request's sampler or parser failed: only it ends
                self._retire(seq, out, exc)
                continue
            if piece.finish_reason is not None:
                self._retire(seq, out, piece)
            else:
                seq.feed = [token]
                seq.generating = True
                out.append((seq, piece))
        return True

    def _preempt(self) -> bool:
        """No slot is free and an interactive request waits: the batch sequence that joined last gives its slot up
        (True), or there is none to give (False). It waits again with everything it has fed as its prompt, and
        carries on from there once a slot is free (its cells stay in the slot for a prefix match)."""
        if not self._waiting or self._waiting[0].low:
            return False
        victims = [s for s in self._active if s.low]
        if not victims:
            return False
        seq = victims[-1]
        slot = seq.slot
        assert slot is not None
        seq.prompt = slot.cached + seq.feed
        seq.feed = []
        seq.generating = False
        seq.slot = None
        self._active.remove(seq)
        self._free.append(slot)
        self._waiting.append(seq)  # behind the interactive ones (the queue is sorted interactive first)
        self.preempted += 1
        return True

    def _prefix_coming(self, seq: Sequence) -> bool:
        """A running sequence is still feeding a prompt that begins with COPY_FROM or more of `seq`'s tokens not yet
        in any slot (n choices of one request, a burst of calls with the same tools): `seq` waits until those cells
        are computed, then copies them (`_admit`) instead of computing them a second time."""
        for other in self._active:
            if other.generating or other.slot is None or (other.low and not seq.low):  # (batch prompts can wait)
                continue
            shared = common_prefix(other.prompt, seq.prompt)
            if shared < COPY_FROM or len(other.slot.cached) >= min(shared, len(seq.prompt) - 2):
                continue
            if all(common_prefix(free.cached, seq.prompt) + COPY_FROM <= shared for free in self._free):
                return True
        return False

    def _admit(self, seq: Sequence) -> None:
        """Give `seq` a free slot: one whose cells are mostly (more than half) a prefix of its prompt, or that would
        drop fewer than COPY_FROM cells, the longest such prefix (the same tools, the conversation so far: not
        computed again); else an empty one, else the one used least recently. A slot's cells are never dropped for
        a few shared tokens. When another free slot holds a prefix of COPY_FROM tokens or more beyond the taken
        one's (a long system prompt every chat shares), its cells are copied into the taken one (a memory copy,
        where computing them again takes a forward pass)."""
        import llama_cpp

        if not seq.prompt:
            raise InferBusError("invalid_request", "the prompt is empty")
        slot, best = None, 0
        donor, lent = None, 0
        for free in self._free:
            shared = common_prefix(free.cached, seq.prompt)
            if shared > best and (2 * shared > len(free.cached) or len(free.cached) - shared < COPY_FROM):
                slot, best = free, shared
            if shared > lent:
                donor, lent = free, shared
        for running in self._active:  # a running sequence's cells too (its stream is copied before it goes on)
            assert running.slot is not None
            shared = common_prefix(running.slot.cached, seq.prompt)
            if shared > lent:
                donor, lent = running.slot, shared
        if slot is None:
            slot = min(self._free, key=lambda s: (bool(s.cached), s.used))
            best = common_prefix(slot.cached, seq.prompt)
        if donor is not None and donor is not slot and lent >= best + COPY_FROM:
            # A copy between KV streams is the whole stream, done by the next llama_decode before it computes.
            llama_cpp.llama_memory_seq_cp(self._memory, donor.seq_id, slot.seq_id, -1, -1)
            slot.cached = list(donor.cached)
            self.copies += 1
        self._free.remove(slot)
        self.admitted += 1
        slot.used = self.admitted
        seq.slot = slot
        self._active.append(seq)
        # The prompt's last token is decoded again (its logits give the first sample), and never alone: llama.cpp
        # computes a one-token batch with other kernels than a longer one, and the first sample would then
        # depend on what the slot happened to hold.
        reuse = max(0, min(common_prefix(slot.cached, seq.prompt), len(seq.prompt) - 2))
        if not llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, reuse, -1):
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
            reuse = 0
        slot.cached = seq.prompt[:reuse]
        seq.feed = seq.prompt[reuse:]
        self.queried += len(seq.prompt)
        self.reused += reuse
        if not seq.started:  # a preempted sequence keeps its sampler and what it has written
            seq.decoding.start()
            seq.started = True

    def _fill(
        self, sequences: list[Sequence], budget: int | None
    ) -> tuple[list[tuple[Sequence, int]], list[tuple[Sequence, int]]]:
        """The batch of what `sequences` feed (prompt tokens: `budget` at most): who samples at which index, and
        how many tokens each fed."""
        batch = self._batch.batch
        n = 0
        outputs: list[tuple[Sequence, int]] = []
        fed: list[tuple[Sequence, int]] = []
        for seq in sequences:
            take = len(seq.feed) if budget is None else min(budget, len(seq.feed))
            take = min(take, self.n_batch - n)
            if len(seq.feed) - take == 1:  # a prompt's last token is never decoded alone (see _admit)
                take -= 1
            if take <= 0 or (take == 1 and not seq.generating and len(seq.prompt) > 1):
                continue
            assert seq.slot is not None
            pos = len(seq.slot.cached)
            for i, token in enumerate(seq.feed[:take]):
                batch.token[n] = token
                batch.pos[n] = pos + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq.slot.seq_id
                batch.logits[n] = 0
                n += 1
            seq.slot.cached.extend(seq.feed[:take])
            del seq.feed[:take]
            fed.append((seq, take))
            if budget is not None:
                budget -= take
            if not seq.feed:  # its last fed token gives the next sample
                batch.logits[n - 1] = 1
                outputs.append((seq, n - 1))
        batch.n_tokens = n
        return outputs, fed

    def _retire(self, seq: Sequence, out: list[tuple[Sequence, Piece | BaseException | None]],
                last: Piece | BaseException | None) -> None:
        """`seq` leaves: its slot (and the KV cells, kept for a later prefix match) goes back to the free list."""
        if seq in self._waiting:
            self._waiting.remove(seq)
        if seq in self._active:
            self._active.remove(seq)
        if seq.slot is not None:
            slot, seq.slot = seq.slot, None
            if isinstance(last, BaseException):  # the cells may not match `cached` after a failed decode
                import llama_cpp

                llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
                slot.cached = []
            self._free.append(slot)
        if seq.started:
            seq.started = False
            seq.decoding.close()
        if last is not None:
            out.append((seq, last))
        out.append((seq, None))  # None: released

    def _deliver(self, out: list[tuple[Sequence, Piece | BaseException | None]]) -> None:
        """Hand a step's pieces to their event loops: one callback per loop, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Sequence, Piece | BaseException | None]]] = {}
        for seq, item in out:
            by_loop.setdefault(seq.loop, []).append((seq, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_hand_over, items)
            except RuntimeError:  # the loop closed: nobody is reading
                pass


_log_callback: Any = None


def _quiet_aborts() -> None:
    """llama.cpp reports each aborted decode ("removing memory module entries ...") on stderr: an aborted
    batch step is routine here (see `_step`), so that line is dropped; every other goes on as before."""
    global _log_callback
    if _log_callback is not None:
        return
    import llama_cpp
    from llama_cpp import _logger

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if b"removing memory module entries" not in text:
            _logger.llama_log_callback(level, text, user_data)

    _log_callback = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def _hand_over(items: list[tuple[Sequence, Piece | BaseException | None]]) -> None:
    for seq, item in items:
        if item is None:
            if seq.released is not None and not seq.released.done():
                seq.released.set_result(None)
        else:
            seq.inbox.put_nowait(item)
