# Two commands on a fresh machine: `make run` and `make test`. Both create .venv as needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP_RUN  := $(VENV)/.installed-run
STAMP_DEV  := $(VENV)/.installed-dev
STAMP_BENCH := $(VENV)/.installed-bench
PYTEST_ARGS ?=

.PHONY: run test lint bench chaos fuzz clean venv

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
	$(PY) bench/daemon_send.py
	$(PY) bench/quic.py
	$(PY) bench/quic_engines.py
	$(PY) bench/downloads.py
	$(PY) bench/gateway.py
	$(PY) bench/cluster.py

## chaos: the fault-injection suite at full size (cuts, corruption, kill -9, full disks, load, bad input, netns); rewrites docs/RELIABILITY.md
chaos: $(STAMP_DEV)
	$(PY) bench/chaos.py

STAMP_FUZZ := $(VENV)/.installed-fuzz
FUZZ_SECONDS ?= 60
FUZZ_HARNESSES := frames transfer

$(STAMP_FUZZ): pyproject.toml $(STAMP_DEV)
	$(PIP) install -e '.[test,lint,fuzz]'
	touch $@

## fuzz: each atheris harness in fuzz/ for $(FUZZ_SECONDS) s; a crash fails it (inputs in fuzz/artifacts/)
fuzz: $(STAMP_FUZZ)
	@mkdir -p fuzz/artifacts
	@status=0; for h in $(FUZZ_HARNESSES); do \
	    mkdir -p fuzz/work/$$h; \
	    case $$h in frames) len=8192;; *) len=32768;; esac; \
	    echo "fuzz: $$h for $(FUZZ_SECONDS) s"; \
	    $(PY) fuzz/fuzz_$$h.py fuzz/work/$$h fuzz/corpus/$$h -dict=fuzz/wire.dict \
	        -max_total_time=$(FUZZ_SECONDS) -max_len=$$len -timeout=10 -rss_limit_mb=2048 \
	        -artifact_prefix=fuzz/artifacts/$$h- -print_final_stats=1 || status=1; \
	done; \
	if [ $$status -ne 0 ]; then echo "fuzz: crash; reproducers in fuzz/artifacts/ (see fuzz/README.md)"; fi; \
	exit $$status

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
