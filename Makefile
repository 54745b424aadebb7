# The two commands of the README:
#   make demo   trains unsupervised and PU diffusion models on the built-in digits data and prints their scores
#   make test   runs the test suite
# Inside an active virtual or conda environment they install into it and run from it. Outside one they
# create .venv in the clone with $(PYTHON) -m venv (once; later calls reuse it) and use that, since most
# system Pythons refuse `pip install` outside a virtual environment (PEP 668). `make clean` removes .venv.
PYTHON ?= python3
VENV ?= .venv
DEMO_DIR ?= outputs/digits-benchmark
# pytest-xdist workers for make test; --dist loadfile keeps a file's tests, and its shared runs, on one worker;
# --no-loadscope-reorder keeps the order of tests/conftest.py (longest files first), not xdist's (most tests first).
TEST_WORKERS ?= 2
export HF_HUB_OFFLINE ?= 1

ifeq ($(strip $(VIRTUAL_ENV)$(CONDA_PREFIX)),)
RUN_PYTHON := $(VENV)/bin/python
ENVIRONMENT := $(RUN_PYTHON)
else
RUN_PYTHON := $(PYTHON)
ENVIRONMENT :=
endif

.PHONY: install install-dev demo test lint clean

$(VENV)/bin/python:
	bash scripts/make_venv.sh "$(PYTHON)" "$(VENV)"

install: $(ENVIRONMENT)
	PYTHON=$(RUN_PYTHON) bash scripts/install.sh requirements.txt

install-dev: $(ENVIRONMENT)
	PYTHON=$(RUN_PYTHON) bash scripts/install.sh requirements-dev.txt

demo: install
	PYTHON=$(RUN_PYTHON) bash scripts/demo.sh $(DEMO_DIR)

test: install-dev
	$(RUN_PYTHON) -m pytest tests -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: install-dev
	$(RUN_PYTHON) -m ruff check . && $(RUN_PYTHON) -m ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
