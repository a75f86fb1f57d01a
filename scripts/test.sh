#!/usr/bin/env bash
# The test command: every test of the workspace, after the one-time setup.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# The shared target directory keeps only the newest build of each test binary.
bash scripts/prune-target.sh
# One style for the workspace (rustfmt.toml); `cargo fmt --all` fixes what this finds.
cargo fmt --all --check
# One lint policy ([workspace.lints] in Cargo.toml); warnings fail the run.
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --bins
cargo test --workspace --no-fail-fast -- --test-threads="${TEST_THREADS:-2}"
# The HTML report rendered by a real headless browser (Debian chromium, installed once).
MEDMERGE_CHROMIUM="$(bash scripts/setup-chromium.sh)" cargo test --workspace --test report_browser -- --ignored
# The chart's Argo CD health check, in a real Lua interpreter.
bash scripts/test-argocd-health.sh
# The artifact store and the pipeline against a real S3 server (SeaweedFS, cached).
bash scripts/test-s3.sh
# The operator against a real etcd + kube-apiserver (built once from source and cached).
bash scripts/with-apiserver.sh bash scripts/e2e-operator.sh
# MergeJobs on a real single-node Kubernetes: the operator and every stage in pods from the
# project's images, kubelet + containerd, S3 on the node's bridge.
bash scripts/with-node.sh bash scripts/with-s3.sh bash scripts/e2e-cluster.sh
