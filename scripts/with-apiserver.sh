#!/usr/bin/env bash
# Runs a command against a real, throwaway Kubernetes API: etcd + kube-apiserver on loopback,
# admin token auth, RBAC on. Exports KUBECONFIG for the command, tears everything down after.
# kube-controller-manager runs only its garbage collector.
# Usage: scripts/with-apiserver.sh <command> [args...]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/lib.sh"
apiserver="$("$here/setup-k8s.sh" kube-apiserver)"
controller_manager="$("$here/setup-k8s.sh" kube-controller-manager)"
work="$(mktemp -d -t medmerge-k8s.XXXXXX)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

etcd_port="$(free_port)"; peer_port="$(free_port)"; api_port="$(free_port)"

etcd --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-cluster "default=http://127.0.0.1:$peer_port" >"$work/etcd.log" 2>&1 &
pids+=($!)

token="$(openssl rand -hex 16)"
# A second token authenticates as the operator's ServiceAccount (release `medmerge` in namespace
# `medmerge`), so tests can run the operator under exactly the chart's RBAC.
MEDMERGE_E2E_SA_TOKEN="$(openssl rand -hex 16)"
export MEDMERGE_E2E_SA_TOKEN
{
  echo "$token,medmerge-admin,1,system:masters"
  echo "$MEDMERGE_E2E_SA_TOKEN,system:serviceaccount:medmerge:medmerge,2,\"system:serviceaccounts,system:serviceaccounts:medmerge,system:authenticated\""
} > "$work/tokens.csv"
openssl genrsa -out "$work/sa.key" 2048 2>/dev/null
openssl rsa -in "$work/sa.key" -pubout -out "$work/sa.pub" 2>/dev/null
"$apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" --bind-address 127.0.0.1 --secure-port "$api_port" \
  --cert-dir "$work/certs" --token-auth-file "$work/tokens.csv" --authorization-mode RBAC \
  --service-account-issuer https://kubernetes.default.svc --service-account-key-file "$work/sa.pub" \
  --service-account-signing-key-file "$work/sa.key" --service-cluster-ip-range 10.96.0.0/16 \
  --enable-admission-plugins NamespaceLifecycle >"$work/apiserver.log" 2>&1 &
pids+=($!)

# The API server writes a self-signed serving certificate at start; clients verify against it.
for _ in $(seq 1 120); do [ -s "$work/certs/apiserver.crt" ] && break; sleep 0.5; done
export KUBECONFIG="$work/kubeconfig"
kubectl config set-cluster e2e --server "https://127.0.0.1:$api_port" --certificate-authority "$work/certs/apiserver.crt" --embed-certs >/dev/null
kubectl config set-credentials admin --token "$token" >/dev/null
kubectl config set-context e2e --cluster e2e --user admin --namespace default >/dev/null
kubectl config use-context e2e >/dev/null

for _ in $(seq 1 120); do
  kubectl get namespace default >/dev/null 2>&1 && break
  sleep 0.5
done
if ! kubectl get namespace default >/dev/null 2>&1; then
  echo "with-apiserver: the API server did not come up; its log:" >&2
  tail -n 30 "$work/apiserver.log" >&2
  exit 1
fi
# Only the garbage collector: it deletes a MergeJob's Jobs through their owner references, as on
# a real cluster. No Job controller runs, so tests (playing the node) own Job statuses.
"$controller_manager" --kubeconfig "$KUBECONFIG" --controllers garbagecollector --leader-elect=false \
  --use-service-account-credentials=false --port 0 --secure-port 0 >"$work/controller-manager.log" 2>&1 &
pids+=($!)
echo "with-apiserver: kube-apiserver $("$apiserver" --version | awk '{print $2}') on 127.0.0.1:$api_port" >&2
"$@"
