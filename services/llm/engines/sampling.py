"""A llama.cpp sampler for constrained requests: sample first, let the grammar check only the chosen token.

A grammar sampler in a llama.cpp chain checks every token of the vocabulary at every step (~8 ms a token for
SmolLM2's 49k here). Most steps the token the model picks is one the grammar allows anyway, so we sample
without the grammar, ask it about that one token, and only when it refuses do we apply it to the whole
vocabulary and sample again (llama.cpp's own common sampler does the same). Same tokens, a fraction of the cost.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

import numpy as np

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class VerifyingSampler:
    """Llama.generate's sampler interface (`sample(ctx, idx)`): `chain` picks, `grammar` (a llama_sampler) checks."""

    def __init__(self, chain: Any, grammar: Any, n_vocab: int) -> None:
        import llama_cpp

        self._cpp = llama_cpp
        self.chain = chain  # LlamaSampler (keeps its C chain alive)
        self.grammar = grammar
        self.n_vocab = n_vocab
        self._data = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._array = llama_cpp.llama_token_data_array(
            data=self._data.ctypes.data_as(llama_cpp.llama_token_data_p), size=n_vocab, selected=-1, sorted=False)
        self._one = (llama_cpp.llama_token_data * 1)()
        self._one_array = llama_cpp.llama_token_data_array(
            data=ctypes.cast(self._one, llama_cpp.llama_token_data_p), size=1, selected=-1, sorted=False)
        self.full_checks = 0  # steps where the grammar refused the first pick (stats, tests)

    def _candidates(self, logits: Any) -> Any:
        data = self._data
        data["id"] = self._ids
        data["logit"] = np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
        data["p"] = 0.0
        array: Any = self._array
        array.data = data.ctypes.data_as(self._cpp.llama_token_data_p)
        array.size, array.selected, array.sorted = self.n_vocab, -1, False
        return array

    def _pick(self, array: Any) -> int:
        selected = array.selected
        return int(array.data[selected].id)

    def _allowed(self, token: int) -> bool:
        one: Any = self._one[0]
        one.id, one.logit, one.p = token, 0.0, 0.0
        arr: Any = self._one_array
        arr.size, arr.selected, arr.sorted = 1, -1, False
        self._cpp.llama_sampler_apply(self.grammar, ctypes.byref(arr))
        return not math.isinf(self._one[0].logit)

    def sample(self, ctx: Any, idx: int = -1) -> int:
        cpp = self._cpp
        logits = cpp.llama_get_logits_ith(ctx.ctx, idx)
        chain = self.chain.sampler
        array = self._candidates(logits)
        cpp.llama_sampler_apply(chain, ctypes.byref(array))
        token = self._pick(array)
        if not self._allowed(token):
            self.full_checks += 1
            array = self._candidates(logits)
            cpp.llama_sampler_apply(self.grammar, ctypes.byref(array))
            cpp.llama_sampler_apply(chain, ctypes.byref(array))
            token = self._pick(array)
        cpp.llama_sampler_accept(self.grammar, token)
        cpp.llama_sampler_accept(chain, token)
        return token

    def close(self) -> None:
        if self.grammar is not None:
            self._cpp.llama_sampler_free(self.grammar)
            self.grammar = None
        self.chain.close()

    def __del__(self) -> None:
        self.close()
