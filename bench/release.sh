#!/usr/bin/env bash
# What a hospital's choice of release costs the merged model: int8 and top-k encodings (bytes on
# the wire) and differential privacy (epsilon), on the hospitals of bench/paper-table.sh (IID,
# 4 shards, EfficientNet-Lite0 ImageNet, 64 px, 3 epochs; run that first, or this trains them).
# Each hospital's float32 vector is released with `medmerge-trainer release`, merged with the
# default lambda 2.0 and restored with the default (averaged epoch + closed-form head); private
# vectors are also restored with batch-norm recalibration only, which shows what the noisy vector
# itself carries.
#
#   DATA=<ImageFolder> SEEDS="1 2 3" CLIP_NORM=3 bash bench/release.sh
#
# Writes bench/results/release.{md,json}. About 45 minutes on 2 CPU cores with cached hospitals
# (86 when it shared the cores with builds).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
DATA="$(cd "${DATA:-../shared/data/eye-fundus}" && pwd)"
SEEDS="${SEEDS:-1 2 3}"
CLIP="${CLIP_NORM:-3}"
WORK="${BENCH_WORK:-$MEDMERGE_CACHE/bench-paper}/$(basename "$DATA")-64px-3ep"
T="${MEDMERGE_TRAINER:-$CARGO_TARGET_DIR/debug/medmerge-trainer}"
OUT="${BENCH_OUT:-bench/results/release}"
CONFIGS=(float32 int8 topk-0.1 topk-0.01 dp-100 dp-8 dp-1)
started=$(date +%s)
source bench/lib.sh
flags() {
  case "$1" in
    float32) echo "--encoding float32" ;;
    int8) echo "--encoding int8" ;;
    topk-*) echo "--encoding topK --density ${1#topk-}" ;;
    dp-*) echo "--epsilon ${1#dp-} --delta 1e-6 --clip-norm $CLIP" ;;
  esac
}
[ -f "$WORK/seed-${SEEDS%% *}/iid/vector-4.safetensors" ] || SEEDS="$SEEDS" SPLITS=iid DATA="$DATA" IMAGE_SIZE=64 EPOCHS=3 bash bench/paper-table.sh > /dev/null
for seed in $SEEDS; do
  B="$WORK/seed-$seed"; D="$B/iid"; R="$D/release"; mkdir -p "$R"
  TRAIN=(--epochs 3 --batch-size 32 --lr 0.0001 --seed "$seed")
  SH=(); for i in 1 2 3 4; do SH+=(--data "$D/split/shard-$i.csv"); done
  RESTORE=(restore "${SH[@]}" "${TRAIN[@]}")
  EV=(); models=()
  for c in "${CONFIGS[@]}"; do
    mkdir -p "$R/$c"; V=()
    for i in 1 2 3 4; do
      # shellcheck disable=SC2046
      once "$T" release --base "$B/base.safetensors" --vector "$D/vector-$i.safetensors" --out "$R/$c/vector-$i.safetensors" $(flags "$c")
      V+=(--vector "shard-$i=$R/$c/vector-$i.safetensors")
    done
    # The merge refuses a model that gives non-finite logits (noise too large to absorb): the
    # table says so instead of an accuracy.
    [ -e "$R/$c/refused.txt" ] && continue
    if ! once "$T" merge --base "$B/base.safetensors" "${V[@]}" --method data-vector --lambda 2.0 --out "$R/$c/merged.safetensors" 2> "$R/$c/merge.err"; then
      tail -n 3 "$R/$c/merge.err" > "$R/$c/refused.txt"; log "merge $c refused: $(head -c 300 "$R/$c/refused.txt")"; continue
    fi
    once "$T" "${RESTORE[@]}" --model "$R/$c/merged.safetensors" --mode averaged-epoch --out "$R/$c/averaged-epoch.safetensors"
    once "$T" "${RESTORE[@]}" --model "$R/$c/averaged-epoch.safetensors" --mode closed-form-head --out "$R/$c/$c.safetensors"
    models+=("$c"); EV+=(--model "$R/$c/$c.safetensors")
    if [[ "$c" == dp-* || "$c" == float32 ]]; then
      once "$T" "${RESTORE[@]}" --model "$R/$c/merged.safetensors" --mode bn-recalibrate --out "$R/$c/$c-bn.safetensors"
      models+=("$c-bn"); EV+=(--model "$R/$c/$c-bn.safetensors")
    fi
  done
  for i in 1 2 3 4; do EV+=(--model "$D/models/shard-$i.safetensors"); done
  if [ ! -f "$R/eval.json" ] || [ "$(cat "$R/eval.models" 2>/dev/null)" != "${models[*]}" ]; then
    log "evaluate seed $seed"; "$T" evaluate --data "$D/split/test.csv" --json "$R/eval.json" "${EV[@]}" > "$R/eval.txt"
    echo "${models[*]}" > "$R/eval.models"
  fi
done
python3 bench/release_table.py "$WORK" "$(( $(date +%s) - started ))" "$OUT" "DATA=$DATA SEEDS=\"$SEEDS\" CLIP_NORM=$CLIP bash bench/release.sh" "$SEEDS" "$CLIP" "${CONFIGS[@]}"
cat "$OUT.md"
