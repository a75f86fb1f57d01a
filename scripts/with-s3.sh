#!/usr/bin/env bash
# Runs a command against a real, throwaway S3 server (SeaweedFS `weed mini`, loopback only).
# Exports for the command: MEDMERGE_S3_ENDPOINT, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (an
# admin identity), MEDMERGE_S3_SHARD_A_KEY / _SECRET (may only read and write `shard-a/` in
# bucket `medmerge-test`), MEDMERGE_S3_HOSPITAL_KEY / _SECRET (a hospital's bucket identity: may
# read bucket `medmerge-isolation` but write only its shard's prefix of one run,
# `runs/local/tiny/g1/shards/h0/`), MEDMERGE_S3_PID (to stop the server in failure tests).
# Listens on loopback, or on the test node's bridge address when run inside scripts/with-node.sh
# (MEDMERGE_NODE_IP), so that pods reach it.
# Usage: scripts/with-s3.sh <command> [args...]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
weed="$("$here/setup-s3.sh")"
work="$(mktemp -d -t medmerge-s3.XXXXXX)"
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Four free ports whose gRPC companions (port + 10000) are free too.
read -r master volume filer s3 < <(python3 - <<'PY'
import random, socket
import os
host = os.environ.get("MEDMERGE_NODE_IP", "127.0.0.1")
def free(p):
    s = socket.socket()
    try:
        s.bind((host, p)); return True
    except OSError:
        return False
    finally:
        s.close()
ports = []
while len(ports) < 4:
    p = random.randint(20000, 29999)
    if p not in ports and free(p) and free(p + 10000):
        ports.append(p)
print(*ports)
PY
)

admin_key="admin$(openssl rand -hex 6)"; admin_secret="$(openssl rand -hex 16)"
shard_key="sharda$(openssl rand -hex 6)"; shard_secret="$(openssl rand -hex 16)"
hospital_key="hospital$(openssl rand -hex 6)"; hospital_secret="$(openssl rand -hex 16)"
cat > "$work/s3.json" <<JSON
{"identities": [
  {"name": "admin", "credentials": [{"accessKey": "$admin_key", "secretKey": "$admin_secret"}],
   "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
  {"name": "shard-a", "credentials": [{"accessKey": "$shard_key", "secretKey": "$shard_secret"}],
   "actions": ["Read:medmerge-test/shard-a/*", "Write:medmerge-test/shard-a/*", "List:medmerge-test/shard-a/*"]},
  {"name": "hospital-h0", "credentials": [{"accessKey": "$hospital_key", "secretKey": "$hospital_secret"}],
   "actions": ["Read:medmerge-isolation", "List:medmerge-isolation", "Write:medmerge-isolation/runs/local/tiny/g1/shards/h0/*"]}
]}
JSON
host="${MEDMERGE_NODE_IP:-127.0.0.1}"
mkdir -p "$work/data"
"$weed" mini -dir="$work/data" -ip="$host" -ip.bind="$host" -master.port="$master" -volume.port="$volume" \
  -filer.port="$filer" -s3.port="$s3" -s3.config="$work/s3.json" -webdav=false -admin.ui=false \
  -s3.port.iceberg=0 -s3.port.lance=0 >"$work/weed.log" 2>&1 &
pid=$!
for _ in $(seq 1 120); do
  curl -s -o /dev/null "http://$host:$s3/" && break
  sleep 0.5
done
if ! curl -s -o /dev/null "http://$host:$s3/"; then
  echo "with-s3: the S3 server did not come up; its log:" >&2; tail -n 30 "$work/weed.log" >&2; exit 1
fi
echo "with-s3: SeaweedFS $("$weed" version 2>/dev/null | head -n1 | awk '{print $3}') S3 on $host:$s3" >&2
export MEDMERGE_S3_ENDPOINT="http://$host:$s3" AWS_ACCESS_KEY_ID="$admin_key" AWS_SECRET_ACCESS_KEY="$admin_secret"
export AWS_REGION=us-east-1 MEDMERGE_S3_SHARD_A_KEY="$shard_key" MEDMERGE_S3_SHARD_A_SECRET="$shard_secret" MEDMERGE_S3_PID="$pid"
export MEDMERGE_S3_HOSPITAL_KEY="$hospital_key" MEDMERGE_S3_HOSPITAL_SECRET="$hospital_secret"
"$@"
