"""Assembles bench/results/paper-table.{md,json} from bench/paper-table.sh's evaluations:
mean ± sd over seeds of every model, per split kind, and each model's gain over the best single
hospital of the same seed."""
import json
import os
import platform
import statistics
import sys

work, elapsed, out, command, size, epochs, seeds, splits = sys.argv[1:9]
row_set = sys.argv[9] if len(sys.argv) > 9 else "paper"
eval_name = sys.argv[10] if len(sys.argv) > 10 else "eval"
elapsed = int(elapsed)
seeds, splits = seeds.split(), splits.split()

ROWS = [
    ("dv1-averaged-epoch-head", "**data vector λ 1.0 + averaged epoch + closed-form head (parallel; the default before λ 1.5 and 2.0)**"),
    ("dv-averaged-epoch-head", "data vector λ 0.5 + averaged epoch + closed-form head (parallel)"),
    ("dv-averaged-epoch", "data vector λ 0.5 + averaged epoch (parallel)"),
    ("dv-closed-form-head", "data vector λ 0.5 + BN recalibration + closed-form head (parallel, no training)"),
    ("dv-bn-recalibrate", "data vector λ 0.5 + BN recalibration (parallel, no training)"),
    ("dv-finetune-epoch", "data vector λ 0.5 + one epoch per shard in turn (the paper; shards wait on each other)"),
    ("dv", "data vector λ 0.5, no restoration"),
    ("pm-averaged-epoch-head", "parameter mean + averaged epoch + closed-form head"),
    ("pm-averaged-epoch", "parameter mean + averaged epoch"),
    ("pm-bn-recalibrate", "parameter mean + BN recalibration"),
    ("pm", "parameter mean, no restoration"),
    ("control-averaged-epoch-head", "control: pretrained + averaged heads + averaged epoch + closed-form head (no vectors)"),
    ("best-shard", "best single hospital (of 4, per seed)"),
    ("full", "full training (all shards pooled; needs the data in one place)"),
]
# ROWS=default-candidates: the candidates for the default restoration (all parallel), against
# the best hospital and full training.
CANDIDATE_ROWS = [
    ("dv1-averaged-epoch-head", "data vector λ 1.0 + averaged epoch + closed-form head"),
    ("dv15-averaged-epoch-head", "data vector λ 1.5 + averaged epoch + closed-form head (the default before λ 2.0)"),
    ("dv2-averaged-epoch-head", "**data vector λ 2.0 + averaged epoch + closed-form head (the default)**"),
    ("dv1-averaged-epoch-averaged-epoch-head", "data vector λ 1.0 + two averaged epochs + closed-form head"),
    ("dv15-averaged-epoch-averaged-epoch-head", "data vector λ 1.5 + two averaged epochs + closed-form head"),
    ("best-shard", "best single hospital (of 4, per seed)"),
    ("full", "full training (all shards pooled; needs the data in one place)"),
]
ROWS = {"paper": ROWS, "default-candidates": CANDIDATE_ROWS}[row_set]
METRICS = ["accuracy", "balanced_accuracy", "macro_f1", "macro_auroc"]
KINDS = {
    "iid": "IID: 4 equal random shards",
    "dirichlet": "label skew: Dirichlet(0.5) shards",
    "size": "size skew: shards of 50/25/15/10 %",
    "imbalanced": "imbalanced variant: classes subsampled to 70/15/10/5 %, 4 equal random shards",
}


def key_of(path):
    name = os.path.basename(path).replace(".safetensors", "")
    return "full" if name == "model" else name


def mean_sd(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


result = {"command": command, "seconds": elapsed, "image_size": int(size), "epochs": int(epochs), "seeds": seeds, "splits": {}}
md = []
for kind in splits:
    per_seed = {}
    shard_sizes = []
    for seed in seeds:
        path = os.path.join(work, f"seed-{seed}", kind, f"{eval_name}.json")
        if not os.path.exists(path):
            continue
        report = json.load(open(path))
        rows = {key_of(c["id"]): c["metrics"] for c in report["candidates"]}
        shards = [rows[k] for k in rows if k.startswith("shard-")]
        rows["best-shard"] = {m: max((s[m] for s in shards if s[m] is not None), default=None) for m in METRICS}
        per_seed[seed] = (rows, report["test_images"])
        txt = os.path.join(work, f"seed-{seed}", kind, "split.txt")
        if os.path.exists(txt):
            shard_sizes.append([int(l.split(":")[1].split()[0]) for l in open(txt) if l.startswith("shard-")])
    if not per_seed:
        continue
    headline = "balanced_accuracy" if kind == "imbalanced" else "accuracy"
    table = []
    for key, label in ROWS:
        entry = {"key": key, "model": label}
        for m in METRICS:
            entry[m] = mean_sd([rows[key][m] for rows, _ in per_seed.values() if key in rows])
        gains = [rows[key][headline] - rows["best-shard"][headline] for rows, _ in per_seed.values() if key in rows]
        entry["gain_over_best_shard"] = mean_sd(gains)
        table.append(entry)
    result["splits"][kind] = {"headline": headline, "seeds": list(per_seed), "test_images": [n for _, n in per_seed.values()],
                              "shard_sizes": shard_sizes, "rows": table}
    md.append(f"## {KINDS.get(kind, kind)}\n")
    md.append(f"Seeds {', '.join(per_seed)}; test images per seed {', '.join(str(n) for _, n in per_seed.values())}; "
              f"shard sizes {'; '.join('/'.join(map(str, s)) for s in shard_sizes)}. Headline: {headline.replace('_', ' ')}.\n")
    md.append(f"| model | accuracy | balanced acc. | macro-F1 | macro AUROC | {headline.replace('_', ' ')} − best hospital |")
    md.append("|---|---|---|---|---|---|")
    pct = lambda v: "–" if v[0] is None else f"{100 * v[0]:.1f} ± {100 * v[1]:.1f} %"
    num = lambda v: "–" if v[0] is None else f"{v[0]:.3f} ± {v[1]:.3f}"
    gain = lambda v: "–" if v[0] is None else f"{100 * v[0]:+.1f} ± {100 * v[1]:.1f}"
    for e in table:
        if e["accuracy"][0] is None:
            continue
        md.append(f"| {e['model']} | {pct(e['accuracy'])} | {pct(e['balanced_accuracy'])} | {num(e['macro_f1'])} | {num(e['macro_auroc'])} | {gain(e['gain_over_best_shard'])} |")
    md.append("")

json.dump(result, open(out + ".json", "w"), indent=2)
with open(out + ".md", "w") as f:
    data_name = os.path.basename(work).rsplit('-', 2)[0]
    title = {"paper": f"Merging and restoration on {data_name}: IID and non-IID hospitals",
             "default-candidates": f"Candidates for the default restoration on {data_name}"}[row_set]
    f.write(f"# {title}\n\n")
    done = {k: v["seeds"] for k, v in result["splits"].items()}
    missing = [f"{k} seed {s}" for k in splits for s in seeds if s not in done.get(k, [])]
    if missing:
        f.write(f"**Incomplete**: seeds {', '.join(seeds)} were asked for; not yet run: {', '.join(missing)}. "
                "The same command resumes from its cache.\n\n")
    steps = [os.path.join(work, f"seed-{s}", k, f"{eval_name}.seconds") for k in splits for s in seeds]
    total = sum(int(open(p).read()) for p in steps if os.path.exists(p))
    f.write(f"Command: `{command}` ({max(total, elapsed) // 60} min on {os.cpu_count()} CPU cores, {platform.machine()}, "
            "summed over the runs that computed the table's steps).\n\n")
    f.write(f"EfficientNet-Lite0 (ImageNet), {size} px, {epochs} epochs per hospital, Adam 1e-4, batch 32, class-weighted "
            "cross-entropy, random flips; a stratified 20 % test set per seed. Restoration epochs use the same settings "
            "for one epoch. Mean ± sd over seeds; the last column is the headline metric minus that of the best single "
            "hospital of the same seed.\n\n")
    f.write("\n".join(md))
