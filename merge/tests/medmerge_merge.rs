//! `medmerge-merge` as a user runs it: real files in, a published model (or a clear error and
//! nothing published) out.

use std::path::{Path, PathBuf};
use std::process::Command;

use medmerge_crds::Architecture;
use medmerge_merge::checkpoint::{file_digest, ArtifactKind, ArtifactMeta};
use medmerge_merge::st::{f32_to_bytes, MappedFile, StreamWriter, TensorMeta};
use safetensors::Dtype;

/// The tensors of a tiny ResNet-like model: a conv weight, a batch norm's variance, a step
/// counter (I64) and the `fc.` head.
const SHAPES: [(&str, &[usize]); 3] = [("conv.weight", &[3]), ("bn.running_var", &[2]), ("fc.weight", &[2, 2])];

fn meta(kind: ArtifactKind, base_digest: &str, shard: Option<&str>) -> ArtifactMeta {
    ArtifactMeta {
        kind,
        arch: Architecture::Resnet18,
        classes: vec!["a".into(), "b".into()],
        image_size: 32,
        base_digest: base_digest.into(),
        shard: shard.map(Into::into),
        class_counts: vec![3, 1],
        multi_label: false,
    }
}

fn write(path: &Path, meta: &ArtifactMeta, values: &[&[f32]]) {
    let mut tensors: Vec<TensorMeta> = SHAPES.iter().map(|(name, shape)| TensorMeta { name: (*name).into(), dtype: Dtype::F32, shape: shape.to_vec() }).collect();
    tensors.push(TensorMeta { name: "bn.num_batches_tracked".into(), dtype: Dtype::I64, shape: vec![] });
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let mut w = StreamWriter::create(path, tensors.clone(), &meta.to_map()).unwrap();
    for t in &tensors {
        match SHAPES.iter().position(|(name, _)| *name == t.name) {
            Some(i) => w.write(&t.name, &f32_to_bytes(values[i])).unwrap(),
            None => w.write(&t.name, &7i64.to_le_bytes()).unwrap(),
        }
    }
    w.finish().unwrap();
}

/// A base and two vectors (h1, h2) in a temporary directory.
fn setup(dir: &Path, h2_conv: [f32; 3]) -> (PathBuf, Vec<String>) {
    let base = dir.join("base.safetensors");
    write(&base, &meta(ArtifactKind::Model, "", None), &[&[1.0, 2.0, 3.0], &[0.5, 0.25], &[9.0; 4]]);
    let digest = file_digest(&base).unwrap();
    let mut vectors = Vec::new();
    for (shard, conv, head) in [("h1", [0.5, -1.0, 0.0], [1.0, 2.0, 3.0, 4.0]), ("h2", h2_conv, [3.0, 2.0, 1.0, 0.0])] {
        let path = dir.join(format!("{shard}.safetensors"));
        write(&path, &meta(ArtifactKind::Vector, &digest, Some(shard)), &[&conv, &[0.1, -0.05], &head]);
        vectors.push(format!("--vector={shard}={}", path.display()));
    }
    (base, vectors)
}

fn merge(base: &Path, vectors: &[String], out: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_medmerge-merge")).arg("--base").arg(base).args(vectors).arg("--out").arg(out).args(extra).output().unwrap()
}

#[test]
fn merges_vectors_onto_the_base_and_averages_the_heads() {
    let dir = tempfile::tempdir().unwrap();
    let (base, vectors) = setup(dir.path(), [1.5, 1.0, -0.25]);
    let out = dir.path().join("merged.safetensors");
    let run = merge(&base, &vectors, &out, &["--lambda", "0.5"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let merged = MappedFile::open(&out).unwrap();
    assert_eq!(merged.f32("conv.weight").unwrap(), vec![1.0 + 1.0, 2.0, 3.0 - 0.125], "base + λ·Σ τ");
    assert_eq!(merged.f32("fc.weight").unwrap(), vec![2.0; 4], "the heads' mean");
    let var = merged.f32("bn.running_var").unwrap();
    assert!((var[0] - 0.6).abs() < 1e-6 && (var[1] - 0.2).abs() < 1e-6, "statistics: base + the shards' mean delta, not λ·Σ: {var:?}");
    assert_eq!(merged.bytes("bn.num_batches_tracked").unwrap(), 7i64.to_le_bytes(), "counters kept from the base");
    assert_eq!(ArtifactMeta::from_map(&out, merged.metadata(), ArtifactKind::Model).unwrap().base_digest, file_digest(&base).unwrap());
}

#[test]
fn a_merge_that_overflows_is_refused_by_tensor_and_publishes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (base, vectors) = setup(dir.path(), [3.0e38, 0.0, 0.0]);
    let out = dir.path().join("merged.safetensors");
    let run = merge(&base, &vectors, &out, &["--lambda", "2.0"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && stderr.contains("\"conv.weight\" overflows"), "{stderr}");
    assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains("merged")), "no merged file, finished or not");
}

#[test]
fn bad_flags_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = setup(dir.path(), [0.0; 3]);
    let out = dir.path().join("merged.safetensors");
    let run = merge(&base, &["--vector=h1".into()], &out, &[]);
    assert!(String::from_utf8_lossy(&run.stderr).contains("--vector h1: expected NAME=PATH"), "{}", String::from_utf8_lossy(&run.stderr));
    let (_, vectors) = setup(dir.path(), [0.0; 3]);
    let run = merge(&base, &vectors, &out, &["--method", "average-ish"]);
    assert!(String::from_utf8_lossy(&run.stderr).contains("--method average-ish: unknown merge method"));
    assert!(!out.exists());
}
