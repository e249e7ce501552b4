# `make demo` and `make test` set everything up in .venv and run; nothing else is needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of this torch lies on the development machines; other versions download GBs.
TORCH := torch==2.13.0
JOBS ?= 2

.PHONY: all venv demo test lint clean

all: test

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[torch,onnx,test]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/bnfold demo

test: venv lint
	$(BIN)/python -m pytest -q -n $(JOBS)

lint: venv
	$(BIN)/ruff check bnfold tests
	$(BIN)/ruff format --check bnfold tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
