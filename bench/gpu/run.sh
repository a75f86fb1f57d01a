#!/usr/bin/env bash
# Runs on the device machine (one call): the CUDA path of medmerge-trainer against the machine's
# own libtorch. 1. training throughput at SIZE px (default 224), EfficientNet-Lite0 and ResNet50,
# float32 and bfloat16 autocast, channels-last and NCHW, against PyTorch eager on the same GPU
# (bench/train_reference.py, its DataLoader with 12 workers, pinned memory); 2. the wall time of
# a whole MergeJob (4 hospitals x 8 epochs, full-training baseline, default restoration), float32
# and mixed precision. Results go to $OUT: throughput.md, mergejob.txt, table-mp-*.md and every
# log in logs.tgz (the device tool brings back at most 8 files).
set -uo pipefail
cd "$(dirname "$0")"
TL=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export LD_PRELOAD=$TL/libtorch_cuda.so LD_LIBRARY_PATH=$TL MEDMERGE_WEIGHTS=$PWD/efficientnet-lite0-imagenet.safetensors MEDMERGE_FONT=$PWD/DejaVuSans.ttf
xz -dkf medmerge-trainer.xz && chmod +x medmerge-trainer
T=$PWD/medmerge-trainer
$T --device cuda synth --out /tmp/probe --classes 2 --per-class 2 --size 16 >/dev/null || { echo "CUDA device not usable"; exit 1; }
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader); TORCH=$(python3 -c 'import torch;print(torch.__version__)')
SIZE=${SIZE:-224}; W=/tmp/w; L=$W/logs; mkdir -p $W $L
trap 'tar czf $OUT/logs.tgz -C $W logs' EXIT
$T split --data data --out $W/split --shards 4 --test-fraction 0.2 --seed 3315 | tail -1
# Every training image of the four hospitals, for the throughput runs.
{ head -1 $W/split/shard-1.csv; for i in 1 2 3 4; do tail -n +2 $W/split/shard-$i.csv; done; } > $W/train.csv
R=$OUT/throughput.md
echo "| model | trainer | precision | layout | epoch 1 (decode) | best of epochs 2-3 (img/s) |" > $R
echo "|---|---|---|---|---|---|" >> $R
for arch in efficientnet-lite0 resnet50; do
  weights=random; [ $arch = efficientnet-lite0 ] && weights=imagenet
  $T --device cuda init --arch $arch --weights $weights --data $W/train.csv --image-size $SIZE --out $W/base-$arch.safetensors >/dev/null
  for cfg in "fp32 1" "bf16 1" "fp32 0" "bf16 0"; do
    set -- $cfg; mp=""; [ $1 = bf16 ] && mp=--mixed-precision
    layout=channels-last; [ $2 = 0 ] && layout=NCHW
    MEDMERGE_CHANNELS_LAST=$2 $T --device cuda --log-format json finetune --base $W/base-$arch.safetensors --data $W/train.csv --shard bench \
      --out $W/v.safetensors --epochs 3 --batch-size 32 $mp 2>$L/ft-$arch-$1-$2.jsonl >/dev/null
    python3 - $L/ft-$arch-$1-$2.jsonl "| $arch | medmerge | $1 | $layout" >> $R <<'PY'
import json, sys
v = [json.loads(l)["fields"]["images_per_second"] for l in open(sys.argv[1]) if "epoch done" in l]
print(f"{sys.argv[2]} | {v[0]:.0f} | {max(v[1:]):.0f} |" if len(v) > 1 else f"{sys.argv[2]} | failed | |")
PY
  done
  for amp in "" bf16; do
    REF_DEVICE=cuda REF_AMP=$amp python3 ../bench/train_reference.py $W/train.csv $arch $SIZE 32 3 16 12 channels_last > $L/ref-$arch-${amp:-fp32}.jsonl 2>&1
    python3 - $L/ref-$arch-${amp:-fp32}.jsonl "| $arch | PyTorch eager | ${amp:-fp32} | channels-last" >> $R <<'PY'
import json, sys
v = [json.loads(l)["images_per_second"] for l in open(sys.argv[1]) if l.startswith("{")]
print(f"{sys.argv[2]} | {v[0]:.0f} | {max(v[1:]):.0f} |" if len(v) > 1 else f"{sys.argv[2]} | failed | |")
PY
  done
  cat $R
done
for mp in false true; do
  cat > $W/job-$mp.yaml <<YAML
apiVersion: medmerge.io/v1alpha1
kind: MergeJob
metadata: {name: gpu-$mp}
spec:
  model: {architecture: efficientnet-lite0, weights: imagenet, imageSize: $SIZE}
  shards:
$(for i in 1 2 3 4; do echo "    - {name: shard-$i, data: {path: split/shard-$i.csv}}"; done)
  training: {epochs: 8, batchSize: 32, learningRate: 0.0001, seed: 3315, mixedPrecision: $mp}
  merge: {baselines: [paramsMean, pretrainedRestored, shardModels, fullTraining]}
  evaluation: {data: {path: split/test.csv}}
  storage: {local: {path: artifacts}}
YAML
  start=$(date +%s.%N)
  $T --device cuda --log-format json pipeline $W/job-$mp.yaml > $OUT/table-mp-$mp.md 2> $L/log-mp-$mp.jsonl
  rc=$?
  echo "mixedPrecision=$mp rc=$rc seconds=$(python3 -c "import time; print(round(time.time() - $start, 1))")" | tee -a $OUT/mergejob.txt
  cat $OUT/table-mp-$mp.md
done
echo "$GPU, torch $TORCH, $(nproc) CPU cores" >> $OUT/mergejob.txt
