# Two entry points that work from a fresh clone: `make train` and `make test`.
# Both create .venv and install torch first (override with TORCH_SPEC, e.g. for a CUDA build),
# so pyproject's torch range is already met and pip never pulls a different build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: train test lint docs bench bench-gpu clean

$(BIN)/leantrain: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

train: $(BIN)/leantrain
	$(BIN)/leantrain train

lint: $(BIN)/leantrain
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/lint-imports

# the documentation site from docs/ into site/; strict: a broken link, page or anchor fails
docs: $(BIN)/leantrain
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet -d site

# the whole suite, slow tests included (plain `pytest` skips those); exit 5 = no tests collected
test: lint docs
	$(BIN)/python -m pytest -m "" -q; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

bench: $(BIN)/leantrain
	$(BIN)/python benchmarks/train_vs_plain.py
	$(BIN)/python benchmarks/bench_digits.py
	$(BIN)/python benchmarks/data_loading.py --epochs 80 --repeats 2
	$(BIN)/python benchmarks/distributed.py
	$(BIN)/python benchmarks/compress_digits.py
	$(BIN)/python benchmarks/quantize_mlp.py
	$(BIN)/python benchmarks/gpt_cpu.py
	$(BIN)/python benchmarks/schedules.py

bench-gpu: $(BIN)/leantrain  # on a CUDA machine: text-gpt 102 M per technique stack, ~380 M (fp8, states, estimate), OOM recovery, GPU checks
	$(BIN)/python benchmarks/gpt_gpu.py
	$(BIN)/python benchmarks/gpu_scale.py --only large states estimate
	$(BIN)/python benchmarks/oom_recovery.py
	PYTHON=$(BIN)/python bash benchmarks/gpu_checks.sh runs/gpu_checks

clean:
	rm -rf $(VENV) runs site .pytest_cache .ruff_cache
