#!/usr/bin/env bash
# Training throughput: `medmerge-trainer finetune` against the PyTorch eager reference
# (bench/train_reference.py) doing the same work on the same images: EfficientNet-Lite0 and
# ResNet50 at SIZE px, batch 32, random flips, class-weighted cross-entropy, Adam, THREADS
# threads, over IMAGES images of ../shared/data/eye-fundus. medmerge runs as shipped (decoded-image
# store, channels-last); PyTorch in three configurations: NCHW with decoding in the training
# process, channels-last likewise, and channels-last with 2 DataLoader worker processes
# (persistent), and the best of them is the baseline. This machine is shared and drifts by +-10 %
# between runs, so the contenders run interleaved, REPEATS times each, 3 epochs per run, and each
# reports its best warm epoch (2-3). Writes bench/results/train-throughput.md.
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
# The same IMAGES images for both: the trainer's manifest of the set (sorted by path), shuffled
# with a fixed seed so every class is in the sample.
"$T" split --data "$DATA" --out "$WORK/split" --shards 1 --test-fraction 0 --seed 3315 >/dev/null
python3 - "$WORK/split/shard-1.csv" "$IMAGES" > "$WORK/images.csv" <<'PY'
import random, sys
header, *rows = open(sys.argv[1]).read().splitlines()
random.Random(3315).shuffle(rows)
print("\n".join([header] + rows[: int(sys.argv[2])]))
PY

medmerge() { # arch weights -> images/s of the best warm epoch
  local base="$WORK/base-$1.safetensors"
  [ -f "$base" ] || "$T" init --arch "$1" --weights "$2" --data "$WORK/images.csv" --image-size "$SIZE" --out "$base" >/dev/null
  "$T" --log-format json --threads "$THREADS" finetune --base "$base" --data "$WORK/images.csv" --shard bench \
    --out "$WORK/vector-$1.safetensors" --epochs 3 --batch-size "$BATCH" 2>&1 |
    python3 -c 'import sys, json; print(max([json.loads(l)["fields"]["images_per_second"] for l in sys.stdin if "epoch done" in l][1:]))'
}
# The C allocator settings medmerge-trainer starts with (trainer/src/allocator.rs), for PyTorch.
MALLOC_AS_MEDMERGE=(MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647 MALLOC_TOP_PAD_=268435456)
reference() { # arch workers layout [env...] -> images/s of the best warm epoch
  local arch="$1" workers="$2" layout="$3"; shift 3
  env "$@" "$MEDMERGE_CACHE/venv/bin/python" bench/train_reference.py "$WORK/images.csv" "$arch" "$SIZE" "$BATCH" 3 "$THREADS" "$workers" "$layout" |
    python3 -c 'import sys, json; print(max([json.loads(l)["images_per_second"] for l in sys.stdin][1:]))'
}
best() { python3 -c "import sys; print(max(map(float, sys.argv[1:])))" "$@"; }

{
  echo "# Training throughput: medmerge vs PyTorch eager"
  echo
  echo "Command: \`bash bench/train-throughput.sh\` (SIZE=$SIZE IMAGES=$IMAGES THREADS=$THREADS). $(nproc) CPU cores, $(date -u +%Y-%m-%d)."
  echo "Same $IMAGES fundus photographs, ${SIZE} px, batch $BATCH, random horizontal+vertical flips,"
  echo "class-weighted cross-entropy, Adam 1e-4, $THREADS intra-op threads; best warm epoch (2 or 3) of $REPEATS interleaved runs"
  echo "each. medmerge decodes each JPEG once into its decoded-image store (epoch 1) and trains channels-last."
  echo "Reference: bench/train_reference.py (torch $("$MEDMERGE_CACHE/venv/bin/python" -c 'import torch; print(torch.__version__)')), decoding every epoch"
  echo "(Pillow) as its DataLoader does: in the training process (0 workers) or in 2 worker processes."
  echo "medmerge-trainer starts by telling glibc's allocator to keep freed memory for the next step (trainer/src/allocator.rs);"
  echo "the last PyTorch column runs with the same settings, through glibc's environment variables (${MALLOC_AS_MEDMERGE[*]})."
  echo
  echo "| model | medmerge (img/s) | PyTorch NCHW, 0 workers | PyTorch channels-last, 0 workers | PyTorch channels-last, 2 workers | PyTorch channels-last, 0 workers, medmerge's malloc settings | ratio vs best PyTorch |"
  echo "|---|---|---|---|---|---|---|"
  for spec in "efficientnet-lite0 imagenet" "resnet50 random"; do
    set -- $spec
    ms=(); a=(); b=(); c=(); d=()
    for _ in $(seq 1 "$REPEATS"); do
      ms+=("$(medmerge "$1" "$2")"); a+=("$(reference "$1" 0 contiguous)"); b+=("$(reference "$1" 0 channels_last)"); c+=("$(reference "$1" 2 channels_last)")
      d+=("$(reference "$1" 0 channels_last "${MALLOC_AS_MEDMERGE[@]}")")
    done
    m="$(best "${ms[@]}")"; ra="$(best "${a[@]}")"; rb="$(best "${b[@]}")"; rc="$(best "${c[@]}")"; rd="$(best "${d[@]}")"
    python3 -c "m, a, b, c, d = $m, $ra, $rb, $rc, $rd; print(f'| $1 | {m:.1f} | {a:.1f} | {b:.1f} | {c:.1f} | {d:.1f} | {m / max(a, b, c, d):.2f}x |')"
  done
} | tee bench/results/train-throughput.md
