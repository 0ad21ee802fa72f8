# make demo: set up .venv and run the quickstart.  make test: set up .venv and run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# the CPU build of torch first: a bare torch requirement would pull a multi-GB CUDA build
	$(BIN)/pip install torch==2.13.0

$(VENV)/.demo: $(BIN)/python pyproject.toml
	$(BIN)/pip install -e ".[demo]"
	touch $@

$(VENV)/.test: $(BIN)/python pyproject.toml
	$(BIN)/pip install -e ".[test,demo]"
	touch $@

demo: $(VENV)/.demo
	$(BIN)/zotune train quickstart

# the lint (ruff, configured in pyproject.toml), then the unit tests on tiny models, then the
# integration tests on the real Gemma 3 270M (a bare `pytest` skips those: see addopts in pyproject.toml)
test: $(VENV)/.test
	$(BIN)/ruff check .
	$(BIN)/pytest -m "integration or not integration" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info
