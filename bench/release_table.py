"""Assembles bench/results/release.{md,json} from bench/release.sh's evaluations.

Usage: release_table.py WORK SECONDS OUT COMMAND SEEDS CLIP CONFIG...
"""
import json
import math
import os
import statistics
import struct
import sys

work, elapsed, out, command, seeds, clip = sys.argv[1:7]
configs = sys.argv[7:]
seeds = seeds.split()


def header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def mean_sd(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def pct(v):
    return "–" if v[0] is None else f"{100 * v[0]:.1f} ± {100 * v[1]:.1f}"


def describe(c):
    if c.startswith("dp-"):
        return f"DP ε {c[3:]}, δ 1e-6, clip {clip}"
    if c.startswith("topk-"):
        return f"top-k {c[5:]}"
    return c


rows, per_seed = [], {}
for seed in seeds:
    path = os.path.join(work, f"seed-{seed}", "iid", "release", "eval.json")
    if os.path.exists(path):
        report = json.load(open(path))
        per_seed[seed] = {os.path.basename(c["id"]).replace(".safetensors", ""): c["metrics"] for c in report["candidates"]}
best = [max(m["accuracy"] for k, m in r.items() if k.startswith("shard-")) for r in per_seed.values()]
for c in configs:
    for variant, restoration in [(c, "averaged epoch + head (default)"), (f"{c}-bn", "batch-norm recalibration only")]:
        accs = [r[variant]["accuracy"] for r in per_seed.values() if variant in r]
        refused = [s for s in seeds if os.path.exists(os.path.join(work, f"seed-{s}", "iid", "release", c, "refused.txt"))]
        if refused and variant == c:
            restoration = "merge refused: non-finite model"
        elif not accs:
            continue
        seed0 = os.path.join(work, f"seed-{seeds[0]}", "iid", "release", c, "vector-1.safetensors")
        meta = header(seed0).get("__metadata__", {})
        release = json.loads(meta.get("release", "{}"))
        sigma = (release.get("privacy") or {}).get("noiseStddev")
        gains = [r[variant]["accuracy"] - b for r, b in zip(per_seed.values(), best) if variant in r]
        rows.append({"release": describe(c), "restoration": restoration, "bytes_per_vector": os.path.getsize(seed0),
                     "noise_stddev": sigma, "accuracy": mean_sd(accs), "gain_over_best_hospital": mean_sd(gains), "per_seed": accs,
                     "refused_seeds": refused})

result = {"command": command, "seconds": int(elapsed), "seeds": list(per_seed), "best_hospital": mean_sd(best), "rows": rows}
json.dump(result, open(out + ".json", "w"), indent=2)
md = ["# Vector releases: encodings and differential privacy against accuracy", "",
      f"`{command}` ({int(elapsed) // 60} min; seeds {', '.join(per_seed)}; eye-fundus, IID 4 hospitals, EfficientNet-Lite0 ImageNet 64 px, 3 epochs, λ 2.0).",
      "Mean ± sd over seeds; the best single hospital: " + pct(mean_sd(best)) + ".", "",
      "| release | restoration | bytes per vector | noise σ per entry | accuracy | − best hospital |", "|---|---|---|---|---|---|"]
for r in rows:
    sigma = "–" if r["noise_stddev"] is None else f"{r['noise_stddev']:.3g}"
    g = r["gain_over_best_hospital"]
    gain = "–" if g[0] is None else f"{100 * g[0]:+.1f}"
    md.append(f"| {r['release']} | {r['restoration']} | {r['bytes_per_vector'] / 1e6:.1f} MB | {sigma} | {pct(r['accuracy'])} | {gain} |")
plain = header(os.path.join(work, f"seed-{seeds[0]}", "iid", "release", "float32", "vector-1.safetensors"))
entries = sum(math.prod(t["shape"]) for k, t in plain.items() if k != "__metadata__" and not k.endswith(("running_mean", "running_var")))
private = [r for r in rows if r["noise_stddev"] is not None and r["restoration"].startswith("averaged")]
md += ["", "int8 and top-k encode weight matrices and kernels only (heads, biases and batch-norm tensors stay float32). "
       f"A vector has {entries / 1e6:.1f} M covered entries, so the privacy noise's norm σ·√d is "
       + ", ".join(f"{r['noise_stddev'] * math.sqrt(entries) / float(clip):.0f}x (ε {r['release'].split()[2].rstrip(',')})" for r in private)
       + f" the clipped vector's norm ({clip}): the merged model carries no signal and answers at chance, whatever the restoration."]
result["covered_entries"] = entries
json.dump(result, open(out + ".json", "w"), indent=2)
open(out + ".md", "w").write("\n".join(md) + "\n")
