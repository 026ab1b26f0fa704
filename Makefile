# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The paper's baseline networks need torchvision, which works here only with torch 2.14.1
# (5.5 GB, ~2 min from local disk): a separate venv, so .venv keeps the small CPU torch 2.13.0.
BVENV := .venv-baselines
BPY := $(BVENV)/bin/python
BSTAMP := $(BVENV)/.installed

.PHONY: demo test lint setup baselines clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the local CPU wheel; any other torch version downloads gigabytes
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,postgres]'
	touch $(STAMP)

setup: $(STAMP)

$(BSTAMP): pyproject.toml
	test -x $(BPY) || $(PYTHON) -m venv $(BVENV)
	echo '*' > $(BVENV)/.gitignore
	$(BPY) -m pip install -q --upgrade pip
	$(BPY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BPY) -m pip install -q -e '.[dev,baselines]'
	touch $(BSTAMP)

baselines: $(BSTAMP)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

test: lint $(BSTAMP)
	bash .ci/system-deps.sh
	$(BPY) -m pytest -q tests/test_baselines.py
	# a throw-away PostgreSQL server: the storage and end-to-end tests run on it too, and
	# DSCINT_REQUIRE_POSTGRES=1 makes a missing server a failure, not a skip
	url="$$(bash .ci/postgres.sh)" && DSCINT_TEST_POSTGRES_URL="$$url" DSCINT_REQUIRE_POSTGRES=1 \
		$(PY) -m pytest -q --ignore=tests/test_baselines.py

demo: $(STAMP)
	$(PY) -m node demo

clean:
	rm -rf $(VENV) $(BVENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
