# Every target here is what CI runs; `.ci/run` calls `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.deps-installed

.PHONY: dev demo test lint fmt test-rust test-py conformance bench bench-smoke clean test-pythons

$(STAMP): requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements-dev.txt
	touch $(STAMP)

## Build ferroloop (release profile) into the virtualenv.
dev: $(STAMP)
	$(VENV)/bin/maturin develop --release -q

## Set up and run the example programs on ferroloop.
demo: dev
	$(PY) examples/hello.py
	$(PY) -m ferroloop examples/clock.py
	$(PY) examples/signals.py
	$(PY) examples/watch_fd.py

## The whole test suite (what CI runs).
test: dev lint test-rust test-py conformance bench-smoke test-pythons

lint: $(STAMP)
	cargo fmt --all -- --check
	cargo clippy --all-targets --no-default-features -- -D warnings
	cargo fmt --manifest-path benchmarks/netload/Cargo.toml -- --check
	cargo clippy --manifest-path benchmarks/netload/Cargo.toml --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests benchmarks conformance examples
	$(VENV)/bin/ruff format --check python tests benchmarks conformance examples
	$(PY) -m mypy.stubtest ferroloop._ferroloop --allowlist python/ferroloop/stubtest-allowlist.txt

fmt:
	cargo fmt --all
	cargo fmt --manifest-path benchmarks/netload/Cargo.toml
	$(VENV)/bin/ruff format python tests benchmarks conformance examples

test-rust:
	cargo test --no-default-features -q

## Project tests: once on stdlib asyncio and ferroloop (parity), then again in debug mode.
test-py: dev
	$(PY) -m pytest -q
	PYTHONASYNCIODEBUG=1 $(PY) -m pytest -q -p no:cacheprovider

## The project tests (ferroloop only) and the conformance run on every other CPython
## listed in PYTHONS that is installed (each in its own virtualenv and build directory;
## pyenv's 3.10 / 3.12+ by default). A machine without them skips this.
PYENV_PYTHONS := $(wildcard $(HOME)/.pyenv/versions/3.10.*/bin/python3 $(HOME)/.pyenv/versions/3.1[2-9].*/bin/python3)
PYTHONS ?= $(or $(PYENV_PYTHONS),python3.10 python3.12 python3.13 python3.14)
test-pythons:
	@set -e; ran=""; for py in $(PYTHONS); do \
	    command -v $$py >/dev/null && $$py -c "import venv" 2>/dev/null || { echo "== $$py: not installed, skipped"; continue; }; \
	    v=.venv-$$($$py -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	    echo "== $$py ($$v)"; \
	    test -x $$v/bin/python || $$py -m venv $$v; \
	    $$v/bin/pip install -q maturin pytest pytest-timeout; \
	    VIRTUAL_ENV=$$PWD/$$v PATH=$$PWD/$$v/bin:$$PATH CARGO_TARGET_DIR=target/$$v $$v/bin/maturin develop --release -q; \
	    FERROLOOP_TEST_LOOPS=ferroloop $$v/bin/python -m pytest -q -p no:cacheprovider; \
	    $$v/bin/python conformance/run.py; \
	    ran="$$ran $$py"; \
	done; echo "test-pythons ran on:$${ran:- nothing}"

## CPython's own test.test_asyncio against ferroloop.
conformance: dev
	$(PY) conformance/run.py

## Side-by-side benchmarks (full runs; slow).
bench: dev
	$(PY) benchmarks/run.py
	$(PY) benchmarks/net.py
	$(PY) benchmarks/proc.py

bench-smoke: dev
	$(PY) benchmarks/run.py --smoke
	$(PY) benchmarks/net.py --smoke
	$(PY) benchmarks/proc.py --smoke

clean:
	cargo clean
	rm -rf $(VENV)
