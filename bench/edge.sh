#!/usr/bin/env bash
# The model for edge devices: the merged model (default configuration: lambda 2.0, averaged epoch
# + closed-form head) of bench/paper-table.sh's runs (EfficientNet-Lite0 ImageNet, 64 px, 3
# epochs, 4 hospitals) exported as ONNX in float32 and with int8 weights, both scored on the
# split's held-out images (`evaluate --int8-weights` scores exactly the int8 file's weights), on
# every split and seed that bench/paper-table.sh cached; also the ONNX files' sizes.
#
#   SEEDS="1 2 3" SPLITS="iid dirichlet size imbalanced" bash bench/edge.sh
#
# Run bench/paper-table.sh first (this reads its cache). Writes bench/results/edge.{md,json};
# about 5 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
DATA="$(cd "${DATA:-../shared/data/eye-fundus}" && pwd)"
SEEDS="${SEEDS:-1 2 3}"
SPLITS="${SPLITS:-iid dirichlet size imbalanced}"
WORK="${BENCH_WORK:-$MEDMERGE_CACHE/bench-paper}/$(basename "$DATA")-64px-3ep"
T="${MEDMERGE_TRAINER:-$CARGO_TARGET_DIR/debug/medmerge-trainer}"
OUT="${BENCH_OUT:-bench/results/edge}"
MODEL=dv2-averaged-epoch-head
started=$(date +%s)
source bench/lib.sh
for seed in $SEEDS; do
  for split in $SPLITS; do
    D="$WORK/seed-$seed/$split"; E="$D/edge"
    [ -f "$D/models/$MODEL.safetensors" ] || { echo "missing $D/models/$MODEL.safetensors: run bench/paper-table.sh first" >&2; exit 1; }
    mkdir -p "$E"
    once "$T" export --model "$D/models/$MODEL.safetensors" --out "$E/model.onnx"
    once "$T" export --model "$D/models/$MODEL.safetensors" --int8 --out "$E/model-int8.onnx"
    [ -f "$E/eval.json" ] || { log "evaluate seed $seed $split"; "$T" evaluate --model "$D/models/$MODEL.safetensors" --int8-weights --data "$D/split/test.csv" --json "$E/eval.json" > /dev/null; }
  done
done
python3 - "$WORK" "$(( $(date +%s) - started ))" "$OUT" "SEEDS=\"$SEEDS\" SPLITS=\"$SPLITS\" bash bench/edge.sh" "$SEEDS" $SPLITS <<'PY'
import json, os, statistics, sys
work, elapsed, out, command, seeds = sys.argv[1:6]
splits = sys.argv[6:]
rows, raw = [], {}
for split in splits:
    acc, acc8, f1, f18, size, size8 = [], [], [], [], [], []
    for seed in seeds.split():
        e = f"{work}/seed-{seed}/{split}/edge"
        c = json.load(open(f"{e}/eval.json"))["candidates"]
        acc.append(c[0]["metrics"]["accuracy"]); acc8.append(c[1]["metrics"]["accuracy"])
        f1.append(c[0]["metrics"]["macro_f1"]); f18.append(c[1]["metrics"]["macro_f1"])
        size.append(os.path.getsize(f"{e}/model.onnx")); size8.append(os.path.getsize(f"{e}/model-int8.onnx"))
    ms = lambda xs: (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)
    raw[split] = {"float32": {"accuracy": acc, "macro_f1": f1, "bytes": size}, "int8": {"accuracy": acc8, "macro_f1": f18, "bytes": size8}}
    diff = [b - a for a, b in zip(acc, acc8)]
    (a, sa), (b, sb), (d, sd) = ms(acc), ms(acc8), ms(diff)
    rows.append(f"| {split} | {100*a:.1f} ± {100*sa:.1f} % | {100*b:.1f} ± {100*sb:.1f} % | {100*d:+.2f} ± {100*sd:.2f} pp | {statistics.mean(size)/1e6:.1f} MB | {statistics.mean(size8)/1e6:.1f} MB |")
md = f"""# The merged model for edge devices: ONNX float32 vs int8 weights

Command: `{command}` ({elapsed} s on this machine, 2 CPU cores). Model: the default configuration's
merged model (data vector, λ 2.0, averaged epoch + closed-form head) of `bench/paper-table.sh`
(EfficientNet-Lite0 ImageNet, 64 px, 3 epochs, 4 hospitals of eye-fundus), seeds {seeds}, each
split's own held-out images. The int8 file stores every convolution kernel and linear weight
but the first convolution and the head as int8 with one scale per output channel (`export
--int8`); `evaluate --int8-weights` scores those exact weights (tests show onnxruntime gives the same logits within 1e-4).

| split | float32 accuracy | int8 accuracy | int8 − float32 (paired) | float32 file | int8 file |
|---|---|---|---|---|---|
""" + "\n".join(rows) + "\n"
open(out + ".md", "w").write(md)
json.dump({"command": command, "seconds": int(elapsed), "seeds": seeds.split(), "splits": raw}, open(out + ".json", "w"), indent=1)
print(md)
PY
