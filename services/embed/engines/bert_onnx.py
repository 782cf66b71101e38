"""A BERT sentence encoder (Transformer, mean Pooling, Normalize) exported to ONNX and run on onnxruntime.

The graph is written here, from the model folder's safetensors weights and config, as plain tensor
operations: embeddings, `layers` encoder blocks (self-attention with the padding mask, GELU feed-forward,
post-LayerNorm), mean pooling over the real tokens and L2 normalisation. It is exported once per load, in
memory (torch is needed to export, not to run). onnxruntime runs a one-sentence pass about 3x faster than
transformers on torch on our CPUs; the vectors agree with sentence-transformers' `encode` within 1e-6
(tests/test_embeddings.py asserts 1e-5).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from services.embed.engines.base import Matrix

SUPPORTED = {"model_type": "bert", "hidden_act": "gelu", "position_embedding_type": "absolute"}


def check_config(config: dict[str, Any], folder: Path) -> None:
    """Refuse a config the written graph would compute differently."""
    for field, value in SUPPORTED.items():
        if config.get(field, value) != value:
            raise ValueError(f"{folder}: {field}={config.get(field)!r}, the onnxruntime runtime computes {field}="
                             f"{value!r} only (use engine_options runtime='torch')")


def export(folder: Path) -> bytes:
    """The model's ONNX graph: inputs input_ids, attention_mask (int64, batch x tokens); output vectors."""
    import torch
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    check_config(config, folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights = {k.removeprefix("bert."): v for k, v in weights.items()}
    encoder = _encoder(torch, weights, int(config["num_attention_heads"]), int(config["num_hidden_layers"]),
                       float(config.get("layer_norm_eps", 1e-12)))
    ids = torch.ones((1, 8), dtype=torch.int64)
    out: Any = io.BytesIO()  # a file object is fine (torch.onnx's docs), its stubs say a path
    with torch.no_grad():
        torch.onnx.export(
            encoder, (ids, ids), out, input_names=["input_ids", "attention_mask"], output_names=["vectors"],
            dynamic_axes={"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
                          "vectors": {0: "batch"}},
            opset_version=17, dynamo=False,
        )
    graph: bytes = out.getvalue()
    return graph


def int8(graph: bytes) -> bytes:
    """`graph` with onnxruntime's dynamic quantization: the weight matrices int8 per output channel, each
    pass's activations quantized to uint8 as they come (VNNI integer products). Measured on an AMD EPYC (Zen
    4), 2 threads, ~18-token sentences: ~2x embeddings/s at batch 32 and ~1.8x at batch 1, vectors at cosine
    0.993 (mean; 0.988 min) to the fp32 graph's. Per-tensor weights (0.964) and uint8 weights (0.984) lost more."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()  # quantize_dynamic logs a pre-processing hint on the root logger: not ours
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="inferbus-int8-") as folder:
            source, target = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
            source.write_bytes(graph)
            quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True)
            return target.read_bytes()
    finally:
        root.setLevel(level)


Weights = dict[str, Any]  # initializer name -> onnxruntime.OrtValue


def shared_weights(graph: bytes) -> Weights:
    """The graph's initializers as onnxruntime values that several sessions can use in place (no copy each):
    keep the dict alive as long as they run. Measured for MiniLM fp32, a two-thread session and two one-thread
    lane sessions: 222 MiB RSS with shared weights against 310 MiB with a copy each (one session alone: 115 MiB),
    the same vectors (max difference 0.0) and the same pass time."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load_from_string(graph)
    return {init.name: ort.OrtValue.ortvalue_from_numpy(numpy_helper.to_array(init))
            for init in model.graph.initializer}


class Session:
    """An onnxruntime session of the exported graph on `threads` intra-op threads. `spin`: between the operators
    of a pass the helper threads spin instead of sleeping, which saves a futex wake-up per operator (~100 a pass).
    Measured on 2 cores: one sentence in-process 4.4 -> 3.6 ms; through the gateway 7.9 -> 6.2 ms p50 in one
    probe, but bench embed's side-by-side runs saw no steady gain (one client 130 -> 129 and 126 -> 135
    embeddings/s), with the worker 0.2 cores busier under load: the spinning competes with the event loop.
    Off by default."""

    def __init__(self, graph: bytes, threads: int | None, spin: bool = False, weights: Weights | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        for name, value in (weights or {}).items():
            options.add_initializer(name, value)
        self._session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def run(self, ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64]) -> Matrix:
        vectors = self._session.run(["vectors"], {"input_ids": ids, "attention_mask": mask})[0]
        out: Matrix = np.ascontiguousarray(vectors, dtype=np.float32)
        return out


def _encoder(torch: Any, weights: dict[str, Any], heads: int, layers: int, eps: float) -> Any:
    """The torch module that is exported: BERT's forward pass in tensor operations, then pooling."""
    functional = torch.nn.functional

    class Encoder(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.w = {name: torch.nn.Parameter(value.float(), requires_grad=False)
                      for name, value in weights.items() if name.startswith(("embeddings.", "encoder."))
                      and not name.endswith("position_ids")}
            for i, value in enumerate(self.w.values()):
                self.register_parameter(f"p{i}", value)  # named parameters become the graph's initializers
            self.dim = int(self.w["embeddings.LayerNorm.weight"].shape[0])

        def norm(self, x: Any, name: str) -> Any:
            return functional.layer_norm(x, (self.dim,), self.w[name + ".weight"], self.w[name + ".bias"], eps)

        def dense(self, x: Any, name: str) -> Any:
            return functional.linear(x, self.w[name + ".weight"], self.w[name + ".bias"])

        def forward(self, ids: Any, mask: Any) -> Any:
            w, dim = self.w, self.dim
            batch, tokens = ids.shape
            x = (w["embeddings.word_embeddings.weight"][ids]
                 + w["embeddings.position_embeddings.weight"][:tokens].unsqueeze(0)
                 + w["embeddings.token_type_embeddings.weight"][0])
            x = self.norm(x, "embeddings.LayerNorm")
            size = dim // heads
            keep = mask.to(x.dtype)
            bias = (1.0 - keep)[:, None, None, :] * torch.finfo(x.dtype).min  # padding gets no attention
            for i in range(layers):
                at = f"encoder.layer.{i}."
                q, k, v = (self.dense(x, at + "attention.self." + part).view(batch, tokens, heads, size)
                           .transpose(1, 2) for part in ("query", "key", "value"))
                scores = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(size) + bias, dim=-1)
                context = (scores @ v).transpose(1, 2).reshape(batch, tokens, dim)
                x = self.norm(self.dense(context, at + "attention.output.dense") + x, at + "attention.output.LayerNorm")
                hidden = functional.gelu(self.dense(x, at + "intermediate.dense"))
                x = self.norm(self.dense(hidden, at + "output.dense") + x, at + "output.LayerNorm")
            weights_ = keep.unsqueeze(-1)
            pooled = (x * weights_).sum(1) / weights_.sum(1).clamp(min=1e-9)
            return functional.normalize(pooled, p=2.0, dim=1)

    return Encoder().eval()
