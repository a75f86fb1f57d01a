"""Assembles bench/results/paper-table.{md,json} from the pipeline's and the extra rows' metrics."""
import json
import os
import platform
import sys

pipeline, extra, elapsed, command = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
p = json.load(open(pipeline))
x = json.load(open(extra))
names = {
    "dv1.0-bn": "data vector λ 1.0 + BN recalibration",
    "dv0.5-none": "data vector λ 0.5, no restoration",
    "pm-none": "parameter mean, no restoration",
    "data-vector-epoch": "data vector λ 0.5 + one epoch per shard (the paper)",
    "params-mean-epoch": "parameter mean + one epoch per shard",
    "pretrained-restored-epoch": "control: pretrained + averaged heads + one epoch per shard (no vectors)",
}
rows = [(c["description"], c["metrics"]) for c in p["candidates"]]
for c in x["candidates"]:
    key = os.path.basename(c["id"]).replace(".safetensors", "")
    rows.append((names.get(key, key), c["metrics"]))
out = {"command": command, "seconds": elapsed, "test_images": p["test_images"], "classes": p["classes"],
       "settings": p["spec"], "rows": [{"model": n, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
       "balanced_accuracy": m["balanced_accuracy"], "macro_auroc": m["macro_auroc"]} for n, m in rows]}
json.dump(out, open(os.path.join(os.path.dirname(__file__), "results", "paper-table.json"), "w"), indent=2)
print("# The paper's table on eye-fundus\n")
print(f"Command: `{command}` ({elapsed // 60} min on {os.cpu_count()} CPU cores, {platform.machine()}).\n")
t = p["spec"]["training"]
print(f"EfficientNet-Lite0 (ImageNet), {p['spec']['model']['imageSize']} px, 4 equal random shards + stratified 20 % test "
      f"({p['test_images']} images), Adam {t['learningRate']}, {t['epochs']} epochs, batch {t['batchSize']}, "
      f"class-weighted CE, random flips, seed {t['seed']}.\n")
print("| model | accuracy | macro-F1 | balanced acc. | macro AUROC |\n|---|---|---|---|---|")
for n, m in rows:
    auc = "n/a" if m["macro_auroc"] is None else f"{m['macro_auroc']:.3f}"
    print(f"| {n} | {100*m['accuracy']:.1f} % | {m['macro_f1']:.3f} | {100*m['balanced_accuracy']:.1f} % | {auc} |")
