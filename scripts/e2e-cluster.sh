#!/usr/bin/env bash
# MergeJobs on a real single-node Kubernetes (scripts/with-node.sh) with an S3 server on the
# node's bridge (scripts/with-s3.sh): the operator and trainer images built from
# images/*.Dockerfile (scripts/build-images.sh) and imported into containerd, the chart installed
# with `helm install`, the operator running in its pod on its ServiceAccount token and the chart's
# S3 Secret, every stage a real pod. `make e2e-cluster`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
: "${MEDMERGE_NODE_DIR:?run through scripts/with-node.sh}" "${MEDMERGE_S3_ENDPOINT:?run through scripts/with-s3.sh}"
share="$(bash scripts/install-on-node.sh)"
export MEDMERGE_E2E_TRAINER_IMAGE=localhost/medmerge/trainer:dev-cpu MEDMERGE_E2E_ARTIFACTS_SHARE="$share"
status=0
# E2E_FILTER runs some scenarios only (a test-name substring).
cargo test -q -p medmerge-tests --test cluster -- --ignored --test-threads=1 ${E2E_FILTER:-} || status=$?
if [ "$status" -ne 0 ]; then
  echo "e2e-cluster: failed; the operator's log:" >&2
  kubectl -n medmerge logs deployment/medmerge --tail=40 >&2 || true
  # The last lines of every stage pod that failed.
  kubectl get pods -A -l app.kubernetes.io/managed-by=medmerge --field-selector=status.phase=Failed \
    -o jsonpath='{range .items[*]}{.metadata.namespace} {.metadata.name}{"\n"}{end}' | while read -r ns pod; do
    echo "--- $ns/$pod" >&2; kubectl -n "$ns" logs "$pod" --tail=15 >&2 || true
  done
fi
exit "$status"
