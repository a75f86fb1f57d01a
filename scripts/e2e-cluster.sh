#!/usr/bin/env bash
# A MergeJob end to end on the cluster path: real kube-apiserver + etcd, real S3 server, the
# operator's controller, and the real trainer binary running every stage Job (the test plays
# the node). Run through scripts/with-apiserver.sh and scripts/with-s3.sh: `make e2e-cluster`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
kubectl apply -f crds/mergejob.yaml >/dev/null
kubectl wait --for condition=established --timeout=60s crd/mergejobs.medmerge.io >/dev/null
cargo build -q --workspace --bins
cargo test --workspace --test cluster -- --ignored
