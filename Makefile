# The two commands a user needs: `make demo` and `make test`. Both set up .venv themselves.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Caches live in the system temp dir (shared by clones of this repo), never in $HOME.
LDM_CACHE_DIR ?= $(shell $(PYTHON) -c 'import tempfile; print(tempfile.gettempdir())')/ldm-cache
export LDM_CACHE_DIR
export PIP_CACHE_DIR := $(LDM_CACHE_DIR)/pip
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export npm_config_cache := $(LDM_CACHE_DIR)/npm
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
STAMP := $(VENV)/.installed
# img2dataset (the tests build real img2dataset output with it) gets a venv of its own: its
# pins (webdataset<0.3, pandas<3) conflict with ours. Direct dependencies pinned as resolved.
I2D_VENV := $(VENV)/img2dataset
I2D_STAMP := $(I2D_VENV)/.installed
I2D_PACKAGES := img2dataset==1.47.0 webdataset==0.2.111 pandas==2.3.3 pyarrow==26.0.1 \
	numpy==2.4.6 opencv-python-headless==4.14.0.94 albumentations==1.4.24 wandb==0.31.0 \
	fire==0.7.1 tqdm==4.70.1 exifread-nocycle==3.0.1 fsspec==2026.9.0 dataclasses==0.6

.PHONY: install demo test test-fast lint format bench bench-quality gpu-check gpu-wheels k8s clean

install: $(STAMP) $(I2D_STAMP)

# torch first and pinned (an unpinned torch pulls a multi-GB CUDA build); deepspeed
# compiles against the installed torch, so it builds without isolation.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install -q --no-build-isolation -e '.[dev]'
	touch $@

$(I2D_STAMP): Makefile
	test -x $(I2D_VENV)/bin/python || $(PYTHON) -m venv $(I2D_VENV)
	$(I2D_VENV)/bin/pip install -q $(I2D_PACKAGES)
	touch $@

demo: install
	$(BIN)/ldm demo

# The layers contract (import-linter, see pyproject.toml) first: a wrong-way import fails fast.
test: install
	$(BIN)/lint-imports
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Each benchmark prints ratios against a baseline run side by side; JSON in bench/results/.
bench: install
	$(BIN)/python -m bench.run

# Proof that training learns: the demo scored as it trains, against untrained and real-vs-real.
bench-quality: install
	$(BIN)/python -m bench.quality

# One CUDA GPU, one prepared script (refuses without a GPU): bench/results/gpu.json. On a
# machine without this checkout's .venv (a GPU box with its own torch), the system python,
# with the wheels `make gpu-wheels` built installed first.
GPU_PYTHON := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
gpu-check:
	$(GPU_PYTHON) -m bench.gpu_check

# What a GPU machine with Python 3.12, torch and transformers lacks, as wheels (<= 64 MiB).
gpu-wheels: install
	bench/gpu_wheels.sh runs/bench/gpu-wheels

# k8s/ is generated from orchestrator/k8s.py (and the demo config); regenerate after changes.
k8s: install
	$(BIN)/python -m orchestrator.k8s k8s/

clean:
	rm -rf runs .pytest_cache .ruff_cache
