#!/usr/bin/env bash
# Do the Grad-CAM measures tell good models from bad? For models of one seed of `make bench-paper`
# (64 px eye-fundus, from its cache: run that first), `medmerge-trainer explain` on every 4th
# held-out image: share of heat inside the foreground, deletion and insertion AUC, and the
# deletion gain (coldest-first minus hottest-first deletion area).
#
#   SEED=1 SPLIT=iid bash bench/gradcam-faithfulness.sh
#
# Writes bench/results/gradcam-faithfulness.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
SEED="${SEED:-1}"
SPLIT="${SPLIT:-iid}"
D="${BENCH_WORK:-$MEDMERGE_CACHE/bench-paper}/eye-fundus-64px-3ep/seed-$SEED/$SPLIT"
T="$CARGO_TARGET_DIR/debug/medmerge-trainer"
[ -f "$D/split/test.csv" ] || { echo "no bench-paper run at $D: run make bench-paper first" >&2; exit 2; }
WORK="$(mktemp -d)"; trap 'rm -rf "$WORK"' EXIT
awk 'NR == 1 || NR % 4 == 2' "$D/split/test.csv" > "$WORK/sample.csv"
n=$(( $(wc -l < "$WORK/sample.csv") - 1 ))
full="$(dirname "$D")/full-balanced/model.safetensors"
[ "$SPLIT" = imbalanced ] && full="$(dirname "$D")/full-imbalanced/model.safetensors"
started=$(date +%s)
{
  echo "# Grad-CAM faithfulness: does it tell good models from bad?"
  echo
  echo "Command: \`SEED=$SEED SPLIT=$SPLIT bash bench/gradcam-faithfulness.sh\` (models from \`make bench-paper\`: EfficientNet-Lite0, 64 px, 3 epochs, $SPLIT shards of eye-fundus, seed $SEED). \`medmerge-trainer explain\` on $n evenly spaced held-out images per model, Grad-CAM of the predicted class at the last conv block."
  echo "Heat in foreground: share of heat on pixels that differ from the corners' plain background. Deletion / insertion AUC: area under the predicted class's probability as the hottest 1/16, 2/16, … of the pixels are replaced by the mean colour (lower is better) or revealed on a blurred copy (higher is better); Petsiuk et al. 2018. Deletion gain: the deletion area with the coldest pixels first minus with the hottest first (area between the curves; about 0: the map is noise to the model)."
  echo
  echo "| model | accuracy | mean confidence | heat in foreground | deletion AUC | insertion AUC | insertion − deletion | deletion gain |"
  echo "|---|---|---|---|---|---|---|---|"
  for m in control dv pm shard-1 shard-2 shard-3 shard-4 dv-bn-recalibrate dv-averaged-epoch-head full; do
    model="$D/models/$m.safetensors"; [ "$m" = full ] && model="$full"
    [ -f "$model" ] || continue
    "$T" explain --model "$model" --input "$WORK/sample.csv" --out "$WORK/$m" > /dev/null
    python3 - "$WORK/$m/explanations.csv" "$m" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
mean = lambda k: sum(float(r[k]) for r in rows if r[k]) / max(1, sum(1 for r in rows if r[k]))
acc = sum(r["label"] == r["predicted"] for r in rows) / len(rows)
d, i = mean("deletion_auc"), mean("insertion_auc")
print(f"| {sys.argv[2]} | {100 * acc:.1f} % | {mean('probability'):.3f} | {100 * mean('foreground_fraction'):.1f} % | {d:.3f} | {i:.3f} | {i - d:+.3f} | {mean('deletion_gain'):+.3f} |")
PY
  done
  echo
  echo "$(( $(date +%s) - started )) s on 2 CPU cores."
} > bench/results/gradcam-faithfulness.md.tmp
mv bench/results/gradcam-faithfulness.md.tmp bench/results/gradcam-faithfulness.md
cat bench/results/gradcam-faithfulness.md
