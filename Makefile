# Thin wrappers over cargo and scripts/; every step also works without make.
CARGO_TARGET_DIR ?= $(HOME)/.cache/cloudtap/target
export CARGO_TARGET_DIR

.PHONY: build run test lint proto bench

build: ## release binaries into ./bin
	cargo build --release --locked -p cloudtap-cli --bins
	mkdir -p bin
	install -m 0755 $(CARGO_TARGET_DIR)/release/cloudtapd $(CARGO_TARGET_DIR)/release/cloudtapctl bin/

run: ## the embedded default
	scripts/run.sh

test: ## the whole suite, with the services it needs
	scripts/test.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

proto: ## code generation happens in proto/build.rs
	cargo build -p cloudtap-proto
