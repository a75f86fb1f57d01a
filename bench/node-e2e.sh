#!/usr/bin/env bash
# A small MergeJob on the real single-node Kubernetes (scripts/with-node.sh: kubelet +
# containerd, every stage a pod from the project's trainer image, the operator in its pod from
# its image, S3 on the node's bridge). Measures: image import and operator install, seconds from
# `kubectl apply` to Succeeded (RUNS times, default 3), each stage pod's start latency (Job
# created -> container started), and the operator pod's RSS. Writes bench/results/node-e2e.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${MEDMERGE_NODE_DIR:-}" ]; then exec bash scripts/with-node.sh bash scripts/with-s3.sh bash "$0" "$@"; fi
source scripts/env.sh
t0=$(date +%s.%N)
bash scripts/install-on-node.sh >/dev/null
install_s=$(python3 -c "print(round($(date +%s.%N) - $t0, 1))")
T="$CARGO_TARGET_DIR/debug/medmerge-trainer"
work="$MEDMERGE_NODE_DIR/bench"
"$T" synth --out "$work/images" --classes 3 --per-class 40 --size 64 >/dev/null
"$T" split --data "$work/images" --out "$work/split" --shards 3 --test-fraction 0.25 --seed 7 >/dev/null
python3 - "$work" <<'PY'
import os, shutil, sys
work = sys.argv[1]
for part in ["shard-1", "shard-2", "shard-3", "test"]:
    for line in open(f"{work}/split/{part}.csv").read().splitlines()[1:]:
        path, label = line.rsplit(",", 1)
        os.makedirs(f"{work}/volumes/{part}/{label}", exist_ok=True)
        shutil.copy(path, f"{work}/volumes/{part}/{label}/")
PY
kubectl create namespace bench >/dev/null
until kubectl -n bench get sa default -o jsonpath='{.secrets[0].name}' 2>/dev/null | grep -q .; do sleep 0.3; done
kubectl -n bench create secret generic bucket --from-literal=AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" --from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" >/dev/null
curl -sf --aws-sigv4 "aws:amz:us-east-1:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" -X PUT "$MEDMERGE_S3_ENDPOINT/medmerge-bench" >/dev/null
mergejob() { # name
  cat <<YAML
apiVersion: medmerge.io/v1alpha1
kind: MergeJob
metadata: {name: $1, namespace: bench}
spec:
  model: {architecture: resnet18, weights: random, imageSize: 64, classes: [disc, square, stripes]}
  shards:
    - {name: a, data: {path: ., volume: {hostPath: {path: $work/volumes/shard-1}}}}
    - {name: b, data: {path: ., volume: {hostPath: {path: $work/volumes/shard-2}}}}
    - {name: c, data: {path: ., volume: {hostPath: {path: $work/volumes/shard-3}}}}
  training: {epochs: 2, batchSize: 16, learningRate: 0.001}
  merge: {baselines: []}
  restore: {mode: bnRecalibrate}
  evaluation: {data: {path: ., volume: {hostPath: {path: $work/volumes/test}}}, explainImages: 0}
  storage: {s3: {bucket: medmerge-bench, endpoint: "$MEDMERGE_S3_ENDPOINT", credentialsSecret: bucket}}
  cluster: {image: localhost/medmerge/trainer:dev-cpu, imagePullPolicy: Never}
YAML
}
runs=()
for i in $(seq 1 "${RUNS:-3}"); do
  s=$(date +%s.%N)
  mergejob "run-$i" | kubectl apply -f - >/dev/null
  until phase=$(kubectl -n bench get mj "run-$i" -o jsonpath='{.status.phase}') && [[ "$phase" =~ ^(Succeeded|Failed)$ ]]; do sleep 0.2; done
  [ "$phase" = Succeeded ] || { kubectl -n bench get mj "run-$i" -o yaml >&2; exit 1; }
  runs+=("$(python3 -c "print(round($(date +%s.%N) - $s, 1))")")
done
kubectl -n bench get pods -o json > "$work/pods.json"
kubectl -n bench get jobs -o json > "$work/jobs.json"
pod=$(kubectl -n medmerge get pods -l app.kubernetes.io/name=medmerge-operator -o jsonpath='{.items[0].status.containerStatuses[0].containerID}')
pid=$(ctr -a "$MEDMERGE_NODE_DIR/run/containerd.sock" -n k8s.io tasks ls | awk -v id="${pod#containerd://}" '$1 == id {print $2}')
rss=$(awk '/VmRSS/{print $2}' "/proc/$pid/status"); hwm=$(awk '/VmHWM/{print $2}' "/proc/$pid/status")
python3 - "$work" "$install_s" "$rss" "$hwm" "${runs[@]}" > bench/results/node-e2e.md <<'PY'
import json, os, statistics, sys, time
from datetime import datetime
work, install_s, rss, hwm, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), [float(r) for r in sys.argv[5:]]
ts = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
jobs = {j["metadata"]["name"]: ts(j["metadata"]["creationTimestamp"]) for j in json.load(open(f"{work}/jobs.json"))["items"]}
lat = []
for p in json.load(open(f"{work}/pods.json"))["items"]:
    job = p["metadata"]["labels"].get("job-name")
    st = (p["status"].get("containerStatuses") or [{}])[0].get("state", {})
    started = (st.get("terminated") or st.get("running") or {}).get("startedAt")
    if job in jobs and started:
        lat.append(ts(started) - jobs[job])
lat.sort()
q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))]
print("# A MergeJob on a real node: apply to Succeeded, pod start latency, operator RSS\n")
print(f"Command: `bash bench/node-e2e.sh` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores shared by the control plane, "
      "the kubelet, containerd, the operator pod and every stage pod). Single node from scripts/with-node.sh (Kubernetes 1.20.2 "
      "built from Debian's source, containerd 1.6, runc, CNI bridge); the operator and trainer images assembled from "
      "images/*.Dockerfile by scripts/build-images.sh; S3 on the node's bridge (SeaweedFS).\n")
print("MergeJob: 3 hospitals (ResNet-18, random init, 64 px, 2 epochs, 30 images each, hostPath volumes), "
      "data-vector merge, BN recalibration per hospital, evaluation on 30 held-out images; S3 storage. "
      "Stage pods: init, 3 x finetune, merge, 3 x restore, restore-combine, evaluate (10 per run).\n")
print("| measure | value |\n|---|---|")
print(f"| image import + `helm install` to operator Ready (cached tarballs) | {install_s} s |")
print(f"| `kubectl apply` -> Succeeded, {len(runs)} runs | {' / '.join(f'{r:.1f}' for r in runs)} s (median {statistics.median(runs):.1f} s) |")
print(f"| stage pod start latency (Job created -> container started), {len(lat)} pods | p50 {q(0.5):.2f} s, p90 {q(0.9):.2f} s, max {lat[-1]:.2f} s |")
print(f"| operator pod RSS after the runs (peak) | {rss // 1024} MiB ({hwm // 1024} MiB) |")
PY
cat bench/results/node-e2e.md
