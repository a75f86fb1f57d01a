#!/usr/bin/env bash
# Installs the Helm chart's ServiceAccount, RBAC and Deployment (`helm template | kubectl apply`,
# release `medmerge` in namespace `medmerge`) into the API server of scripts/with-apiserver.sh and
# prints the path of a kubeconfig that authenticates as that ServiceAccount, so the operator
# binary runs with the chart's permissions and nothing more.
set -euo pipefail
cd "$(dirname "$0")/.."
helm="$(bash scripts/setup-helm.sh)"
"$helm" lint charts/medmerge >&2
kubectl create namespace medmerge >/dev/null
"$helm" template medmerge charts/medmerge -n medmerge --skip-crds | kubectl apply -n medmerge -f - >&2
sa_kubeconfig="$(mktemp -t medmerge-operator-kubeconfig.XXXXXX)"
cp "$KUBECONFIG" "$sa_kubeconfig"
KUBECONFIG="$sa_kubeconfig" kubectl config set-credentials operator --token "$MEDMERGE_E2E_SA_TOKEN" >/dev/null
KUBECONFIG="$sa_kubeconfig" kubectl config set-context e2e --user operator >/dev/null
echo "$sa_kubeconfig"
