# Two commands on a fresh machine with only python3 >= 3.11 and make:
#   make demo   -- start a daemon, drive the phyid map and the irqchips, print what happened
#   make test   -- the whole suite (pytest + pytest-trio + hypothesis)
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench bench-quick fuzz wheel-check clean compiled test-compiled clean-compiled

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e . --group test --group lint
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lvz demo

# The sources as they are (LVZ_BUILD=pure): a compiled build, fresh or stale, is
# test-compiled's business, so editing a hot module never breaks make test.
test: $(STAMP)
	LVZ_BUILD=pure $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench

bench-quick: $(STAMP)
	$(BIN)/python -m bench --quick

fuzz: $(STAMP)
	$(BIN)/python -m bench.fuzz

# What a user installs: the wheel, in a fresh venv, used from a directory outside the tree
# (so neither the source nor this repository's pytest settings can help it).
wheel-check: $(STAMP)
	@set -e; d=$$(mktemp -d /tmp/lvz-wheel.XXXXXX); trap 'rm -rf "$$d"' EXIT; \
	$(BIN)/python -m pip wheel -q --no-deps -w "$$d" . ; \
	$(PYTHON) -m venv "$$d/venv"; \
	"$$d/venv/bin/python" -m pip install -q "$$d"/lvz-*.whl pytest; \
	cp docs/examples/test_routing.py "$$d/"; \
	cd "$$d"; \
	echo "wheel-check: $$(ls lvz-*.whl) in a fresh venv"; \
	venv/bin/lvz demo >demo.out || { cat demo.out; exit 1; }; tail -1 demo.out; \
	venv/bin/python -m pytest -q -p no:cacheprovider test_routing.py

# The compiled build (README "Performance"): mypyc over lvz.COMPILED_MODULES, in place. Rebuilt
# whenever a source of the hot path changes; lvz/_build.py is written last by the build, and
# at import lvz uses the extensions only while it matches the sources (else pure, with a warning).
HOT_SOURCES := $(wildcard lvz/*.py lvz/protocol/*.py lvz/daemon/*.py) setup.py

lvz/_build.py: $(HOT_SOURCES) | $(STAMP)
	LVZ_COMPILE=1 $(BIN)/python setup.py -q build_ext --inplace

compiled: lvz/_build.py
	@LVZ_BUILD=compiled $(BIN)/python -c "import lvz; print('lvz:', lvz.build)"

# The whole suite against the compiled build (LVZ_BUILD=compiled: refuses to run pure).
test-compiled: lvz/_build.py
	LVZ_BUILD=compiled $(BIN)/python -m pytest -q

clean-compiled:
	find lvz -name '*.so' -delete
	rm -rf build lvz/_build.py

clean: clean-compiled
	rm -rf $(VENV) .mypy_cache .ruff_cache .hypothesis *.egg-info
