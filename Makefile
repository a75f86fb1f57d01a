# medmerge. Everything heavy (torch venv, weights, cargo target dir) is cached in
# $(HOME)/.cache/medmerge, so a second run is fast.
SHELL := /bin/bash
ENV := source scripts/env.sh &&

.PHONY: setup build demo test crds bench-paper

setup:
	bash scripts/setup-torch.sh

build: setup
	$(ENV) cargo build --workspace --bins

## Run a MergeJob end to end on one machine (DATA=<ImageFolder> for real images).
demo: build
	DATA="$(DATA)" bash scripts/demo.sh

## Run every test.
test: setup
	bash scripts/test.sh

## Regenerate crds/mergejob.yaml from the Rust types.
crds:
	$(ENV) cargo run -q -p medmerge-crds --bin crdgen > crds/mergejob.yaml

## Reproduce the paper's table on ../shared/data/eye-fundus (DATA=... to change).
bench-paper: build
	DATA="$(DATA)" bash bench/paper-table.sh
