#!/usr/bin/env bash
# The trainer's allocator settings (trainer/src/allocator.rs) on and off: ResNet50 fine-tuning at
# 128 px, batch 32, 3 epochs over IMAGES fundus photographs, 2 threads; PAIRS alternating pairs.
# "glibc defaults" sets GLIBC_TUNABLES to a no-op (glibc.malloc.perturb=0, its default), which,
# like any allocator variable a user sets, makes the trainer leave the allocator as glibc sets it
# up. (Not a MALLOC_*_ variable: setting any of those also turns off glibc's own rising mmap
# threshold, which is slower still.) Reports the best
# warm epoch's images/s and the run's minor page faults (GNU time). Writes bench/results/allocator.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
DATA="$(cd "${DATA:-../shared/data/eye-fundus}" && pwd)"
IMAGES="${IMAGES:-128}"; PAIRS="${PAIRS:-3}"
WORK="$MEDMERGE_CACHE/bench-allocator"
T="$CARGO_TARGET_DIR/debug/medmerge-trainer"
mkdir -p "$WORK" bench/results
cargo build -q --workspace --bins
"$T" split --data "$DATA" --out "$WORK/split" --shards 1 --test-fraction 0 --seed 3315 >/dev/null
python3 - "$WORK/split/shard-1.csv" "$IMAGES" > "$WORK/images.csv" <<'PY'
import random, sys
header, *rows = open(sys.argv[1]).read().splitlines()
random.Random(3315).shuffle(rows)
print("\n".join([header] + rows[: int(sys.argv[2])]))
PY
[ -f "$WORK/base.safetensors" ] || "$T" init --arch resnet50 --weights random --data "$WORK/images.csv" --image-size 128 --out "$WORK/base.safetensors" >/dev/null
run() { # env... -> "images/s faults"
  env "$@" /usr/bin/time -f "faults %R" -o "$WORK/time.txt" "$T" --threads 2 --log-format json finetune --base "$WORK/base.safetensors" \
    --data "$WORK/images.csv" --shard bench --out "$WORK/vector.safetensors" --epochs 3 --batch-size 32 2>&1 |
    python3 -c 'import sys, json; print(max([json.loads(l)["fields"]["images_per_second"] for l in sys.stdin if "epoch done" in l][1:]))' | tr '\n' ' '
  awk '/faults/ {print $2}' "$WORK/time.txt"
}
rows=""
for k in $(seq 1 "$PAIRS"); do
  rows+="| $k | $(run GLIBC_TUNABLES=glibc.malloc.perturb=0 | awk '{printf "%.1f | %d", $1, $2}') | $(run A=1 | awk '{printf "%.1f | %d", $1, $2}') |"$'\n'
done
{
  echo "# The trainer's allocator settings: on and off"
  echo
  echo "Command: \`bash bench/allocator.sh\` (IMAGES=$IMAGES PAIRS=$PAIRS). $(nproc) CPU cores, $(date -u +%Y-%m-%d)."
  echo "ResNet50 fine-tuning, 128 px, batch 32, 3 epochs, 2 threads; images/s of the best warm epoch (2-3), minor page faults of the whole run."
  echo "*glibc defaults*: \`GLIBC_TUNABLES=glibc.malloc.perturb=0\` (a no-op: glibc's own value), which makes the trainer leave the allocator as glibc sets it up."
  echo
  echo "| pair | glibc defaults: images/s | glibc defaults: page faults | medmerge's settings: images/s | medmerge's settings: page faults |"
  echo "|---|---|---|---|---|"
  printf "%s" "$rows"
} | tee bench/results/allocator.md
