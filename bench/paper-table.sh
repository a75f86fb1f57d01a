#!/usr/bin/env bash
# Reproduces the paper's comparison on a real ImageFolder (default ../shared/data/eye-fundus):
# 4 equal random shards + a stratified 20 % test set, EfficientNet-Lite0 ImageNet at 128 px,
# Adam 1e-4, 3 epochs, batch 32, class-weighted CE, random flips, seed 3315.
# Writes bench/results/paper-table.{md,json}. About 30-40 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
DATA="${DATA:-../shared/data/eye-fundus}"
DATA="$(cd "$DATA" && pwd)"
WORK="${BENCH_WORK:-$MEDMERGE_CACHE/bench-paper}"
SIZE="${IMAGE_SIZE:-128}"
EPOCHS="${EPOCHS:-3}"
T="$CARGO_TARGET_DIR/debug/medmerge-trainer"
mkdir -p "$WORK" bench/results
started=$(date +%s)
"$T" split --data "$DATA" --out "$WORK/split" --shards 4 --test-fraction 0.2 --seed 3315
cat > "$WORK/paper.yaml" <<YAML
apiVersion: medmerge.io/v1alpha1
kind: MergeJob
metadata: {name: paper-table}
spec:
  model: {architecture: efficientnet-lite0, weights: imagenet, imageSize: $SIZE}
  shards:
$(for i in 1 2 3 4; do echo "    - {name: shard-$i, data: {path: split/shard-$i.csv}}"; done)
  training: {epochs: $EPOCHS, batchSize: 32, optimizer: adam, learningRate: 0.0001, seed: 3315, classWeighting: true, augment: {flip: true}}
  merge: {method: dataVector, lambda: 0.5, heads: mean, baselines: [paramsMean, randomVector, pretrainedRestored, shardModels, fullTraining]}
  restore: {mode: bnRecalibrate}
  evaluation: {data: {path: split/test.csv}}
  storage: {local: {path: artifacts}}
YAML
"$T" pipeline "$WORK/paper.yaml"
RUN="$WORK/artifacts/runs/local/paper-table/g1"
V=(); for i in 1 2 3 4; do V+=(--vector "shard-$i=$RUN/shards/shard-$i/vector.safetensors"); done
SH=(); for i in 1 2 3 4; do SH+=(--data "$WORK/split/shard-$i.csv"); done
X="$WORK/extra"; mkdir -p "$X"
# Rows beyond the pipeline's: lambda 1.0, no restoration, and the paper's one-epoch restoration
# (for the data vector, the parameter mean and the no-vector control).
[ -f "$X/dv1.0-merged.safetensors" ] || "$T" merge --base "$RUN/base/model.safetensors" "${V[@]}" --lambda 1.0 --out "$X/dv1.0-merged.safetensors"
[ -f "$X/dv1.0-bn.safetensors" ] || "$T" restore --model "$X/dv1.0-merged.safetensors" --mode bn-recalibrate "${SH[@]}" --out "$X/dv1.0-bn.safetensors"
[ -f "$X/pm-none.safetensors" ] || cp "$RUN/merged/params-mean/model.safetensors" "$X/pm-none.safetensors"
[ -f "$X/dv0.5-none.safetensors" ] || cp "$RUN/merged/data-vector/model.safetensors" "$X/dv0.5-none.safetensors"
for m in data-vector params-mean pretrained-restored; do
  [ -f "$X/$m-epoch.safetensors" ] || "$T" restore --model "$RUN/merged/$m/model.safetensors" --mode finetune-epoch --lr 0.0001 "${SH[@]}" --out "$X/$m-epoch.safetensors"
done
"$T" evaluate --data "$WORK/split/test.csv" --json "$X/extra.json" \
  --model "$X/dv1.0-bn.safetensors" --model "$X/dv0.5-none.safetensors" --model "$X/pm-none.safetensors" \
  --model "$X/data-vector-epoch.safetensors" --model "$X/params-mean-epoch.safetensors" --model "$X/pretrained-restored-epoch.safetensors"
elapsed=$(( $(date +%s) - started ))
python3 bench/paper_table.py "$RUN/eval/metrics.json" "$X/extra.json" "$elapsed" "DATA=$DATA IMAGE_SIZE=$SIZE EPOCHS=$EPOCHS make bench-paper" > bench/results/paper-table.md
cat bench/results/paper-table.md
