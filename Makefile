# Two commands on a fresh machine: `make run` and `make test`. Both create .venv as needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP_RUN  := $(VENV)/.installed-run
STAMP_DEV  := $(VENV)/.installed-dev
STAMP_BENCH := $(VENV)/.installed-bench
PYTEST_ARGS ?=

.PHONY: run test lint bench fuzz clean venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(STAMP_RUN): pyproject.toml | $(PY)
	$(PIP) install -e .
	touch $@

$(STAMP_DEV): pyproject.toml | $(PY)
	$(PIP) install -e '.[test,lint]'
	touch $@ $(STAMP_RUN)

$(STAMP_BENCH): pyproject.toml $(STAMP_DEV)
	$(PIP) install -e '.[test,lint,bench]'
	touch $@

venv: $(STAMP_DEV)

## run: the daemon in the foreground on embedded defaults (peer listener on 127.0.0.1:7070)
run: $(STAMP_RUN)
	$(VENV)/bin/tensord serve

## test: the whole suite (installs the system packages it uses when run as root)
test: $(STAMP_DEV)
	./.ci/sysdeps
	$(PY) -m pytest $(PYTEST_ARGS)

## lint: ruff (with the ASYNC rules) and mypy --strict on tensord/
lint: $(STAMP_DEV)
	$(VENV)/bin/ruff check tensord tests bench
	$(VENV)/bin/ruff format --check tensord tests bench
	$(VENV)/bin/mypy --strict tensord

## bench: tensord side by side with a plain socket, pyzmq and Arrow Flight; downloads vs aria2c and curl
bench: $(STAMP_BENCH)
	$(PY) bench/run.py
	$(PY) bench/downloads.py
	$(PY) bench/gateway.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
