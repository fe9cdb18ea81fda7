# `make demo` and `make test` set up .venv (once, or when pyproject.toml changes) and run.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
export BLENDTUNE_DATA_ROOT ?= $(abspath ../shared/data)
export WANDB_MODE ?= offline

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $@

.PHONY: demo test test-slow
demo: $(VENV)/.installed
	$(VENV)/bin/blendtune compare experiments/synthetic_imbalanced_gblend.yaml --strategies naive,gblend,ogm_ge,unimodal:clean --seeds 5

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

test-slow: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -m slow
