# Two commands do everything on a fresh machine: `make test` and `make demo`.
# A .venv is created if missing (with --system-site-packages, so a torch you already have, e.g. a CUDA
# build, is used as it is); the CPU build of torch 2.13.0 is installed only when no torch is importable.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0
EXTRAS ?= dev,triton,viz,data,onnx
STAMP := $(VENV)/.dynconv-installed

.PHONY: setup test lint demo bench clean

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(STAMP): $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_CPU)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(PY) -m ruff check dynconv tests
	$(PY) -m ruff format --check dynconv tests

test: lint
	$(PY) -m pytest -q
	$(PY) -m dynconv check-kernels --arch 90

demo: setup
	$(PY) -m dynconv demo --out demo_out

bench: setup
	$(PY) -m dynconv bench local_filter

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache
