#!/usr/bin/env bash
# Merge scale: N = 4, 16, 64 data vectors of ResNet50 merged by medmerge (streaming:
# `medmerge-merge`, and `medmerge-trainer merge` which also probes the model in libtorch), by a
# PyTorch script that loads every vector and by mergekit's task arithmetic (installed from PyPI by
# bench/setup-mergekit.sh; NO_MERGEKIT=1 skips it), with wall time, peak RSS and the machine's I/O
# floor. Needs ~6.5 GB of disk in ~/.cache/medmerge/bench-merge (deleted after, KEEP=1 keeps it).
# Writes bench/results/merge-scale.md. SYNTHETIC_GB=1 merges N = 4, 16 vectors of a ~1 GB
# synthetic model instead (~20 GB of disk) into bench/results/merge-scale-synthetic.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
WORK="$MEDMERGE_CACHE/bench-merge"
T="$CARGO_TARGET_DIR/debug/medmerge-trainer"
mkdir -p "$WORK" bench/results
cargo build -q --workspace --bins
# A real ResNet50 vector to copy: a tiny fine-tune on generated images.
if [ ! -f "$WORK/template-vector.safetensors" ]; then
  "$T" synth --out "$WORK/images" --classes 4 --per-class 4 --size 64 >/dev/null
  "$T" init --arch resnet50 --weights random --data "$WORK/images" --image-size 64 --out "$WORK/base.safetensors" >/dev/null
  "$T" --threads 2 finetune --base "$WORK/base.safetensors" --data "$WORK/images" --shard template --out "$WORK/template-vector.safetensors" --epochs 1 --batch-size 16 >/dev/null 2>&1
fi
if [ -n "${SYNTHETIC_GB:-}" ]; then out=bench/results/merge-scale-synthetic.md; ns="${NS:-4 16}"; else out=bench/results/merge-scale.md; ns="${NS:-4 16 64}"; fi
[ "${NO_MERGEKIT:-0}" = 1 ] || export MERGEKIT="$(bash bench/setup-mergekit.sh)"
"$MEDMERGE_CACHE/venv/bin/python" bench/merge_scale.py "$T" "$CARGO_TARGET_DIR/debug/medmerge-merge" "$WORK" "$out" $ns
[ "${KEEP:-0}" = 1 ] || rm -rf "$WORK"
cat "$out"
