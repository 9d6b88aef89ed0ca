# Two entry points, each doing all set-up on a fresh machine:
#   make demo   the main job (synthetic imbalanced data -> ... -> metrics report)
#   make test   the test suite, without the runs marked slow
#   make test-slow  the whole-job and fault-injection runs (marked slow); CI runs both
# Both create or refresh .venv: torch==2.13.0 first (the CPU wheel here, the CUDA build on a GPU
# host), then this package. A second run only re-installs when pyproject.toml changed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_CONFIG ?= configs/demo.yaml

.PHONY: venv demo test test-slow clean
venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pogdiff demo $(DEMO_CONFIG) $(ARGS)

test: $(STAMP)
	$(BIN)/pytest -q -m "not slow" $(ARGS)

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow $(ARGS)

clean:
	rm -rf $(VENV) runs
