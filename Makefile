# One entry point for people and CI. `make demo` and `make test` set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint docs bench wheel-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/polystore demo

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check polystore tests benchmarks migrations docs
	$(VENV)/bin/ruff format --check polystore tests benchmarks migrations docs
	$(VENV)/bin/mypy

docs: $(STAMP)
	$(VENV)/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html

bench: $(STAMP)
	$(PY) benchmarks/run.py

# polystore against np.save files, h5py, diskcache and zarr (pip install -e ".[bench]").
.PHONY: peers
peers: $(STAMP)
	$(PY) benchmarks/peers.py

# The wheel must carry the migrations: install it into a throwaway venv and
# upgrade a catalog from outside the checkout.
wheel-check: $(STAMP)
	bash .ci/wheel-check

clean:
	rm -rf $(VENV) build dist docs/_build .pytest_cache .mypy_cache .ruff_cache
