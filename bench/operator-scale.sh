#!/usr/bin/env bash
# Operator scale: MERGEJOBS (default 1000) MergeJobs x SHARDS (default 8) against a real kube-apiserver +
# etcd (scripts/with-apiserver.sh), the operator binary running as the Helm chart's
# ServiceAccount; the driver (operator/examples/operator_scale.rs) completes init and finetune
# Jobs as they appear. Reports operator peak RSS, reconciles/s and p50/p99 latency from a
# MergeJob's last finetune Job completing to its status showing all shards ready, under the
# burst and in steady state (STEADY, default 20, MergeJobs one at a time afterwards).
# CONCURRENCY sets the operator's --concurrency (default 8, the operator's own default).
# Failed reconciles (retried) are counted and their causes listed. LOGS=dir keeps the operator's,
# the API server's and etcd's logs there (RUST_LOG sets the operator's log filter). Writes bench/results/operator-scale.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${MEDMERGE_E2E_SA_TOKEN:-}" ]; then exec bash scripts/with-apiserver.sh bash "$0" "$@"; fi
source scripts/env.sh
source scripts/lib.sh
N="${MERGEJOBS:-1000}"; SHARDS="${SHARDS:-8}"
kubectl apply --server-side -f crds/mergejob.yaml >/dev/null
bash scripts/wait-for-crd.sh >/dev/null
sa_kubeconfig="$(bash scripts/install-chart.sh 2>/dev/null)"
cargo build -q --workspace --bins --examples
port="$(free_port)"
log="$(mktemp)"
KUBECONFIG="$sa_kubeconfig" "$CARGO_TARGET_DIR/debug/medmerge-operator" --metrics-addr "127.0.0.1:$port" \
  --lease-namespace medmerge --identity bench --log-json --concurrency "${CONCURRENCY:-8}" >"$log" 2>&1 &
operator=$!
stop_on_exit "$operator"
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.2; done
result="$(MERGEJOBS="$N" SHARDS="$SHARDS" METRICS_ADDR="127.0.0.1:$port" "$CARGO_TARGET_DIR/debug/examples/operator_scale")"
echo "$result" >&2
cpu="$(awk '{printf "%.1f", ($14 + $15) / 100}' "/proc/$operator/stat")"
hwm="$(awk '/VmHWM/{print $2}' "/proc/$operator/status")"
rss="$(awk '/VmRSS/{print $2}' "/proc/$operator/status")"
errors="$(grep -c '"level":"ERROR"' "$log" || true)"
if [ -n "${LOGS:-}" ]; then  # keeps the operator's, the API server's and etcd's logs for a closer look
  mkdir -p "$LOGS" && cp "$log" "$LOGS/operator.log" && cp "$(dirname "$KUBECONFIG")"/{apiserver,etcd}.log "$LOGS/"
fi
python3 - "$result" "$hwm" "$rss" "$errors" "$N" "${CONCURRENCY:-8}" "$log" "$cpu" > bench/results/operator-scale.md <<'PY'
import collections, json, sys, os, time
r = json.loads(sys.argv[1])
hwm, rss, errors, n, concurrency = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
failed = collections.Counter()
for line in open(sys.argv[7]):
    if "reconcile failed" in line or "changing Jobs failed" in line:
        fields = json.loads(line).get("fields", {})
        failed[fields.get("error", "?")[:160]] += 1
shards = r["shards"]
burst = r["burst_reconciles"]
l = r["latency_ms"]
print(f"# Operator scale: MergeJobs x {shards} shards against a real kube-apiserver\n")
print(f"Command: `bash bench/operator-scale.sh` (MERGEJOBS={n} SHARDS={shards}, operator --concurrency {concurrency}; {os.cpu_count()} CPU cores shared by etcd, kube-apiserver 1.20, "
      f"the operator and the driver; {time.strftime('%Y-%m-%d')}). The operator binary runs as the chart's ServiceAccount; "
      "the driver completes each `init` and `finetune-*` Job as soon as it appears (watch) and times, per MergeJob, "
      f"its last finetune Job turning complete to its status showing {shards}/{shards} shards ready: for the {n} created at once (burst, the API server "
      f"saturated), and for {r['steady_latency_ms']['count']} created one at a time afterwards (steady state).\n")
print("| measure | value |\n|---|---|")
print(f"| MergeJobs / shards | {r['mergejobs']} / {shards * r['mergejobs']} |")
print(f"| MergeJobs that reached {shards}/{shards} ready | {r['ready']} |")
print(f"| time to create them | {r['create_seconds']:.1f} s |")
print(f"| time until all showed {shards}/{shards} ready | {r['all_ready_seconds']:.1f} s |")
print(f"| reconciles during the burst | {burst:.0f} ({burst / r['all_ready_seconds']:.1f} /s) |")
print(f"| burst: Job complete -> status latency p50 / p99 / max | {l['p50']:.0f} / {l['p99']:.0f} / {l['max']:.0f} ms |")
s = r["steady_latency_ms"]
print(f"| steady state: latency p50 / p99 / max | {s['p50']:.0f} / {s['p99']:.0f} / {s['max']:.0f} ms |")
for when in ("burst", "steady"):
    w = r[f"{when}_watch_lag_ms"]
    if w["count"]:
        print(f"| {when}: API server watch lag, driver's own Job watch (patch returned -> Job seen complete) p50 / p99 / max | {w['p50']:.0f} / {w['p99']:.0f} / {w['max']:.0f} ms |")
print(f"| operator peak RSS (VmHWM) | {hwm / 1024:.0f} MiB (now {rss / 1024:.0f} MiB) |")
print(f"| operator CPU time (user + system, whole run) | {sys.argv[8]} s |")
print(f"| operator ERROR log lines | {errors} |")
print(f"| failed reconciles (retried) | {sum(failed.values())} |")
for cause, count in failed.most_common(5):
    print(f"| - {count} x | {cause} |")
print(f"\nSlowest in the burst: {', '.join(l['slowest'])}.")
PY
cat bench/results/operator-scale.md
