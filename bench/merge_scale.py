"""Merge scale: wall time and peak RSS of `medmerge-merge` (and of `medmerge-trainer merge`, the
same merge plus a libtorch probe of the merged model) for N data vectors of
ResNet50 (or, with SYNTHETIC_GB set, of a synthetic model of that many GB: ResNet50's head plus
64 MiB filler tensors), against a PyTorch reference that loads every state dict into memory (the
usual script; skipped where that would not fit in memory), against mergekit's task arithmetic
(`mergekit-pytorch`, when MERGEKIT names its executable; it takes fine-tuned models, so those are
written for it after the vectors are done with), and the machine's I/O floor for the same bytes:
reading every input from the page cache plus writing one model durably.

usage: merge_scale.py TRAINER MERGE WORK OUT_MD N [N ...]
"""
import glob, hashlib, json, os, shutil, subprocess, sys, time

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

REFERENCE = r'''
import sys, torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
base_path, out, lam, *vectors = sys.argv[1:]
base = load_file(base_path)
with safe_open(base_path, "pt") as f:
    meta = f.metadata()
taus = [load_file(v) for v in vectors]          # every hospital's vector in memory at once
merged = {}
for name, w in base.items():
    if name.startswith("fc."):                   # new heads: averaged
        merged[name] = torch.stack([t[name] for t in taus]).mean(0)
    else:
        merged[name] = w + float(lam) * sum(t[name] for t in taus)
save_file(merged, out, metadata=meta)
'''


# Peak RSS is measured by a small launcher process: Linux carries a process's peak RSS across
# exec, so a command forked straight from this script (which holds the generated tensors) would
# report this script's memory as its own.
MEASURE = r'''
import json, os, subprocess, sys, time
started = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(proc.pid, 0)
seconds = time.perf_counter() - started
if status != 0:
    sys.exit(f"{sys.argv[1:4]} failed: {proc.stderr.read().decode()[-2000:]}")
print(json.dumps([seconds, usage.ru_maxrss / 1024]))
'''


def run(cmd):
    """Runs cmd; returns (seconds, peak RSS in MiB) of that command alone."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], stdout=subprocess.PIPE, check=True)
    seconds, rss = json.loads(out.stdout)
    return seconds, rss


REPEATS = 5


def median_run(cmd, out=None):
    """The median of REPEATS runs of cmd (a sub-second command on a shared 2-core machine varies
    by 2x from one run to the next); returns (seconds, largest peak RSS in MiB). `out`, the file
    cmd writes, is removed before each run, untimed, as the I/O floor removes its own: replacing
    a file would add the old one's deletion to the time."""
    runs = []
    for _ in range(REPEATS):
        if out and os.path.exists(out):
            os.remove(out)
        runs.append(run(cmd))
    return sorted(s for s, _ in runs)[REPEATS // 2], max(r for _, r in runs)


def noisy_copies(template, n):
    """Yields (i, metadata, tensors) for n distinct vectors: the template plus seeded noise."""
    with safe_open(template, "np") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for i in range(n):
        rng = np.random.default_rng(i)
        yield i, meta, {k: (v + rng.standard_normal(v.shape, dtype=np.float32) * 1e-4).astype(np.float32) for k, v in tensors.items()}


def make_vectors(template, work, n):
    """n data vectors, each with its shard name; existing ones are kept."""
    paths = [os.path.join(work, f"v{i}.safetensors") for i in range(n)]
    if not all(os.path.exists(p) for p in paths):
        for i, meta, tensors in noisy_copies(template, n):
            save_file(tensors, paths[i], metadata={**meta, "shard": f"h{i}"})
    return paths


def make_models(base, template, work, n):
    """The fine-tuned models the same n vectors stand for (base + vector; the head as is), for
    tools that take models rather than vectors."""
    with safe_open(base, "np") as f:
        pre = {k: f.get_tensor(k) for k in f.keys()}
    paths = []
    for i, _, tensors in noisy_copies(template, n):
        paths.append(os.path.join(work, f"m{i}.safetensors"))
        save_file({k: v if k.startswith("fc.") else pre[k] + v for k, v in tensors.items()}, paths[-1])
    return paths


def io_floor(inputs, out):
    """Seconds to read every input from the warm page cache and write one output-sized file
    durably (the median of REPEATS tries)."""
    subprocess.run(["cat", *inputs], stdout=subprocess.DEVNULL, check=True)  # warm the cache
    tries = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        subprocess.run(["cat", *inputs], stdout=subprocess.DEVNULL, check=True)
        subprocess.run(["dd", f"if={inputs[-1]}", f"of={out}", "bs=1M", "conv=fsync", "status=none"], check=True)
        tries.append(time.perf_counter() - started)
        os.remove(out)
    return sorted(tries)[REPEATS // 2]


def sample(path_or_dir, names):
    """The named tensors of a safetensors file, or of the one or more files in a directory."""
    files = sorted(glob.glob(os.path.join(path_or_dir, "*.safetensors"))) if os.path.isdir(path_or_dir) else [path_or_dir]
    found = {}
    for file in files:
        with safe_open(file, "np") as f:
            found.update({k: f.get_tensor(k) for k in f.keys() if k in names})
    return found


def mergekit(executable, base, models, lam, work):
    """Runs mergekit's task arithmetic (base + λ·Σ(model - base)); returns (seconds, RSS, out dir)."""
    config, out = os.path.join(work, "mergekit.yaml"), os.path.join(work, "merged-mergekit")
    shutil.rmtree(out, ignore_errors=True)
    with open(config, "w") as f:
        f.write(f"merge_method: task_arithmetic\nbase_model: {base}\ndtype: float32\nout_dtype: float32\nmodels:\n")
        f.writelines(f"  - model: {m}\n    parameters: {{weight: {lam}}}\n" for m in models)
    seconds, rss = run([executable, config, out])
    return seconds, rss, out


def synthetic(work, gb):
    """A ~gb GB base and template vector: the ResNet50 head plus 64 MiB filler tensors."""
    base, template = os.path.join(work, f"base-{gb}gb.safetensors"), os.path.join(work, f"template-{gb}gb.safetensors")
    if os.path.exists(template):
        return base, template
    with safe_open(os.path.join(work, "base.safetensors"), "np") as f:
        base_meta = f.metadata()
        head = {k: f.get_tensor(k) for k in f.keys() if k.startswith("fc.")}
    with safe_open(os.path.join(work, "template-vector.safetensors"), "np") as f:
        vector_meta = f.metadata()
    fillers = int(gb * 1024 / 64)
    rng = np.random.default_rng(7)
    tensors = {**head, **{f"filler.{i:03d}.weight": rng.standard_normal((4096, 4096), dtype=np.float32) * 0.01 for i in range(fillers)}}
    save_file(tensors, base, metadata=base_meta)
    digest = hashlib.sha256(open(base, "rb").read()).hexdigest()
    save_file({k: v * 0.1 for k, v in tensors.items()}, template, metadata={**vector_meta, "base_digest": digest})
    return base, template


def main():
    trainer, merger, work, out_md, *ns = sys.argv[1:]
    ns = [int(n) for n in ns]
    base = os.path.join(work, "base.safetensors")
    template = os.path.join(work, "template-vector.safetensors")
    gb = float(os.environ.get("SYNTHETIC_GB", "0"))
    if gb:
        base, template = synthetic(work, gb)
    for stale in [f for f in os.listdir(work) if f[0] in "vm" and f[1].isdigit() and f.endswith(".safetensors")]:
        os.remove(os.path.join(work, stale))
    vectors = make_vectors(template, work, max(ns))
    size = os.path.getsize(vectors[0])
    with safe_open(base, "np") as f:
        by_size = sorted(f.keys(), key=lambda k: -np.prod(f.get_slice(k).get_shape()))
    checked = [k for k in by_size if not k.startswith("fc.")][:3]  # largest pretrained tensors
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows, merged = {}, {}
    start_s, _ = median_run([trainer, "--help"])  # the trainer's process start alone: loading libtorch
    merge_start_s, _ = median_run([merger, "--help"])
    for n in ns:
        vs = vectors[:n]
        floor = io_floor([*vs, base], os.path.join(work, "floor.bin"))
        out = os.path.join(work, "merged.safetensors")
        flags = ["--base", base, *sum((["--vector", f"h{i}={v}"] for i, v in enumerate(vs)), []), "--lambda", "0.5", "--out", out]
        # The trainer's merge loads the result into the architecture it names; the synthetic
        # model's filler tensors are no architecture, so it would (rightly) refuse them.
        t_s, t_rss = median_run([trainer, "--threads", "2", "merge", *flags], out) if not gb else (float("nan"), float("nan"))
        m_s, m_rss = median_run([merger, *flags], out)
        merged[n] = sample(out, checked)
        if (n + 2) * size < memory / 2:
            r_s, r_rss = run([sys.executable, "-c", REFERENCE, base, os.path.join(work, "merged-ref.safetensors"), "0.5", *vs])
        else:
            r_s, r_rss = float("nan"), float("nan")  # would not fit in memory
        rows[n] = dict(n=n, floor_s=floor, medmerge_s=m_s, medmerge_rss_mib=m_rss, trainer_s=t_s, trainer_rss_mib=t_rss, reference_s=r_s, reference_rss_mib=r_rss)
        print(json.dumps(rows[n]), flush=True)
    executable = os.environ.get("MERGEKIT")
    if executable:
        # mergekit reads fine-tuned models: the vectors make way for them on disk.
        for v in vectors:
            os.remove(v)
        models = make_models(base, template, work, max(ns))
        for n in ns:
            k_s, k_rss, out = mergekit(executable, base, models[:n], 0.5, work)
            theirs = sample(out, checked)
            diff = max(float(np.abs(theirs[k] - merged[n][k]).max()) for k in checked)
            rows[n].update(mergekit_s=k_s, mergekit_rss_mib=k_rss, mergekit_max_diff=diff)
            print(json.dumps(rows[n]), flush=True)
            shutil.rmtree(out)
    write_report(out_md, gb, size, executable, rows.values(), start_s, merge_start_s)


def write_report(out_md, gb, size, mergekit_used, rows, start_s, merge_start_s):
    model = f"a synthetic {gb:g} GB model (ResNet50 head + 64 MiB filler tensors)" if gb else "ResNet50"
    with open(out_md, "w") as f:
        f.write(f"# Merge scale: N data vectors of {model}\n\n")
        f.write(f"Command: `{'SYNTHETIC_GB=' + format(gb, 'g') + ' ' if gb else ''}bash bench/merge-scale.sh` ({os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}). "
                f"Each vector is {size / 2**20:.0f} MiB ({model}, 4 classes, f32), λ = 0.5.\n\n"
                "- **medmerge**: `medmerge-merge`, streaming one tensor at a time (vectors read in 256 KiB pieces, a large tensor by two threads), every merged value checked finite and "
                f"every running variance non-negative before the model is published; plain Rust, no libtorch (process start {merge_start_s * 1000:.0f} ms). "
                f"The whole command, median of {REPEATS} runs (the I/O floor too).\n"
                "- **trainer merge**: `medmerge-trainer merge`, the same merge plus the trainer's check before publishing (the model loaded into libtorch, "
                f"a probe batch); its process start loads libtorch ({start_s:.2f} s: `medmerge-trainer --help`). The pipeline's merge stage runs this one.\n"
                "- **load-all**: PyTorch, `safetensors.torch.load_file` for every vector, then `base + λ·Σ τ` (the usual script).\n"
                "- **mergekit**: mergekit's `task_arithmetic` via `mergekit-pytorch` (raw safetensors files) on the fine-tuned models "
                "the same vectors stand for (base + vector); same f32 math, so the largest pretrained tensors are compared with medmerge's output "
                "(max |Δ|). It reads N models, medmerge N vectors: the same bytes." + ("" if mergekit_used else " *Not run (mergekit not installed).*") + "\n"
                "- **I/O floor**: reading the N vectors and the base from the warm page cache (`cat`) plus writing one model durably "
                "(`dd conv=fsync`): what any merge must at least do. *Share of floor* = floor time / medmerge time.\n\n"
                "Peak RSS is measured per command (`ru_maxrss` of a child started by a small launcher).\n\n")
        f.write("| N | medmerge time | medmerge peak RSS | share of I/O floor | trainer merge time | trainer merge peak RSS | load-all time | load-all peak RSS | mergekit time | mergekit peak RSS | mergekit max abs diff |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            ref = f"{r['reference_s']:.1f} s | {r['reference_rss_mib']:.0f} MiB" if r["reference_s"] == r["reference_s"] else "skipped: would not fit in memory | -"
            kit = f"{r['mergekit_s']:.1f} s | {r['mergekit_rss_mib']:.0f} MiB | {r['mergekit_max_diff']:.1e}" if "mergekit_s" in r else "- | - | -"
            trainer = f"{r['trainer_s']:.2f} s | {r['trainer_rss_mib']:.0f} MiB" if r["trainer_s"] == r["trainer_s"] else "not run: no real architecture to probe | -"
            f.write(f"| {r['n']} | {r['medmerge_s']:.2f} s | {r['medmerge_rss_mib']:.0f} MiB | {r['floor_s'] / r['medmerge_s']:.0%} ({r['floor_s']:.2f} s) | {trainer} | {ref} | {kit} |\n")


if __name__ == "__main__":
    main()
