#!/usr/bin/env bash
# The operator against a real kube-apiserver: the CRD is accepted and documented, a MergeJob
# drives its stage Jobs (statuses set from outside), `kubectl get mj` shows the columns.
# Run through scripts/with-apiserver.sh (KUBECONFIG set), e.g. `make e2e-operator`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
source scripts/lib.sh

kubectl apply --server-side -f crds/mergejob.yaml
bash scripts/wait-for-crd.sh
# Discovery lags the Established condition by a moment.
for _ in $(seq 1 30); do explain="$(kubectl explain mergejob.spec.shards 2>/dev/null)" && break; sleep 1; done
[ -n "${explain:-}" ] || { kubectl explain mergejob.spec.shards; exit 1; }
for field in name data vector secretRef nodeSelector tolerations; do
  grep -q "^   $field" <<<"$explain" || { echo "kubectl explain mergejob.spec.shards does not document $field" >&2; exit 1; }
done
grep -q "Name of a Secret with this shard's data credentials" <<<"$explain"
cargo test --workspace --test apiserver -- --ignored --test-threads=2

# The binary itself, installed from the Helm chart's RBAC and running as its ServiceAccount:
# leader Lease, a MergeJob driven with only the chart's permissions, health, readiness and
# metrics endpoints, graceful SIGTERM.
sa_kubeconfig="$(bash scripts/install-chart.sh)"
kubectl create namespace e2e-rbac
if KUBECONFIG="$sa_kubeconfig" kubectl get secrets -n e2e-rbac >/dev/null 2>&1; then
  echo "the operator's ServiceAccount can read Secrets; the chart's RBAC is too wide" >&2; exit 1
fi
cargo build -q --workspace --bins
# The Deployment's arguments, as the chart renders them, are ones the binary accepts (clap stops
# at the first unknown flag or bad value, before --help).
read -ra chart_args <<<"$(kubectl get deployment medmerge -n medmerge -o jsonpath='{.spec.template.spec.containers[0].args[*]}')"
"$CARGO_TARGET_DIR/debug/medmerge-operator" "${chart_args[@]}" --help >/dev/null \
  || { echo "the chart's Deployment passes arguments the operator refuses: ${chart_args[*]}" >&2; exit 1; }
port="$(free_port)"
log="$(mktemp)"
KUBECONFIG="$sa_kubeconfig" "$CARGO_TARGET_DIR/debug/medmerge-operator" --metrics-addr "127.0.0.1:$port" \
  --lease-namespace medmerge --identity e2e-binary --log-json --allowed-image ghcr.io/medmerge/trainer >"$log" 2>&1 &
operator=$!
stop_on_exit "$operator"
metrics() { curl -sf "http://127.0.0.1:$port/metrics"; }
eventually "the operator to be ready" curl -sf "http://127.0.0.1:$port/readyz"
curl -sf "http://127.0.0.1:$port/healthz" | grep -q ok
[ "$(kubectl get lease medmerge-operator -n medmerge -o jsonpath='{.spec.holderIdentity}')" = e2e-binary ]
sed -e 's/namespace: radiology/namespace: e2e-rbac/' -e 's/storage:/storage:\n    cleanup: Delete/' examples/cluster.yaml | kubectl apply -f -
eventually "an init Job created under the chart's RBAC" kubectl get job fundus-g1-init -n e2e-rbac
eventually "phase Training" bash -c '[ "$(kubectl get mj fundus -n e2e-rbac -o jsonpath={.status.phase})" = Training ]'
eventually "the cleanup finalizer" bash -c '[ "$(kubectl get mj fundus -n e2e-rbac -o jsonpath={.metadata.finalizers[0]})" = medmerge.io/artifact-cleanup ]'
eventually "a StageStarted Event" bash -c 'kubectl get events.events.k8s.io -n e2e-rbac -o jsonpath="{.items[*].reason}" | grep -q StageStarted'
eventually "MergeJobs by phase in /metrics" bash -c "curl -sf http://127.0.0.1:$port/metrics | grep -q '^medmerge_mergejobs{phase=\"Training\"} [1-9]'"
metrics | grep -q '^medmerge_reconciles_total [1-9]'
# An image outside the allowlist: refused before any Job exists, naming the field.
sed -e 's/namespace: radiology/namespace: e2e-rbac/' -e 's/name: fundus/name: foreign-image/' -e 's|image: ghcr.io/medmerge/trainer:0.1.0|image: docker.io/library/busybox:latest|' examples/cluster.yaml | kubectl apply -f -
eventually "a foreign image refused as InvalidSpec" bash -c 'kubectl get mj foreign-image -n e2e-rbac -o jsonpath="{.status.phase} {.status.conditions}" | grep -q "^Failed .*spec.cluster.image: .*busybox.* is not an allowed trainer image"'
if kubectl get jobs -n e2e-rbac -o name | grep -q foreign-image; then echo "a Job was created for a refused image" >&2; exit 1; fi
kill -TERM "$operator"; wait "$operator"
if grep -Eiq 'forbidden|"level":"(WARN|ERROR)"' "$log"; then
  echo "the operator hit errors under the chart's RBAC:" >&2; grep -Ei 'forbidden|WARN|ERROR' "$log" >&2; exit 1
fi
grep -q '"message":"medmerge-operator stopped"' "$log" || { cat "$log"; exit 1; }
echo "e2e-operator: the binary ran under the chart's RBAC, served health and metrics, held the Lease and stopped on SIGTERM"
table="$(kubectl get mj -A)"
echo "$table"
head -n1 <<<"$table" | grep -Eq 'NAME +PHASE +SHARDS +ACCURACY +AGE' || { echo "kubectl get mj lacks the printer columns" >&2; exit 1; }
grep -Eq '^e2e-invalid +quorum +Failed ' <<<"$table"
grep -Eq '^e2e-run +retina +Training +' <<<"$table"
echo "e2e-operator: passed"
