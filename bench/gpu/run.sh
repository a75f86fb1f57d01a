#!/usr/bin/env bash
# Runs on the device machine: the CUDA path of medmerge-trainer against the machine's own libtorch.
set -uo pipefail
cd "$(dirname "$0")"
TL=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export LD_PRELOAD=$TL/libtorch_cuda.so LD_LIBRARY_PATH=$TL MEDMERGE_WEIGHTS=$PWD/efficientnet-lite0-imagenet.safetensors MEDMERGE_FONT=$PWD/DejaVuSans.ttf
xz -dkf medmerge-trainer.xz && chmod +x medmerge-trainer
T=$PWD/medmerge-trainer
$T --device cuda synth --out /tmp/probe --classes 2 --per-class 2 --size 16 || { echo "CUDA device not usable"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c 'import torch;print("torch", torch.__version__)'
MODE=${MODE:-bnRecalibrate}; W=/tmp/w-$MODE; mkdir -p $W
$T split --data data --out $W/split --shards 4 --test-fraction 0.2 --seed 3315 | tail -1
SIZE=${SIZE:-224}; EPOCHS=${EPOCHS:-8}
cat > $W/job.yaml <<YAML
apiVersion: medmerge.io/v1alpha1
kind: MergeJob
metadata: {name: gpu}
spec:
  model: {architecture: efficientnet-lite0, weights: imagenet, imageSize: $SIZE}
  shards:
$(for i in 1 2 3 4; do echo "    - {name: shard-$i, data: {path: split/shard-$i.csv}}"; done)
  training: {epochs: $EPOCHS, batchSize: 32, learningRate: 0.0001, seed: 3315}
  merge: {method: dataVector, lambda: 0.5, baselines: [paramsMean, pretrainedRestored, shardModels, fullTraining]}
  restore: {mode: $MODE}
  evaluation: {data: {path: split/test.csv}}
  storage: {local: {path: artifacts}}
YAML
start=$(date +%s)
$T --device cuda --log-format json pipeline $W/job.yaml > $OUT/table-$MODE.md 2> $OUT/log-$MODE.jsonl
echo "rc=$? seconds=$(( $(date +%s) - start ))"
cat $OUT/table-$MODE.md
grep -o '"images_per_second":[0-9.]*' $OUT/log-$MODE.jsonl | head -3
cp $W/artifacts/runs/local/gpu/g1/eval/metrics.json $OUT/metrics-$MODE.json 2>/dev/null
tail -3 $OUT/log-$MODE.jsonl
