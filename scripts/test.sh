#!/usr/bin/env bash
# The test command: every test of the workspace, after the one-time setup.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --workspace --bins
cargo test --workspace --no-fail-fast -- --test-threads="${TEST_THREADS:-2}"
# The artifact store and the pipeline against a real S3 server (SeaweedFS, cached).
bash scripts/test-s3.sh
# The operator against a real etcd + kube-apiserver (built once from source and cached).
bash scripts/with-apiserver.sh bash scripts/e2e-operator.sh
