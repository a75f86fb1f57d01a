#!/usr/bin/env bash
# Runs examples/local-demo.yaml end to end. With DATA=<ImageFolder> it splits those images into
# 3 shards + a test set; without, it generates a small labelled image set and says so. Either
# way the hospitals differ as real ones do: each sees a label-skewed slice (Dirichlet 0.5), so
# none of them alone knows every class well.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
TRAINER="$CARGO_TARGET_DIR/debug/medmerge-trainer"
rm -rf demo-data/split medmerge-artifacts/runs/local/local-demo
if [ -z "${DATA:-}" ]; then
  echo "demo: no DATA given: generating a small labelled image set (noisy shapes, 4 classes x 60) in demo-data/generated"
  rm -rf demo-data/generated
  "$TRAINER" synth --out demo-data/generated --classes 4 --per-class 60 --size 64 --noise 70
  DATA=demo-data/generated
fi
"$TRAINER" split --data "$DATA" --out demo-data/split --shards 3 --test-fraction 0.2 --seed 3315 --dirichlet 0.5
"$TRAINER" --threads "${THREADS:-$(nproc)}" pipeline examples/local-demo.yaml
echo "demo: report at medmerge-artifacts/runs/local/local-demo/g1/eval/report.html (Markdown: report.md)"
