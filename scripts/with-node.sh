#!/usr/bin/env bash
# Runs a command against a real, throwaway single-node Kubernetes 1.20 (Debian's source): etcd,
# kube-apiserver, kube-controller-manager with every controller (Job, TTL-after-finished, garbage
# collector, PV binder, ServiceAccount tokens), kube-scheduler, and a kubelet running real
# containers with containerd + runc on a CNI bridge. Tears everything down after.
#
# Nothing leaves this machine: pods live on the bridge mmnode0 (10.88.0.0/16, no gateway, no
# masquerade) and reach only the host's bridge address 10.88.0.1, where the API server and any
# test server listen. No kube-proxy and no DNS: pods reach servers by that IP. The kubelet runs
# with AWS_EC2_METADATA_DISABLED=true (its AWS credential provider would probe the cloud
# metadata address). One node at a time: the ports and host paths below are fixed.
#
# Exports for the command: KUBECONFIG (admin), MEDMERGE_NODE_IP (10.88.0.1), MEDMERGE_NODE_DIR
# (the node's scratch directory), MEDMERGE_NODE_NAME.
# Usage: scripts/with-node.sh <command> [args...]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bash "$here/setup-node.sh"
bin() { "$here/setup-k8s.sh" "$1"; }
IP=10.88.0.1 BRIDGE=mmnode0 NODE=medmerge-node
R="$(mktemp -d -t medmerge-node.XXXXXX)"
P="$R/pki" L="$R/logs" RUN="$R/run"
mkdir -p "$P" "$L" "$RUN" "$R/etc/cni/net.d" "$R/kubelet" "$R/containerd"
SOCK="$RUN/containerd.sock"
export AWS_EC2_METADATA_DISABLED=true

stop_pid() { # name
  [ -f "$RUN/$1.pid" ] || return 0
  local p; p="$(cat "$RUN/$1.pid")"
  if kill -0 "$p" 2>/dev/null; then
    kill "$p"
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$p" 2>/dev/null || true
  fi
  rm -f "$RUN/$1.pid"
}
teardown() {
  set +e
  for c in kubelet kube-scheduler kube-controller-manager kube-apiserver etcd; do stop_pid "$c"; done
  if ctr -a "$SOCK" version >/dev/null 2>&1; then
    for t in $(ctr -a "$SOCK" -n k8s.io tasks ls -q); do ctr -a "$SOCK" -n k8s.io tasks kill -s KILL "$t" 2>/dev/null; done
    sleep 1
    for t in $(ctr -a "$SOCK" -n k8s.io tasks ls -q); do ctr -a "$SOCK" -n k8s.io tasks delete -f "$t" 2>/dev/null; done
    for c in $(ctr -a "$SOCK" -n k8s.io containers ls -q); do ctr -a "$SOCK" -n k8s.io containers rm "$c" 2>/dev/null; done
  fi
  stop_pid containerd
  awk -v r="$R/" 'index($5, r) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do umount "$m" 2>/dev/null || umount -l "$m"; done
  for m in $(awk '$5 ~ "^/var/lib/kubelet/" || $5 ~ "^/run/containerd/" {print $5}' /proc/self/mountinfo | sort -r); do umount "$m" 2>/dev/null || umount -l "$m"; done
  for ss in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do for top in kubepods kubepods.slice k8s.io; do
    [ -d "$ss$top" ] && find "$ss$top" -depth -type d -exec rmdir {} \; 2>/dev/null
  done; done
  ip link del "$BRIDGE" 2>/dev/null
  [ -f "$R/sysctl-orig.txt" ] && while IFS='=' read -r k v; do sysctl -qw "$k=$v"; done < "$R/sysctl-orig.txt"
  rm -rf /var/lib/kubelet /var/log/pods /var/log/containers /run/containerd
  if [ -n "${MEDMERGE_KEEP_NODE:-}" ]; then echo "with-node: kept $R" >&2; else rm -rf "$R"; fi
}
trap teardown EXIT
# The kubelet changes these; put them back afterwards.
for k in vm.overcommit_memory kernel.panic kernel.panic_on_oops; do echo "$k=$(sysctl -n "$k")"; done > "$R/sysctl-orig.txt"

# --- certificates and tokens -------------------------------------------------------------
cert() { # name subject extensions [CA-signed]
  openssl genrsa -out "$P/$1.key" 2048 2>/dev/null
  openssl req -new -key "$P/$1.key" -subj "$2" -out "$P/$1.csr" 2>/dev/null
  printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n%s\n' "$3" > "$P/$1.ext"
  openssl x509 -req -in "$P/$1.csr" -CA "$P/ca.crt" -CAkey "$P/ca.key" -CAcreateserial -days 2 -extfile "$P/$1.ext" -out "$P/$1.crt" 2>/dev/null
}
openssl genrsa -out "$P/ca.key" 2048 2>/dev/null
openssl req -x509 -new -nodes -key "$P/ca.key" -subj "/CN=medmerge-node-ca" -days 2 -out "$P/ca.crt" 2>/dev/null
cert apiserver "/CN=kube-apiserver" "extendedKeyUsage=serverAuth
subjectAltName=DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:localhost,IP:127.0.0.1,IP:10.0.0.1,IP:$IP"
cert kubelet "/CN=$NODE" "extendedKeyUsage=serverAuth
subjectAltName=DNS:$NODE,IP:$IP,IP:127.0.0.1"
cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "extendedKeyUsage=clientAuth"
openssl genrsa -out "$P/sa.key" 2048 2>/dev/null
openssl rsa -in "$P/sa.key" -pubout -out "$P/sa.pub" 2>/dev/null
token() { openssl rand -hex 16; }
ADMIN=$(token) KUBELET=$(token) KCM=$(token) SCHED=$(token)
cat > "$P/tokens.csv" <<CSV
$ADMIN,admin,admin-uid,"system:masters"
$KUBELET,system:node:$NODE,node-uid,"system:nodes"
$KCM,system:kube-controller-manager,kcm-uid
$SCHED,system:kube-scheduler,sched-uid
CSV
kubeconfig() { # name user token
  cat > "$P/$1.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: medmerge-node
  cluster: {server: "https://$IP:6443", certificate-authority: "$P/ca.crt"}
users:
- name: $2
  user: {token: $3}
contexts:
- name: medmerge-node
  context: {cluster: medmerge-node, user: $2, namespace: default}
current-context: medmerge-node
KC
}
kubeconfig admin admin "$ADMIN"; kubeconfig kubelet "system:node:$NODE" "$KUBELET"
kubeconfig controller-manager system:kube-controller-manager "$KCM"; kubeconfig scheduler system:kube-scheduler "$SCHED"
chmod 600 "$P"/*.key "$P"/*.kubeconfig "$P/tokens.csv"
for f in containerd.toml:containerd/config.toml cni.conflist:etc/cni/net.d/10-medmerge.conflist kubelet.yaml:kubelet/config.yaml; do
  sed "s|@NODE_DIR@|$R|g; s|@NODE_IP@|$IP|g" "$here/node/${f%%:*}" > "$R/${f#*:}"
done

# --- processes ---------------------------------------------------------------------------
bg() { local name=$1; shift; nohup "$@" > "$L/$name.log" 2>&1 & echo $! > "$RUN/$name.pid"; }
wait_for() { # what seconds command...
  local what=$1 limit=$2; shift 2
  for _ in $(seq 1 $((limit * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "with-node: $what did not come up in ${limit}s; logs in $L:" >&2
  for f in "$L"/*.log; do echo "--- $f" >&2; tail -n 15 "$f" >&2; done
  exit 1
}
t0=$(date +%s.%N)
ip link show "$BRIDGE" >/dev/null 2>&1 || { ip link add "$BRIDGE" type bridge; ip addr add "$IP/16" dev "$BRIDGE"; ip link set "$BRIDGE" up; }
bg containerd containerd --config "$R/containerd/config.toml"
bg etcd etcd --name medmerge-node --data-dir "$R/etcd" \
  --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster medmerge-node=http://127.0.0.1:2380 --listen-metrics-urls http://127.0.0.1:2381
wait_for etcd 60 curl -sf http://127.0.0.1:2379/health
bg kube-apiserver "$(bin kube-apiserver)" --etcd-servers=http://127.0.0.1:2379 \
  --bind-address="$IP" --secure-port=6443 --insecure-port=0 --advertise-address="$IP" \
  --tls-cert-file="$P/apiserver.crt" --tls-private-key-file="$P/apiserver.key" --client-ca-file="$P/ca.crt" \
  --token-auth-file="$P/tokens.csv" --authorization-mode=Node,RBAC \
  --enable-admission-plugins=NamespaceLifecycle,ServiceAccount,NodeRestriction,LimitRanger,ResourceQuota,DefaultStorageClass,Priority \
  --service-account-key-file="$P/sa.pub" --service-account-signing-key-file="$P/sa.key" \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local --service-cluster-ip-range=10.0.0.0/24 \
  --kubelet-client-certificate="$P/apiserver-kubelet-client.crt" --kubelet-client-key="$P/apiserver-kubelet-client.key" \
  --kubelet-certificate-authority="$P/ca.crt" --kubelet-preferred-address-types=InternalIP \
  --allow-privileged=false --profiling=false --cert-dir="$R/apiserver" --feature-gates=TTLAfterFinished=true --v=1
wait_for kube-apiserver 120 curl -sf --cacert "$P/ca.crt" "https://$IP:6443/readyz"
bg kube-controller-manager "$(bin kube-controller-manager)" --kubeconfig="$P/controller-manager.kubeconfig" \
  --authentication-kubeconfig="$P/controller-manager.kubeconfig" --authorization-kubeconfig="$P/controller-manager.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port=10257 --port=0 --cert-dir="$R/kcm" \
  --controllers='*' --use-service-account-credentials=true \
  --service-account-private-key-file="$P/sa.key" --root-ca-file="$P/ca.crt" \
  --cluster-signing-cert-file="$P/ca.crt" --cluster-signing-key-file="$P/ca.key" \
  --leader-elect=false --feature-gates=TTLAfterFinished=true --profiling=false --v=1
bg kube-scheduler "$(bin kube-scheduler)" --kubeconfig="$P/scheduler.kubeconfig" \
  --authentication-kubeconfig="$P/scheduler.kubeconfig" --authorization-kubeconfig="$P/scheduler.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port=10259 --port=0 --cert-dir="$R/sched" --leader-elect=false --profiling=false --v=1
wait_for containerd 60 ctr -a "$SOCK" version
python3 "$here/../images/pause.py" "$R/pause.tar"
ctr -a "$SOCK" -n k8s.io images import "$R/pause.tar" >/dev/null
bg kubelet env AWS_EC2_METADATA_DISABLED=true "$(bin kubelet)" \
  --config="$R/kubelet/config.yaml" --kubeconfig="$P/kubelet.kubeconfig" \
  --container-runtime=remote --container-runtime-endpoint="unix://$SOCK" --image-service-endpoint="unix://$SOCK" \
  --root-dir="$R/kubelet/root" --cert-dir="$R/kubelet/pki" --feature-gates=TTLAfterFinished=true \
  --hostname-override="$NODE" --node-ip="$IP" --register-node=true --pod-infra-container-image=localhost/pause:3.2 --v=1
export KUBECONFIG="$P/admin.kubeconfig" MEDMERGE_NODE_IP="$IP" MEDMERGE_NODE_DIR="$R" MEDMERGE_NODE_NAME="$NODE"
node_ready() { kubectl get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' | grep -q True; }
wait_for "node $NODE Ready" 120 node_ready
sa_token() { [ -n "$(kubectl -n default get sa default -o jsonpath='{.secrets[0].name}')" ]; }
wait_for "ServiceAccount tokens" 60 sa_token
echo "with-node: node $NODE Ready in $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s (Kubernetes $("$(bin kubelet)" --version | awk '{print $2}'), containerd $(containerd --version | awk '{print $3}'))" >&2
"$@"
