#!/usr/bin/env bash
# The artifact store and the trainer's pipeline against a real S3 server (SeaweedFS on loopback,
# installed once and cached). The outage test freezes its server, so it gets one of its own.
# `--workspace` everywhere: one feature resolution, so no dependency is compiled twice.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# The suites run the trainer binary (tests/src/fixtures.rs finds it in the target dir).
cargo build -q --workspace --bins
bash scripts/with-s3.sh cargo test --workspace --test s3 --test s3_pipeline -- --ignored --test-threads=2
bash scripts/with-s3.sh cargo test --workspace --test s3_outage -- --ignored
