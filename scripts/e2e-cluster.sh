#!/usr/bin/env bash
# MergeJobs end to end on the cluster path, all real parts: kube-apiserver + etcd + the garbage
# collector, an S3 server, the operator binary running as the Helm chart's ServiceAccount, and
# the trainer binary running every stage Job (the test plays the node). Run through
# scripts/with-apiserver.sh and scripts/with-s3.sh: `make e2e-cluster`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
kubectl apply -f crds/mergejob.yaml >/dev/null
kubectl wait --for condition=established --timeout=60s crd/mergejobs.medmerge.io >/dev/null
MEDMERGE_E2E_OPERATOR_KUBECONFIG="$(bash scripts/install-chart.sh)"
export MEDMERGE_E2E_OPERATOR_KUBECONFIG
cargo build -q --workspace --bins
cargo test --workspace --test cluster -- --ignored --test-threads=1
