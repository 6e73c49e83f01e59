# Portrait task runner. Everything builds in the release profile, so the
# bundled RocksDB is compiled once for binaries, tests, lints and benches.
SHELL := /bin/bash
CARGO ?= cargo
PROFILE := --release
BIN := $(or $(CARGO_TARGET_DIR),target)/release

.PHONY: help setup build run test lint verify bench fuzz cluster fmt clean-data

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: ## install system packages the build needs (libclang-dev)
	@./deploy/scripts/setup.sh

build: setup ## build portraitd and the portrait CLI
	$(CARGO) build $(PROFILE) --workspace --bins

run: build ## start a single node on ./data, 127.0.0.1:7700 (peer port 8700), default schema, 4 shards
	$(BIN)/portraitd --shards 4 $(ARGS)

# Cluster tests at once: they mostly wait (elections, timeouts, catch-up),
# so more than one per core keeps two cores busy. On 2 cores: 220 s with 2,
# 150 s with 3, 115-127 s with 4 (every run passed); 3 leaves room for a
# busier machine.
CLUSTER_TEST_THREADS ?= 3

# Two cargo runs: the cluster tests build `portraitd-faults` (portraitd with
# the `fault-injection` feature) in a run of their own, so the feature never
# reaches this run's target/release/portraitd (see docs/development.md).
# Both always run; ends with one line "N passed, N failed" summed over every
# test binary (cargo's own last line is often a doc-test binary with 0 tests).
test: setup ## run every test (unit, integration, cluster)
	@log=$$(mktemp); set -o pipefail; \
	( $(CARGO) test $(PROFILE) --workspace --exclude portrait-cluster-tests; a=$$?; \
	  $(CARGO) test $(PROFILE) -p portrait-cluster-tests -- --test-threads=$(CLUSTER_TEST_THREADS); b=$$?; \
	  exit $$((a | b)) ) 2>&1 | tee "$$log"; \
	status=$$?; \
	awk '/^test result:/ { p += $$4; f += $$6 } END { printf "%d passed, %d failed\n", p, f }' "$$log"; \
	rm -f "$$log"; exit $$status

# Clippy in the same two runs as `test`: the server without fault injection
# (what ships), then the cluster tests with it.
lint: setup ## rustfmt check and clippy -D warnings
	$(CARGO) fmt --all --check
	$(CARGO) clippy $(PROFILE) --workspace --exclude portrait-cluster-tests --all-targets -- -D warnings
	$(CARGO) clippy $(PROFILE) -p portrait-cluster-tests --all-targets -- -D warnings

verify: lint test ## what CI runs

# Builds first, then runs (per-package `cargo run`s unify features
# differently and rebuild tokio, hyper and tonic in between). The cluster
# benchmarks run the release `portraitd`, not the tests' `portraitd-faults`.
bench: setup ## apply-cost, single-node ingest/read, 3-node cluster, idle-CPU, elastic-scaling and backup/restore benchmarks; prints tables
	$(CARGO) build $(PROFILE) --workspace --exclude portrait-cluster-tests --bins --examples
	$(CARGO) build $(PROFILE) -p portrait-cluster-tests --example cluster_bench --example idle_cpu --example elastic_bench --example backup_bench
	$(BIN)/examples/apply_cost
	$(BIN)/examples/bench $(ARGS)
	PORTRAITD=$(BIN)/portraitd $(BIN)/examples/cluster_bench
	PORTRAITD=$(BIN)/portraitd $(BIN)/examples/idle_cpu
	PORTRAITD=$(BIN)/portraitd $(BIN)/examples/elastic_bench
	PORTRAITD=$(BIN)/portraitd $(BIN)/examples/backup_bench

# Coverage-guided fuzzing of the tag-rule language (server/fuzz). cargo-fuzz
# passes -Z flags, which a stable toolchain takes with RUSTC_BOOTSTRAP=1.
FUZZ_SECS ?= 300
fuzz: ## fuzz the tag-rule parser and evaluator for FUZZ_SECS seconds (default 300)
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	mkdir -p server/fuzz/corpus/expr
	cd server/fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run expr corpus/expr seeds/expr -- \
		-dict=expr.dict -max_len=512 -max_total_time=$(FUZZ_SECS)

cluster: build ## start 3 local nodes on 127.0.0.1:7701-7703 (peer ports 8701-8703; deploy/scripts/local-cluster.sh)
	./deploy/scripts/local-cluster.sh

fmt: ## format the code
	$(CARGO) fmt --all

clean-data: ## remove ./data (the local node's state)
	rm -rf ./data
