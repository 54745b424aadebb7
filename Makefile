# The two commands of the README:
#   make demo   trains unsupervised and PU diffusion models on the built-in digits data and prints their scores
#   make test   runs the test suite
PYTHON ?= python3
DEMO_DIR ?= outputs/digits-benchmark
export HF_HUB_OFFLINE ?= 1

.PHONY: install install-dev demo test lint

install:
	PYTHON=$(PYTHON) bash scripts/install.sh requirements.txt

install-dev:
	PYTHON=$(PYTHON) bash scripts/install.sh requirements-dev.txt

demo: install
	PYTHON=$(PYTHON) bash scripts/demo.sh $(DEMO_DIR)

test: install-dev
	$(PYTHON) -m pytest tests

lint: install-dev
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .
