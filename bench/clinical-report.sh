#!/usr/bin/env bash
# Grad-CAM on real fundus photographs: runs the paper's MergeJob once on eye-fundus (128 px,
# 4 equal shards, BN recalibration, every baseline; kept in the cache), then re-runs its evaluate
# stage with 128 explained held-out
# images per model, and writes the share of heat inside the fundus disc for every model, the
# per-class operating point and AUROC to bench/results/clinical-report.md. The HTML report stays
# in the cache (it shows patient images, which never enter the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
WORK="${BENCH_WORK:-$MEDMERGE_CACHE/bench-paper}"
RUN="$WORK/artifacts/runs/local/paper-table/g1"
T="$CARGO_TARGET_DIR/debug/medmerge-trainer"
EXPLAIN="${EXPLAIN_IMAGES:-128}"
DATA="$(cd "${DATA:-../shared/data/eye-fundus}" && pwd)"
if [ ! -f "$RUN/restored/data-vector/model.safetensors" ]; then
  mkdir -p "$WORK"
  "$T" split --data "$DATA" --out "$WORK/split" --shards 4 --test-fraction 0.2 --seed 3315
  cat > "$WORK/paper.yaml" <<YAML
apiVersion: medmerge.io/v1alpha1
kind: MergeJob
metadata: {name: paper-table}
spec:
  model: {architecture: efficientnet-lite0, weights: imagenet, imageSize: 128}
  shards:
$(for i in 1 2 3 4; do echo "    - {name: shard-$i, data: {path: split/shard-$i.csv}}"; done)
  training: {epochs: 3, batchSize: 32, optimizer: adam, learningRate: 0.0001, seed: 3315, classWeighting: true, augment: {flip: true}}
  merge: {method: dataVector, lambda: 0.5, heads: mean, baselines: [paramsMean, randomVector, pretrainedRestored, shardModels, fullTraining]}
  restore: {mode: bnRecalibrate}
  evaluation: {data: {path: split/test.csv}}
  storage: {local: {path: artifacts}}
YAML
  "$T" pipeline "$WORK/paper.yaml"
fi
sed "s|evaluation: {data: {path: split/test.csv}}|evaluation: {data: {path: split/test.csv}, explainImages: $EXPLAIN, operatingPoint: 0.5}|" "$WORK/paper.yaml" > "$WORK/clinical.yaml"
grep -q "explainImages: $EXPLAIN" "$WORK/clinical.yaml"
rm -rf "$RUN/eval"
started=$(date +%s)
"$T" pipeline "$WORK/clinical.yaml"
seconds=$(( $(date +%s) - started ))
"$MEDMERGE_CACHE/venv/bin/python" -c "import PIL" 2>/dev/null || "$MEDMERGE_CACHE/venv/bin/pip" install -q pillow
"$MEDMERGE_CACHE/venv/bin/python" - "$RUN/eval/metrics.json" "$EXPLAIN" "$seconds" "$WORK/split/test.csv" > bench/results/clinical-report.md <<'PY'
import csv, json, sys
from PIL import Image
r = json.load(open(sys.argv[1]))
n, seconds = sys.argv[2], sys.argv[3]
# The disc's share of the image on the same evenly spaced sample: what a heatmap spread
# uniformly over the picture would score.
paths = [row["path"] for row in csv.DictReader(open(sys.argv[4]))]
k = min(int(n), len(paths))
size = r["spec"]["model"]["imageSize"]
areas = []
for i in range(k):
    img = Image.open(paths[i * len(paths) // k]).convert("RGB").resize((size, size), Image.BILINEAR)
    areas.append(sum(1 for p in img.getdata() if max(p) > 20) / (size * size))
disc = sum(areas) / len(areas)
pct = lambda v: "n/a" if v is None else f"{100 * v:.1f} %"
print("# Grad-CAM and operating point on real fundus photographs\n")
print(f"Command: `bash bench/clinical-report.sh` (evaluate stage of the `make bench-paper` run: "
      f"EfficientNet-Lite0, 128 px, 4 shards of ../shared/data/eye-fundus, {r['test_images']} held-out images). "
      f"Grad-CAM of the predicted class at the last conv block on {n} evenly spaced held-out images per model; "
      f"the fundus disc is every pixel brighter than the black border (max channel > 20) and covers "
      f"{100 * disc:.1f} % of the pixels on average, which is what a heatmap spread evenly over the picture would score. Evaluate stage: {seconds} s on 2 CPU cores.\n")
print("Deletion / insertion: area under the explained class's probability as the hottest pixels are "
      "replaced by the mean colour (lower is better) or revealed on a blurred copy (higher is better).\n")
print("| model | accuracy | macro AUROC | heat inside the foreground | deletion AUC | insertion AUC |\n|---|---|---|---|---|---|")
num = lambda v: "n/a" if v is None else f"{v:.3f}"
for c in r["candidates"]:
    m = c["metrics"]
    heat = c.get("foreground_fraction", c.get("fundus_fraction"))
    print(f"| {c['description']} | {pct(m['accuracy'])} | {num(m.get('macro_auroc'))} | {pct(heat)} | {num(c.get('deletion_auc'))} | {num(c.get('insertion_auc'))} |")
cl = r["clinical"]
print(f"\nMerged model ({r['candidates'][0]['description']}), one class against the rest, operating point p >= {cl['operating_point']}:\n")
print("| class | AUROC | sensitivity | specificity |\n|---|---|---|---|")
for i, roc in enumerate(cl["roc"]):
    auc = "n/a" if roc["auroc"] is None else f"{roc['auroc']:.3f}"
    print(f"| {roc['class']} | {auc} | {pct(cl['sensitivity'][i])} | {pct(cl['specificity'][i])} |")
right = sum(1 for g in cl["gallery"] if g["label"] == g["predicted"])
print(f"\nGallery in report.html: {right} correct and {len(cl['gallery']) - right} wrong predictions with overlays (kept out of the repository: they are patient images).")
PY
cat bench/results/clinical-report.md
echo "report: $RUN/eval/report.html"
