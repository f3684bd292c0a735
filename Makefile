# Set-up and the main jobs. `make train`, `make test` and `make bench` each build .venv first if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: setup train test bench lint clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU wheel first, so that the torch>=2.9 requirement is already met (no CUDA build)
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

train: setup
	$(BIN)/moekit train

# three workers on two cores: a third of the suite's time is tests waiting on other processes
# (Flower's 60 s heartbeat, torchrun's ranks, torch.compile's compiler); -n 0 runs in one process
test: setup
	$(BIN)/python -m pytest -n 3 --dist loadscope moekit tests

# the benchmark's peers (DeepSpeed, transformers); DS_BUILD_OPS=0: no CUDA op builds
$(BIN)/.bench: $(BIN)/.installed
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e '.[bench]'
	touch $@

bench: $(BIN)/.bench
	$(BIN)/python bench/bench_moe_layer.py

lint: setup
	$(BIN)/ruff check moekit tests bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis runs
