# Two commands on a fresh machine with only python3 >= 3.11 and make:
#   make demo   -- start a daemon, drive the phyid map and the irqchips, print what happened
#   make test   -- the whole suite (pytest + pytest-trio + hypothesis)
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench bench-quick fuzz clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e . --group test --group lint
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lvz demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench

bench-quick: $(STAMP)
	$(BIN)/python -m bench --quick

fuzz: $(STAMP)
	$(BIN)/python -m bench.fuzz

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .hypothesis *.egg-info
