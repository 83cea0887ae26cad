# One entry point for people and CI. `make demo` and `make test` set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The venv's own pip once it has one; before that, the pip of $(PYTHON), which
# installs into another environment (--python, pip >= 22.3) and spares the new
# venv the seconds ensurepip takes.
PIP = $(if $(wildcard $(VENV)/bin/pip),$(PY) -m pip,$(PYTHON) -m pip --python $(PY)) \
	install --quiet --disable-pip-version-check
# The demo needs polystore and its few dependencies; everything else (tests,
# linters, docs, PostgreSQL, S3) comes with the dev extra, installed by the
# other targets.
BASE_STAMP := $(VENV)/.installed-base
STAMP := $(VENV)/.installed

.PHONY: demo test lint docs bench wheel-check clean

$(PY):
	if $(PYTHON) -m pip install --help 2>/dev/null | grep -q -- '--python <python>'; then \
	    $(PYTHON) -m venv --without-pip $(VENV); \
	else \
	    $(PYTHON) -m venv $(VENV); \
	fi

$(BASE_STAMP): pyproject.toml | $(PY)
	$(PIP) -e .
	touch $(BASE_STAMP)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) --upgrade pip
	$(PIP) -e ".[dev]"
	touch $(BASE_STAMP) $(STAMP)

demo: $(BASE_STAMP)
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
