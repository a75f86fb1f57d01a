#!/usr/bin/env bash
# On the real node of scripts/with-node.sh: builds the operator and trainer images
# (scripts/build-images.sh), imports them into the node's containerd, provisions the operator's
# view of the artifact share (a ReadWriteMany hostPath claim) and its S3 Secret, and installs the
# chart with `helm install` so the operator runs in its own pod on its ServiceAccount token.
# Prints the share's host path. Used by scripts/e2e-cluster.sh and bench/node-e2e.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
: "${MEDMERGE_NODE_DIR:?run through scripts/with-node.sh}" "${MEDMERGE_S3_ENDPOINT:?run through scripts/with-s3.sh}"
cargo build -q --workspace --bins
mapfile -t tars < <(bash scripts/build-images.sh)
sock="$MEDMERGE_NODE_DIR/run/containerd.sock"
for tar in "${tars[@]}"; do
  s=$(date +%s)
  ctr -a "$sock" -n k8s.io images import "$tar" >/dev/null
  echo "install-on-node: imported $(basename "$tar") ($(( $(stat -c %s "$tar") >> 20 )) MiB) in $(( $(date +%s) - s )) s" >&2
done

# The operator's view of the artifact share (storage.local): a ReadWriteMany claim on a hostPath
# volume the test's MergeJob namespaces bind too; the operator reaches S3 with the chart's Secret.
share="$MEDMERGE_NODE_DIR/shares/artifacts"
mkdir -p "$share" && chown 65532:65532 "$share"
kubectl create namespace medmerge >/dev/null
kubectl -n medmerge create secret generic operator-s3 \
  --from-literal=AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" --from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" >/dev/null
kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: PersistentVolume
metadata: {name: medmerge-operator-artifacts}
spec:
  capacity: {storage: 10Gi}
  accessModes: [ReadWriteMany]
  storageClassName: ""
  hostPath: {path: "$share", type: Directory}
  claimRef: {namespace: medmerge, name: artifacts}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: artifacts, namespace: medmerge}
spec:
  accessModes: [ReadWriteMany]
  storageClassName: ""
  volumeName: medmerge-operator-artifacts
  resources: {requests: {storage: 10Gi}}
YAML
helm="$(bash scripts/setup-helm.sh)"
"$helm" lint charts/medmerge >/dev/null
# No kube-proxy on the test node: the operator reaches the API server at the node's address.
"$helm" install medmerge charts/medmerge -n medmerge \
  --set image.repository=localhost/medmerge/operator --set image.tag=dev --set image.pullPolicy=Never \
  --set replicaCount=1 --set leaderElection.leaseSeconds=5 --set "trainer.allowedImages={localhost/medmerge/trainer,ghcr.io/medmerge/trainer}" \
  --set s3.credentialsSecret=operator-s3 \
  --set localArtifacts.enabled=true --set localArtifacts.persistentVolumeClaim=artifacts \
  --set networkPolicy.enabled=true --set "networkPolicy.s3.ports={${MEDMERGE_S3_ENDPOINT##*:}}" \
  --set "extraEnv[0].name=KUBERNETES_SERVICE_HOST" --set "extraEnv[0].value=$MEDMERGE_NODE_IP" \
  --set "extraEnv[1].name=KUBERNETES_SERVICE_PORT" --set-string "extraEnv[1].value=6443" >&2
bash scripts/wait-for-crd.sh >/dev/null
if ! kubectl -n medmerge rollout status deployment/medmerge --timeout=180s >&2; then
  kubectl -n medmerge describe pods >&2; kubectl -n medmerge logs deployment/medmerge --tail=50 >&2 || true; exit 1
fi
echo "$share"
