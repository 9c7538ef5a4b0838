# recstream's task runner: `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(VIRTUAL_ENV)/bin:$(PATH)
RUST_SRC := $(shell find core_rs/src -name '*.rs') core_rs/Cargo.toml Cargo.toml
STAMP := $(VENV)/.built

.DEFAULT_GOAL := help
.PHONY: help dev serve test test-rust test-py lint fmt bench soak clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml Makefile $(RUST_SRC)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check 'maturin>=1.7,<2'
	maturin develop --release --quiet --extras dev,bench,bench-peers
	touch $@

dev: $(STAMP)  ## create .venv with the dev and benchmark extras (peers too), build the extension (release)

serve: dev  ## run the server on embedded defaults
	recstream serve

test: dev test-rust test-py  ## build everything, then the Rust and Python tests

test-rust:
	cargo test --release --manifest-path core_rs/Cargo.toml

test-py: dev
	$(PY) -m pytest -q

lint: dev  ## ruff, mypy, cargo fmt --check, clippy
	$(PY) -m ruff check engine connectors bench tests
	$(PY) -m ruff format --check engine connectors bench tests
	$(PY) -m mypy
	cargo fmt --all -- --check
	cargo clippy --release --all-targets -- -D warnings

fmt:  ## format Python and Rust
	$(PY) -m ruff format engine connectors bench tests
	cargo fmt --all

bench: dev  ## run the whole benchmark suite against its peers and rewrite the README table
	$(PY) -m bench all

soak: dev  ## the reliability drills: kill -9 trials, disk faults, fuzzing, stuck subscribers
	$(PY) -m bench reliability

clean:  ## remove build products and the virtualenv
	rm -rf target $(VENV) engine/_core*.so
