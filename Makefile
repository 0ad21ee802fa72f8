# make demo: set up .venv and run the quickstart.  make test: set up .venv and run the tests.
# make gpu-check: on a CUDA machine, set up .venv-gpu and check the GPU paths (benchmarks/gpu_check.py).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
TORCH := torch==2.13.0
# make demo and make test install the tested set of versions in constraints.txt (pyproject.toml keeps the
# ranges the library supports). CONSTRAINTS= installs the newest versions those ranges allow instead, in
# a venv of its own: make test VENV=.venv-newest CONSTRAINTS=
CONSTRAINTS ?= constraints.txt
# pip compiles each installed file to bytecode on one core (torch: 46 of its 58 s here); installing without it and
# compiling the venv afterwards on every core gives the same .pyc files sooner. Like pip, it lets a file pass that does
# not compile (torch ships tests written for newer Pythons).
PIP_INSTALL = $(BIN)/pip install --no-compile $(if $(CONSTRAINTS),--constraint $(CONSTRAINTS))
COMPILE = $(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true

.PHONY: demo test bench clean gpu-check constraints

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# the CPU build of torch first: a bare torch requirement would pull a multi-GB CUDA build
	$(BIN)/pip install --no-compile $(TORCH)

$(VENV)/.demo: $(BIN)/python pyproject.toml $(CONSTRAINTS)
	$(PIP_INSTALL) -e ".[demo]"
	$(COMPILE)
	touch $@

$(VENV)/.test: $(BIN)/python pyproject.toml $(CONSTRAINTS)
	$(PIP_INSTALL) -e ".[test,demo]"
	$(COMPILE)
	touch $@

# Updates the tested set on purpose: the newest versions pyproject.toml allows, installed in a fresh venv
# and frozen into constraints.txt (torch without its +cpu build tag). Run make test with it before committing.
NEWEST := .venv-newest
constraints:
	rm -rf $(NEWEST)
	$(MAKE) VENV=$(NEWEST) CONSTRAINTS= $(NEWEST)/.test
	{ echo "# The tested set of versions, installed by make demo and make test; rewritten by make constraints."; \
	  $(NEWEST)/bin/pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt

demo: $(VENV)/.demo
	$(BIN)/zotune train quickstart

# the lint (ruff, configured in pyproject.toml), then the unit tests on tiny models and the integration
# tests on the real Gemma 3 270M (a bare `pytest` skips those: see addopts in pyproject.toml), one worker
# per core (pytest-xdist; each worker runs torch on one thread, tests/conftest.py); an idle worker takes
# tests from the other's queue (worksteal: 10.3 min of tests here, against 13.4 with a file per worker);
# the 25 slowest are listed (the last fresh-clone run's, with its total: benchmarks/results/test_durations.txt).
test: $(VENV)/.test
	$(BIN)/ruff check .
	$(BIN)/pytest -m "integration or not integration" -n auto --dist worksteal --durations=25 $(PYTEST_ARGS)

# The GPU check has its own venv, so that the CPU one stays as it is. Its torch comes from TORCH_INDEX,
# PyPI by default, whose Linux x86-64 wheels are the CUDA builds (another CUDA: e.g.
# TORCH_INDEX=https://download.pytorch.org/whl/cu126). SYSTEM_TORCH=1 uses the CUDA torch (and triton)
# the machine's $(PYTHON) already has instead: the venv sees its site-packages, and nothing is built
# in isolation, so with PIP_NO_INDEX=1 PIP_FIND_LINKS=<wheels> it installs offline.
# ZOTUNE_GPU_CHECK_DRY=1 make gpu-check runs the same steps in the CPU venv instead, without a GPU.
GPU_VENV := .venv-gpu
TORCH_INDEX ?= https://pypi.org/simple
SYSTEM_TORCH ?=

$(GPU_VENV)/bin/python:
ifeq ($(SYSTEM_TORCH),1)
	$(PYTHON) -m venv --system-site-packages $(GPU_VENV)
else
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/pip install --upgrade pip
	$(GPU_VENV)/bin/pip install $(TORCH) --index-url $(TORCH_INDEX)
endif

$(GPU_VENV)/.gpu: $(GPU_VENV)/bin/python pyproject.toml
	$(GPU_VENV)/bin/pip install $(if $(filter 1,$(SYSTEM_TORCH)),--no-build-isolation) -e ".[gpu]"
	touch $@

ifneq ($(filter-out 0,$(ZOTUNE_GPU_CHECK_DRY)),)
gpu-check: $(VENV)/.test
	$(BIN)/python benchmarks/gpu_check.py
else
gpu-check: $(GPU_VENV)/.gpu
	$(GPU_VENV)/bin/python benchmarks/gpu_check.py
endif

clean:
	rm -rf $(VENV) $(GPU_VENV) $(NEWEST) runs build *.egg-info
