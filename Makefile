# moelab: `make demo` sets everything up and runs the main job; `make test` runs the test suite.
# Both create or update .venv themselves. torch is installed first, pinned to the CPU build that
# lies on these machines, so no multi-GB CUDA build is pulled in by a dependency.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv demo test test-slow lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/moelab info configs/tiny.toml
	$(BIN)/moelab init configs/tiny.toml --out runs/tiny-init --seed 0
	$(BIN)/moelab generate runs/tiny-init --prompt "To be, or not to be" --max-new-tokens 24 --seed 0

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
