# `make demo` and `make test` set everything up in .venv and run; nothing else is needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of this torch lies on the development machines; other versions download GBs.
TORCH := torch==2.13.0
# The torchao release that works with that torch (pt2e quantization tests).
TORCHAO := torchao==0.18.0
# JAX for the StableHLO frontend, and the flax its tests export models from (flax 0.12.0's nnx
# does not import with jax 0.10; 0.12.8 does).
JAX := jax==0.10.2 jaxlib==0.10.2 flax==0.12.8
JOBS ?= 2

.PHONY: all venv demo test fuzz bench bench-keras test-keras integration lint clean

all: test

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH) $(TORCHAO) $(JAX)
	$(BIN)/python -m pip install --quiet -e '.[torch,onnx,qat,jax,test]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/bnfold demo

test: venv lint
	$(BIN)/python -m pytest -q -n $(JOBS)

# 10,000 random networks folded in every form, then 10,000 damaged model files through the CLI;
# each prints its counts and fails on any wrong fold or crash.
FUZZ_EXAMPLES ?= 10000
fuzz: venv
	$(BIN)/python tests/fuzz/networks.py --examples $(FUZZ_EXAMPLES) --jobs $(JOBS)
	$(BIN)/python tests/fuzz/files.py --inputs $(FUZZ_EXAMPLES) --jobs $(JOBS)

# Fold time and memory against torch.fx / onnxscript / onnxruntime / onnxoptimizer / onnxsim,
# scaling to 10,000 blocks, and inference latency; tables on stdout, docs/benchmarks.png.
$(BIN)/.bench-installed: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e '.[torch,onnx,bench]'
	$(BIN)/python -m pip install --quiet onnxoptimizer || echo "onnxoptimizer does not install here: its rows are skipped"
	$(BIN)/python -m pip install --quiet onnxsim || echo "onnxsim does not install here: its rows are skipped"
	touch $@

bench: $(BIN)/.bench-installed
	rm -rf benchmarks/out/onnx
	$(BIN)/python -m benchmarks.fold_torch
	$(BIN)/python -m benchmarks.fold_onnx
	$(BIN)/python -m benchmarks.scaling
	$(BIN)/python -m benchmarks.latency
	$(BIN)/python -m benchmarks.compile
	$(BIN)/python -m benchmarks.stablehlo
	$(BIN)/python -m benchmarks.plot

# Keras applications converted by tf2onnx in four modes (Keras 3 / tf-keras, TensorFlow's
# optimizer on / off), then folded: TensorFlow pins its own protobuf and numpy, so the converter
# stack has a virtual environment of its own (about 1.8 GB), never the test one.
KERAS_VENV := .venv-keras
$(KERAS_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(KERAS_VENV)
	$(KERAS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(KERAS_VENV)/bin/python -m pip install --quiet "tensorflow-cpu==2.21.*" "tf2onnx==1.17.*"
	$(KERAS_VENV)/bin/python -m pip install --quiet --no-deps "tf-keras==2.21.*"
	$(KERAS_VENV)/bin/python -m pip install --quiet -e '.[onnx]'
	$(KERAS_VENV)/bin/python -m pip install --quiet pytest
	touch $@

bench-keras: $(KERAS_VENV)/.installed
	$(KERAS_VENV)/bin/python -m benchmarks.keras_onnx

# Small Keras models converted by tf2onnx inside the tests (all four modes), then folded.
test-keras: $(KERAS_VENV)/.installed
	$(KERAS_VENV)/bin/python -m pytest -q tests/keras

# End-to-end checks with real third-party packages (Keras/tf2onnx, ExecuTorch, Ultralytics, timm),
# each client in a virtual environment of its own under .integration/ (several GB, installed on
# first use); one Markdown table on stdout and in .integration/last_run.md. Never part of `test`.
# Options through INTEGRATION_ARGS, e.g. INTEGRATION_ARGS="--clients keras --quick".
integration:
	$(PYTHON) -m integration.run $(INTEGRATION_ARGS)

lint: venv
	$(BIN)/ruff check bnfold tests benchmarks integration
	$(BIN)/ruff format --check bnfold tests benchmarks integration

clean:
	rm -rf $(VENV) $(KERAS_VENV) .integration .pytest_cache .hypothesis build *.egg-info
