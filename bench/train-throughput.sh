#!/usr/bin/env bash
# Training throughput: `medmerge-trainer finetune` against the PyTorch eager reference
# (bench/train_reference.py) doing the same work on the same images: EfficientNet-Lite0 and
# ResNet50 at SIZE px, batch 32, random flips, JPEG decoding from disk, class-weighted
# cross-entropy, Adam, THREADS threads, over IMAGES images of ../shared/data/eye-fundus.
# This machine is shared and drifts by +-10 % between runs, so the three contenders run
# interleaved, REPEATS times each, 3 epochs per run, and each reports its best warm epoch (2-3).
# Writes bench/results/train-throughput.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
DATA="${DATA:-../shared/data/eye-fundus}"
DATA="$(cd "$DATA" && pwd)"
SIZE="${SIZE:-128}"; IMAGES="${IMAGES:-256}"; THREADS="${THREADS:-2}"; REPEATS="${REPEATS:-2}"; BATCH=32
WORK="$MEDMERGE_CACHE/bench-throughput"
T="$CARGO_TARGET_DIR/debug/medmerge-trainer"
mkdir -p "$WORK" bench/results
# The dev profile builds dependencies (libtorch bindings, image decoders) at opt-level 3.
cargo build -q --workspace --bins
"$MEDMERGE_CACHE/venv/bin/python" -c "import PIL, torchvision" 2>/dev/null || "$MEDMERGE_CACHE/venv/bin/pip" install -q "torch==$(python3 -c 'import torch; print(torch.__version__.split("+")[0])')" torchvision pillow
# The same IMAGES images for both, stratified and shuffled by the trainer's split.
"$T" split --data "$DATA" --out "$WORK/split" --shards 1 --test-fraction 0 --seed 3315 >/dev/null
head -n $((IMAGES + 1)) "$WORK/split/shard-1.csv" > "$WORK/images.csv"

medmerge() { # arch weights -> images/s of the best warm epoch
  local base="$WORK/base-$1.safetensors"
  [ -f "$base" ] || "$T" init --arch "$1" --weights "$2" --data "$WORK/images.csv" --image-size "$SIZE" --out "$base" >/dev/null
  "$T" --log-format json --threads "$THREADS" finetune --base "$base" --data "$WORK/images.csv" --shard bench \
    --out "$WORK/vector-$1.safetensors" --epochs 3 --batch-size "$BATCH" 2>&1 |
    python3 -c 'import sys, json; print(max([json.loads(l)["fields"]["images_per_second"] for l in sys.stdin if "epoch done" in l][1:]))'
}
reference() { # arch workers -> images/s of the best warm epoch
  "$MEDMERGE_CACHE/venv/bin/python" bench/train_reference.py "$WORK/images.csv" "$1" "$SIZE" "$BATCH" 3 "$THREADS" "$2" |
    python3 -c 'import sys, json; print(max([json.loads(l)["images_per_second"] for l in sys.stdin][1:]))'
}
best() { python3 -c "import sys; print(max(map(float, sys.argv[1:])))" "$@"; }

{
  echo "# Training throughput: medmerge vs PyTorch eager"
  echo
  echo "Command: \`bash bench/train-throughput.sh\` (SIZE=$SIZE IMAGES=$IMAGES THREADS=$THREADS). $(nproc) CPU cores, $(date -u +%Y-%m-%d)."
  echo "Same $IMAGES fundus photographs (JPEG decoded from disk every epoch), ${SIZE} px, batch $BATCH, random"
  echo "horizontal+vertical flips, class-weighted cross-entropy, Adam 1e-4, $THREADS intra-op threads;"
  echo "best warm epoch (2 or 3) of $REPEATS interleaved runs each. Reference: bench/train_reference.py (torch $("$MEDMERGE_CACHE/venv/bin/python" -c 'import torch; print(torch.__version__)'),"
  echo "DataLoader with 0 workers = decoding in the training process, 2 workers = decoding in parallel processes)."
  echo
  echo "| model | medmerge (img/s) | PyTorch, 0 workers | PyTorch, 2 workers | ratio vs best PyTorch |"
  echo "|---|---|---|---|---|"
  for spec in "efficientnet-lite0 imagenet" "resnet50 random"; do
    set -- $spec
    ms=(); r0s=(); r2s=()
    for _ in $(seq 1 "$REPEATS"); do
      ms+=("$(medmerge "$1" "$2")"); r0s+=("$(reference "$1" 0)"); r2s+=("$(reference "$1" 2)")
    done
    m="$(best "${ms[@]}")"; r0="$(best "${r0s[@]}")"; r2="$(best "${r2s[@]}")"
    python3 -c "m, a, b = $m, $r0, $r2; print(f'| $1 | {m:.1f} | {a:.1f} | {b:.1f} | {m / max(a, b):.2f}x |')"
  done
} | tee bench/results/train-throughput.md
