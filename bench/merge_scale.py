"""Merge scale: wall time and peak RSS of `medmerge-trainer merge` for N data vectors of
ResNet50 (or, with SYNTHETIC_GB set, of a synthetic model of that many GB: ResNet50's head plus
64 MiB filler tensors), against a PyTorch reference that loads every state dict into memory (the
usual script; skipped where that would not fit in memory), and the machine's read bandwidth for
the same bytes.

usage: merge_scale.py TRAINER WORK OUT_MD N [N ...]
"""
import hashlib, json, os, subprocess, sys, time

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


def run(cmd):
    """Runs cmd; returns (seconds, peak RSS in MiB) of that child alone."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if status != 0:
        sys.exit(f"{cmd[:3]} failed: {proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def make_vectors(template, work, n):
    """n distinct vectors: the template's tensors plus seeded noise, each with its shard name."""
    with safe_open(template, "np") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    paths = []
    for i in range(n):
        path = os.path.join(work, f"v{i}.safetensors")
        paths.append(path)
        if os.path.exists(path):
            continue
        rng = np.random.default_rng(i)
        noisy = {k: (v + rng.standard_normal(v.shape, dtype=np.float32) * 1e-4).astype(np.float32) for k, v in tensors.items()}
        save_file(noisy, path, metadata={**meta, "shard": f"h{i}"})
    return paths


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
    trainer, work, out_md, *ns = sys.argv[1:]
    ns = [int(n) for n in ns]
    base = os.path.join(work, "base.safetensors")
    template = os.path.join(work, "template-vector.safetensors")
    gb = float(os.environ.get("SYNTHETIC_GB", "0"))
    if gb:
        base, template = synthetic(work, gb)
        for stale in [f for f in os.listdir(work) if f.startswith("v") and f.endswith(".safetensors")]:
            os.remove(os.path.join(work, stale))
    vectors = make_vectors(template, work, max(ns))
    size = os.path.getsize(vectors[0])
    rows = []
    for n in ns:
        vs = vectors[:n]
        subprocess.run(["cat", *vs, base], stdout=subprocess.DEVNULL, check=True)  # warm the cache
        started = time.perf_counter()
        subprocess.run(["cat", *vs, base], stdout=subprocess.DEVNULL, check=True)
        read_gbs = (n + 1) * size / (time.perf_counter() - started) / 1e9
        m_s, m_rss = run([trainer, "--threads", "2", "merge", "--base", base, *sum((["--vector", f"h{i}={v}"] for i, v in enumerate(vs)), []), "--lambda", "0.5", "--out", os.path.join(work, "merged.safetensors")])
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if (n + 2) * size < memory / 2:
            r_s, r_rss = run([sys.executable, "-c", REFERENCE, base, os.path.join(work, "merged-ref.safetensors"), "0.5", *vs])
        else:
            r_s, r_rss = float("nan"), float("nan")  # would not fit in memory
        rows.append((n, m_s, m_rss, (n + 2) * size / m_s / 1e9, r_s, r_rss, read_gbs))
        print(json.dumps({"n": n, "medmerge_s": m_s, "medmerge_rss_mib": m_rss, "reference_s": r_s, "reference_rss_mib": r_rss, "cat_gbs": read_gbs}), flush=True)
    with open(out_md, "w") as f:
        model = f"a synthetic {gb:g} GB model (ResNet50 head + 64 MiB filler tensors)" if gb else "ResNet50"
        f.write(f"# Merge scale: N data vectors of {model}\n\n")
        f.write(f"Command: `{'SYNTHETIC_GB=' + format(gb, 'g') + ' ' if gb else ''}bash bench/merge-scale.sh` ({os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}). Each vector is {size / 2**20:.0f} MiB "
                f"({model}, 4 classes, f32). medmerge streams one tensor at a time from memory-mapped vectors; the reference "
                "(PyTorch, `safetensors.torch.load_file` for every vector, then `base + λ·Σ τ`) holds them all. "
                "Throughput = bytes read and written / wall time; `cat` = reading the same files from the warm page cache.\n\n")
        f.write("| N | medmerge time | medmerge peak RSS | medmerge GB/s | reference time | reference peak RSS | `cat` GB/s |\n|---|---|---|---|---|---|---|\n")
        for n, m_s, m_rss, m_gbs, r_s, r_rss, cat in rows:
            ref = f"{r_s:.1f} s | {r_rss:.0f} MiB" if r_s == r_s else "skipped: would not fit in memory | -"
            f.write(f"| {n} | {m_s:.1f} s | {m_rss:.0f} MiB | {m_gbs:.2f} | {ref} | {cat:.2f} |\n")


if __name__ == "__main__":
    main()
