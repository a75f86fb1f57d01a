#!/usr/bin/env bash
# The operator against a real kube-apiserver: the CRD is accepted and documented, a MergeJob
# drives its stage Jobs (statuses set from outside), `kubectl get mj` shows the columns.
# Run through scripts/with-apiserver.sh (KUBECONFIG set), e.g. `make e2e-operator`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
kubectl apply -f crds/mergejob.yaml
kubectl wait --for condition=established --timeout=60s crd/mergejobs.medmerge.io
# Discovery lags the Established condition by a moment.
for _ in $(seq 1 30); do explain="$(kubectl explain mergejob.spec.shards 2>/dev/null)" && break; sleep 1; done
[ -n "${explain:-}" ] || { kubectl explain mergejob.spec.shards; exit 1; }
for field in name data vector secretRef nodeSelector tolerations; do
  grep -q "^   $field" <<<"$explain" || { echo "kubectl explain mergejob.spec.shards does not document $field" >&2; exit 1; }
done
grep -q "Name of a Secret with this shard's data credentials" <<<"$explain"
cargo test -p medmerge-operator --test apiserver -- --ignored --test-threads=2
table="$(kubectl get mj -A)"
echo "$table"
head -n1 <<<"$table" | grep -Eq 'NAME +PHASE +SHARDS +ACCURACY +AGE' || { echo "kubectl get mj lacks the printer columns" >&2; exit 1; }
grep -Eq '^e2e-invalid +quorum +Failed ' <<<"$table"
grep -Eq '^e2e-run +retina +Training +' <<<"$table"
echo "e2e-operator: passed"
