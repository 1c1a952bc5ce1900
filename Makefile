# Every target here is what CI runs; `.ci/run` calls `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.deps-installed

.PHONY: dev demo test lint fmt test-rust test-py conformance bench bench-smoke clean

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
test: dev lint test-rust test-py conformance bench-smoke

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
