# recstream's task runner: `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(VIRTUAL_ENV)/bin:$(PATH)
RUST_SRC := $(shell find core_rs/src -name '*.rs') core_rs/Cargo.toml Cargo.toml
STAMP := $(VENV)/.built

.DEFAULT_GOAL := help
.PHONY: help dev serve cluster test test-rust test-py lint fmt bench soak clean

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

CLUSTER_DIR ?= cluster-data
REDIS_PORT ?= 6390
cluster: dev  ## Redis + three replica nodes on loopback (HTTP :8000-8002, Forward :24224-24226); Ctrl-C stops all
	mkdir -p $(CLUSTER_DIR)
	trap 'kill $$(jobs -p) 2>/dev/null; wait' EXIT INT TERM; \
	redis-server --port $(REDIS_PORT) --bind 127.0.0.1 --dir $(CLUSTER_DIR) --appendonly yes \
		--appendfsync always --save '' --logfile redis.log & \
	until redis-cli -p $(REDIS_PORT) ping >/dev/null 2>&1; do sleep 0.1; done; \
	for i in 0 1 2; do \
		recstream serve --log redis://127.0.0.1:$(REDIS_PORT) --data-dir $(CLUSTER_DIR)/node$$i \
			--http 127.0.0.1:800$$i --forward 127.0.0.1:2422$$((4 + i)) & \
	done; \
	wait

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
