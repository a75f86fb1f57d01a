#!/usr/bin/env bash
# Operator scale: MERGEJOBS (default 500) MergeJobs x 4 shards against a real kube-apiserver +
# etcd (scripts/with-apiserver.sh), the operator binary running as the Helm chart's
# ServiceAccount; the driver (operator/examples/operator_scale.rs) completes init and finetune
# Jobs as they appear. Reports operator peak RSS, reconciles/s and p50/p99 latency from a
# MergeJob's last finetune Job completing to its status showing 4/4 shards ready.
# Writes bench/results/operator-scale.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${MEDMERGE_E2E_SA_TOKEN:-}" ]; then exec bash scripts/with-apiserver.sh bash "$0" "$@"; fi
source scripts/env.sh
N="${MERGEJOBS:-500}"
kubectl apply -f crds/mergejob.yaml >/dev/null
kubectl wait --for condition=established --timeout=60s crd/mergejobs.medmerge.io >/dev/null
sa_kubeconfig="$(bash scripts/install-chart.sh 2>/dev/null)"
cargo build -q --workspace --bins --examples
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
log="$(mktemp)"
KUBECONFIG="$sa_kubeconfig" "$CARGO_TARGET_DIR/debug/medmerge-operator" --metrics-addr "127.0.0.1:$port" \
  --lease-namespace medmerge --identity bench --log-json >"$log" 2>&1 &
operator=$!
trap 'kill $operator 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.2; done
reconciles() { curl -sf "http://127.0.0.1:$port/metrics" | awk '/^medmerge_reconciles_total /{print $2}'; }
before="$(reconciles)"
result="$(MERGEJOBS="$N" "$CARGO_TARGET_DIR/debug/examples/operator_scale")"
after="$(reconciles)"
hwm="$(awk '/VmHWM/{print $2}' "/proc/$operator/status")"
rss="$(awk '/VmRSS/{print $2}' "/proc/$operator/status")"
errors="$(grep -c '"level":"ERROR"' "$log" || true)"
python3 - "$result" "$before" "$after" "$hwm" "$rss" "$errors" "$N" > bench/results/operator-scale.md <<'PY'
import json, sys, os, time
r = json.loads(sys.argv[1]); before, after = float(sys.argv[2]), float(sys.argv[3])
hwm, rss, errors, n = int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], sys.argv[7]
l = r["latency_ms"]
print("# Operator scale: MergeJobs x 4 shards against a real kube-apiserver\n")
print(f"Command: `bash bench/operator-scale.sh` (MERGEJOBS={n}; {os.cpu_count()} CPU cores shared by etcd, kube-apiserver 1.20, "
      f"the operator and the driver; {time.strftime('%Y-%m-%d')}). The operator binary runs as the chart's ServiceAccount; "
      "the driver completes each `init` and `finetune-*` Job as soon as it appears (watch) and times, per MergeJob, "
      "its last finetune Job turning complete to its status showing 4/4 shards ready.\n")
print("| measure | value |\n|---|---|")
print(f"| MergeJobs / shards | {r['mergejobs']} / {4 * r['mergejobs']} |")
print(f"| MergeJobs that reached 4/4 ready | {r['ready']} |")
print(f"| time to create them | {r['create_seconds']:.1f} s |")
print(f"| time until all showed 4/4 ready | {r['all_ready_seconds']:.1f} s |")
print(f"| reconciles | {after - before:.0f} ({(after - before) / r['all_ready_seconds']:.1f} /s) |")
print(f"| Job complete -> status latency p50 | {l['p50']:.0f} ms |")
print(f"| Job complete -> status latency p99 | {l['p99']:.0f} ms |")
print(f"| latency max | {l['max']:.0f} ms |")
print(f"| operator peak RSS (VmHWM) | {hwm / 1024:.0f} MiB (now {rss / 1024:.0f} MiB) |")
print(f"| operator ERROR log lines | {errors} |")
PY
cat bench/results/operator-scale.md
