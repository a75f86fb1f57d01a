#!/usr/bin/env bash
# The method against its baselines and a control, for every restoration, on IID hospitals
# (4 equal random shards), label-skewed hospitals (Dirichlet 0.5), size-skewed hospitals
# (50/25/15/10 %) and an imbalanced variant of the set (classes subsampled to 70/15/10/5 %,
# equal shards), each over several seeds (a seed draws the test set, the shards, the head and the
# shuffles). EfficientNet-Lite0 ImageNet, Adam 1e-4, batch 32, class-weighted CE, random flips.
#
#   DATA=<ImageFolder> IMAGE_SIZE=64 EPOCHS=3 SEEDS="1 2 3" SPLITS="iid dirichlet size imbalanced"
#
# Writes bench/results/paper-table.{md,json}. Every step's output is kept in $BENCH_WORK, so an
# interrupted run resumes where it stopped. About 90 minutes on 2 CPU cores with the defaults.
#
# ROWS=default-candidates runs, on the same hospitals (sharing the cache), only the candidates
# for the default restoration against the best hospital and full training, into
# bench/results/default-candidates.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
DATA="$(cd "${DATA:-../shared/data/eye-fundus}" && pwd)"
SIZE="${IMAGE_SIZE:-64}"
EPOCHS="${EPOCHS:-3}"
SEEDS="${SEEDS:-1 2 3}"
SPLITS="${SPLITS:-iid dirichlet size imbalanced}"
WORK="${BENCH_WORK:-$MEDMERGE_CACHE/bench-paper}/$(basename "$DATA")-${SIZE}px-${EPOCHS}ep"
# MEDMERGE_TRAINER: a copy of the binary, so a rebuild during a long run does not swap it.
T="${MEDMERGE_TRAINER:-$CARGO_TARGET_DIR/debug/medmerge-trainer}"
ROWS="${ROWS:-paper}"
case "$ROWS" in
  paper) OUT="${BENCH_OUT:-bench/results/paper-table}"; EVAL=eval ;;
  default-candidates) OUT="${BENCH_OUT:-bench/results/default-candidates}"; EVAL=eval-default-candidates ;;
  *) echo "unknown ROWS=$ROWS (paper, default-candidates)" >&2; exit 2 ;;
esac
mkdir -p "$WORK" "$(dirname "$OUT")"
started=$(date +%s)
source bench/lib.sh

for seed in $SEEDS; do
  B="$WORK/seed-$seed"; mkdir -p "$B"
  TRAIN=(--epochs "$EPOCHS" --batch-size 32 --lr 0.0001 --seed "$seed")
  once "$T" init --data "$DATA" --image-size "$SIZE" --seed "$seed" --out "$B/base.safetensors"
  for kind in $SPLITS; do
    D="$B/$kind"; M="$D/models"; mkdir -p "$M"; kind_started=$(date +%s)
    case "$kind" in
      iid) skew=() ;;
      dirichlet) skew=(--dirichlet 0.5) ;;
      size) skew=(--sizes 50,25,15,10) ;;
      imbalanced) skew=(--class-fractions 70,15,10,5) ;;
      *) echo "unknown split kind $kind (iid, dirichlet, size, imbalanced)" >&2; exit 2 ;;
    esac
    [ -f "$D/split/test.csv" ] || { log "split $kind seed $seed"; "$T" split --data "$DATA" --out "$D/split" --shards 4 --seed "$seed" "${skew[@]}" > "$D/split.txt"; }
    V=(); SH=()
    for i in 1 2 3 4; do
      once "$T" finetune --base "$B/base.safetensors" --data "$D/split/shard-$i.csv" --shard "shard-$i" --out "$D/vector-$i.safetensors" "${TRAIN[@]}"
      V+=(--vector "shard-$i=$D/vector-$i.safetensors"); SH+=(--data "$D/split/shard-$i.csv")
      # A shard's own model: the mean of one vector is that vector.
      once "$T" merge --base "$B/base.safetensors" --vector "shard-$i=$D/vector-$i.safetensors" --method params-mean --out "$M/shard-$i.safetensors"
    done
    # Full training sees the union of the shards, which for iid, dirichlet and size is the same
    # set (the test set depends only on the seed): trained once per seed and set.
    pool="$B/full-$([ "$kind" = imbalanced ] && echo imbalanced || echo balanced)"
    if [ ! -f "$pool/model.safetensors" ]; then
      mkdir -p "$pool"
      { head -n1 "$D/split/shard-1.csv"; for i in 1 2 3 4; do tail -n +2 "$D/split/shard-$i.csv"; done; } > "$pool/all.csv"
      once "$T" finetune --base "$B/base.safetensors" --data "$pool/all.csv" --shard all --out "$pool/vector.safetensors" "${TRAIN[@]}"
      once "$T" merge --base "$B/base.safetensors" --vector "all=$pool/vector.safetensors" --method params-mean --out "$pool/model.safetensors"
    fi
    R=(restore "${SH[@]}" "${TRAIN[@]}")
    once "$T" merge --base "$B/base.safetensors" "${V[@]}" --method data-vector --lambda 1.0 --out "$M/dv1.safetensors"
    if [ "$ROWS" = default-candidates ]; then
      once "$T" merge --base "$B/base.safetensors" "${V[@]}" --method data-vector --lambda 1.5 --out "$M/dv15.safetensors"
      once "$T" merge --base "$B/base.safetensors" "${V[@]}" --method data-vector --lambda 2.0 --out "$M/dv2.safetensors"
      # A base ending in -averaged-epoch gets a second averaged epoch (two rounds).
      for base in dv1 dv15 dv2 dv1-averaged-epoch dv15-averaged-epoch; do
        once "$T" "${R[@]}" --model "$M/$base.safetensors" --mode averaged-epoch --out "$M/$base-averaged-epoch.safetensors"
        once "$T" "${R[@]}" --model "$M/$base-averaged-epoch.safetensors" --mode closed-form-head --out "$M/$base-averaged-epoch-head.safetensors"
      done
      models=(dv1-averaged-epoch-head dv15-averaged-epoch-head dv2-averaged-epoch-head \
              dv1-averaged-epoch-averaged-epoch-head dv15-averaged-epoch-averaged-epoch-head)
    else
      once "$T" merge --base "$B/base.safetensors" "${V[@]}" --method data-vector --lambda 0.5 --out "$M/dv.safetensors"
      once "$T" merge --base "$B/base.safetensors" "${V[@]}" --method params-mean --out "$M/pm.safetensors"
      once "$T" merge --base "$B/base.safetensors" "${V[@]}" --method params-mean --pretrained-only --out "$M/control.safetensors"
      for mode in bn-recalibrate closed-form-head averaged-epoch finetune-epoch; do
        once "$T" "${R[@]}" --model "$M/dv.safetensors" --mode "$mode" --out "$M/dv-$mode.safetensors"
      done
      # averaged-epoch-head = the head round on top of averaged-epoch (closed-form-head's BN round
      # recomputes the same statistics), which saves training the epoch twice.
      once "$T" "${R[@]}" --model "$M/dv-averaged-epoch.safetensors" --mode closed-form-head --out "$M/dv-averaged-epoch-head.safetensors"
      for base in dv1 pm control; do
        once "$T" "${R[@]}" --model "$M/$base.safetensors" --mode averaged-epoch --out "$M/$base-averaged-epoch.safetensors"
        once "$T" "${R[@]}" --model "$M/$base-averaged-epoch.safetensors" --mode closed-form-head --out "$M/$base-averaged-epoch-head.safetensors"
      done
      once "$T" "${R[@]}" --model "$M/pm.safetensors" --mode bn-recalibrate --out "$M/pm-bn-recalibrate.safetensors"
      models=(dv dv-bn-recalibrate dv-closed-form-head dv-averaged-epoch dv-averaged-epoch-head dv-finetune-epoch dv1-averaged-epoch-head \
              pm pm-bn-recalibrate pm-averaged-epoch pm-averaged-epoch-head control-averaged-epoch-head)
    fi
    EV=()
    for m in "${models[@]}" shard-1 shard-2 shard-3 shard-4; do
      EV+=(--model "$M/$m.safetensors")
    done
    EV+=(--model "$pool/model.safetensors")
    # Evaluated again when the row set changed since the last run (the models are cached).
    if [ ! -f "$D/$EVAL.json" ] || [ "$(cat "$D/$EVAL.models" 2>/dev/null)" != "${models[*]}" ]; then
      log "evaluate $kind seed $seed"; "$T" evaluate --data "$D/split/test.csv" --json "$D/$EVAL.json" "${EV[@]}" > "$D/$EVAL.txt"
      # Wall time of the run that finished this split and seed (the total a resumed run reports).
      echo $(( $(date +%s) - kind_started )) > "$D/$EVAL.seconds"
      echo "${models[*]}" > "$D/$EVAL.models"
    fi
  done
done
elapsed=$(( $(date +%s) - started ))
python3 bench/paper_table.py "$WORK" "$elapsed" "$OUT" \
  "$([ "$ROWS" = paper ] || echo "ROWS=$ROWS ")DATA=$DATA IMAGE_SIZE=$SIZE EPOCHS=$EPOCHS SEEDS=\"$SEEDS\" SPLITS=\"$SPLITS\" bash bench/paper-table.sh" \
  "$SIZE" "$EPOCHS" "$SEEDS" "$SPLITS" "$ROWS" "$EVAL"
cat "$OUT.md"
