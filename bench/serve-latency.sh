#!/usr/bin/env bash
# Serving latency and throughput on CPU: `medmerge-trainer serve` with EfficientNet-Lite0
# (ImageNet weights) at SIZE px, answering Open Inference Protocol (v2) requests of one JPEG
# each (base64 BYTES) from ../shared/data/eye-fundus over loopback HTTP: REQUESTS requests one
# at a time (latency), then the same requests from CONCURRENCY clients at once (throughput;
# requests that arrive together share a forward pass). Writes bench/results/serve-latency.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
source scripts/lib.sh
DATA="$(cd "${DATA:-../shared/data/eye-fundus}" && pwd)"
SIZE="${SIZE:-224}"; REQUESTS="${REQUESTS:-200}"; CONCURRENCY="${CONCURRENCY:-8}"; THREADS="${THREADS:-2}"
WORK="$MEDMERGE_CACHE/bench-serve"
T="${MEDMERGE_TRAINER:-$CARGO_TARGET_DIR/debug/medmerge-trainer}"
mkdir -p "$WORK" bench/results
[ -n "${MEDMERGE_TRAINER:-}" ] || cargo build -q --workspace --bins
model="$WORK/lite0-$SIZE.safetensors"
[ -f "$model" ] || "$T" init --data "$DATA" --image-size "$SIZE" --out "$model" >/dev/null
port=$(free_port)
log="$WORK/serve.log"
"$T" --threads "$THREADS" serve --model "$model" --name fundus --listen "127.0.0.1:$port" > "$log" 2>&1 &
stop_on_exit $!
EVENTUALLY_SECONDS=60 eventually "the server on port $port" curl -sf "http://127.0.0.1:$port/v2/health/ready"
python3 - "$port" "$DATA" "$REQUESTS" "$CONCURRENCY" "$SIZE" "$THREADS" <<'PY'
import base64, json, os, pathlib, statistics, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
port, data, n, clients, size, threads = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
images = sorted(data.rglob("*.jpg"))[:n]
url = f"http://127.0.0.1:{port}/v2/models/fundus/infer"
bodies = [json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(p.read_bytes()).decode()]}]}).encode() for p in images]
def call(body):
    t = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url, body, {"Content-Type": "application/json"})) as r:
        assert r.status == 200 and json.load(r)["outputs"][1]["data"]
    return time.perf_counter() - t
load = os.getloadavg()[0]
call(bodies[0])  # warm-up
def run(k):
    t = time.perf_counter()
    with ThreadPoolExecutor(k) as pool:
        lat = list(pool.map(call, bodies))
    return sorted(lat), time.perf_counter() - t
rows = []
for k in (1, clients):
    lat, wall = run(k)
    q = lambda p: 1000 * lat[min(len(lat) - 1, int(p * len(lat)))]
    rows.append(f"| {k} | {len(lat)} | {q(0.5):.1f} | {q(0.99):.1f} | {len(lat) / wall:.1f} |")
metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
batches = [l for l in metrics.splitlines() if l.startswith("medmerge_serve_batches_total")]
out = pathlib.Path("bench/results/serve-latency.md")
out.write_text("\n".join([
    "# Serving latency and throughput (CPU)", "",
    f"Command: `SIZE={size} REQUESTS={n} CONCURRENCY={clients} THREADS={threads} bash bench/serve-latency.sh` "
    f"({time.strftime('%Y-%m-%d')}, this 2-core machine, libtorch threads {threads}).", "",
    f"`medmerge-trainer serve`, EfficientNet-Lite0 at {size} px, one eye-fundus JPEG per request as base64 BYTES "
    "(decode, resize and normalise in the server), JSON over loopback HTTP/1.1; the Python client's own time is included.", "",
    f"Load average when the run started: {load:.2f} (2 cores; anything above ~0.5 means other work shared the CPU).", "",
    "| clients | requests | p50 ms | p99 ms | requests/s |", "|---|---|---|---|---|", *rows, "",
    f"Forward passes over both runs and the warm-up ({2 * n + 1} requests): `{batches[0] if batches else 'n/a'}` "
    "(fewer passes than requests: concurrent requests were batched).", ""]))
print(out.read_text())
PY
