//! The streaming merge on small hand-made tensor files: exact values, and every refusal.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use medmerge_crds::{Architecture, HeadStrategy, MergeMethod};
use medmerge_trainer::checkpoint::{file_digest, ArtifactKind, ArtifactMeta};
use medmerge_trainer::merge::{merge_files, MergeOptions, ShardVector};
use medmerge_trainer::st::{f32_to_bytes, MappedFile, StreamWriter, TensorMeta};
use safetensors::tensor::Dtype;

fn meta(kind: ArtifactKind, digest: &str, classes: &[&str], counts: Vec<u64>) -> ArtifactMeta {
    ArtifactMeta {
        kind,
        arch: Architecture::Resnet18,
        classes: classes.iter().map(|c| c.to_string()).collect(),
        image_size: 32,
        base_digest: digest.into(),
        shard: None,
        class_counts: counts,
        multi_label: false,
    }
}

fn write(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)], meta: &ArtifactMeta) {
    let metas = tensors.iter().map(|(n, s, _)| TensorMeta { name: n.to_string(), dtype: Dtype::F32, shape: s.clone() }).collect();
    let mut w = StreamWriter::create(path, metas, &meta.to_map()).unwrap();
    for (n, _, v) in tensors {
        w.write(n, &f32_to_bytes(v)).unwrap();
    }
    w.finish().unwrap();
}

struct Fixture {
    dir: tempfile::TempDir,
    base: PathBuf,
    digest: String,
}

const CLASSES: [&str; 2] = ["a", "b"];

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.safetensors");
    write(
        &base,
        &[("conv.weight", vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]), ("fc.bias", vec![2], vec![0.0, 0.0]), ("fc.weight", vec![2, 2], vec![0.0; 4])],
        &meta(ArtifactKind::Model, "", &CLASSES, vec![]),
    );
    let digest = file_digest(&base).unwrap();
    Fixture { dir, base, digest }
}

impl Fixture {
    fn vector(&self, name: &str, conv: Vec<f32>, head_bias: Vec<f32>, samples: u64) -> ShardVector {
        self.vector_with(name, &[("conv.weight", vec![2, 2], conv), ("fc.bias", vec![2], head_bias), ("fc.weight", vec![2, 2], vec![1.0; 4])], &self.digest, &CLASSES, samples)
    }

    fn vector_with(&self, name: &str, tensors: &[(&str, Vec<usize>, Vec<f32>)], digest: &str, classes: &[&str], samples: u64) -> ShardVector {
        let path = self.dir.path().join(format!("{name}.safetensors"));
        let mut m = meta(ArtifactKind::Vector, digest, classes, vec![samples, 0]);
        m.shard = Some(name.into());
        write(&path, tensors, &m);
        ShardVector { shard: name.into(), path }
    }

    fn merge(&self, vectors: &[ShardVector], method: MergeMethod, heads: HeadStrategy) -> Result<BTreeMap<String, Vec<f32>>, String> {
        let out = self.dir.path().join("merged.safetensors");
        let opts = MergeOptions { method, lambda: 0.5, heads, ties_density: 1.0, dare_drop_rate: 0.0, seed: 1, pretrained_only: false };
        merge_files(&self.base, vectors, &opts, &out).map_err(|e| e.to_string())?;
        let f = MappedFile::open(&out).unwrap();
        Ok(f.tensors().map(|t| (t.name.clone(), f.f32(&t.name).unwrap())).collect())
    }

    fn merged_exists(&self) -> bool {
        std::fs::read_dir(self.dir.path()).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().contains("merged"))
    }
}

#[test]
fn data_vector_merge_adds_scaled_vectors_and_averages_heads() {
    let f = fixture();
    let a = f.vector("a", vec![2.0, 0.0, 0.0, -2.0], vec![1.0, 3.0], 10);
    let b = f.vector("b", vec![0.0, 4.0, 2.0, 0.0], vec![3.0, 5.0], 30);
    let m = f.merge(&[a.clone(), b.clone()], MergeMethod::DataVector, HeadStrategy::Mean).unwrap();
    assert_eq!(m["conv.weight"], vec![2.0, 4.0, 4.0, 3.0]);
    assert_eq!(m["fc.bias"], vec![2.0, 4.0]);
    let weighted = f.merge(&[a, b], MergeMethod::DataVector, HeadStrategy::SampleWeighted).unwrap();
    assert_eq!(weighted["fc.bias"], vec![2.5, 4.5]);
}

#[test]
fn params_mean_merge_is_the_mean_of_fine_tuned_weights() {
    let f = fixture();
    let a = f.vector("a", vec![2.0, 0.0, 0.0, -2.0], vec![0.0, 0.0], 1);
    let b = f.vector("b", vec![0.0, 4.0, 2.0, 0.0], vec![0.0, 0.0], 1);
    let m = f.merge(&[a, b], MergeMethod::ParamsMean, HeadStrategy::Mean).unwrap();
    assert_eq!(m["conv.weight"], vec![2.0, 4.0, 4.0, 3.0]);
}

#[test]
fn a_vector_from_another_base_is_refused_naming_the_shard() {
    let f = fixture();
    let a = f.vector("a", vec![0.0; 4], vec![0.0; 2], 1);
    let stale = f.vector_with("stale", &[("conv.weight", vec![2, 2], vec![0.0; 4]), ("fc.bias", vec![2], vec![0.0; 2]), ("fc.weight", vec![2, 2], vec![0.0; 4])], "0badbase", &CLASSES, 1);
    let e = f.merge(&[a, stale], MergeMethod::DataVector, HeadStrategy::Mean).unwrap_err();
    assert!(e.contains("shard stale") && e.contains("0badbase"), "{e}");
    assert!(!f.merged_exists(), "nothing may be published after a refusal");
}

#[test]
fn vectors_that_all_name_another_base_are_refused_before_publishing() {
    // Agreeing vectors are merged while the base is hashed; the claim is checked before the rename.
    let f = fixture();
    let tensors = [("conv.weight", vec![2, 2], vec![1.0; 4]), ("fc.bias", vec![2], vec![0.0; 2]), ("fc.weight", vec![2, 2], vec![0.0; 4])];
    let a = f.vector_with("a", &tensors, "0badbase", &CLASSES, 1);
    let b = f.vector_with("b", &tensors, "0badbase", &CLASSES, 1);
    let e = f.merge(&[a, b], MergeMethod::DataVector, HeadStrategy::Mean).unwrap_err();
    assert!(e.contains("shard a") && e.contains("0badbase") && e.contains(&f.digest), "{e}");
    assert!(!f.merged_exists(), "nothing may be published after a refusal");
}

#[test]
fn a_base_holding_nan_is_refused_naming_the_base_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.safetensors");
    write(&base, &[("conv.weight", vec![2], vec![1.0, f32::INFINITY]), ("fc.bias", vec![2], vec![0.0; 2])], &meta(ArtifactKind::Model, "", &CLASSES, vec![]));
    let digest = file_digest(&base).unwrap();
    let vector = dir.path().join("a.safetensors");
    let mut m = meta(ArtifactKind::Vector, &digest, &CLASSES, vec![1, 0]);
    m.shard = Some("a".into());
    write(&vector, &[("conv.weight", vec![2], vec![0.0; 2]), ("fc.bias", vec![2], vec![0.0; 2])], &m);
    let opts = MergeOptions { method: MergeMethod::DataVector, lambda: 0.5, heads: HeadStrategy::Mean, ties_density: 1.0, dare_drop_rate: 0.0, seed: 1, pretrained_only: false };
    let e = merge_files(&base, &[ShardVector { shard: "a".into(), path: vector }], &opts, &dir.path().join("merged.safetensors")).unwrap_err().to_string();
    assert!(e.contains("base.safetensors") && e.contains("conv.weight"), "{e}");
    assert!(!dir.path().join("merged.safetensors").exists());
}

#[test]
fn wrong_shapes_missing_and_extra_tensors_are_refused_by_name() {
    let f = fixture();
    let good = f.vector("good", vec![0.0; 4], vec![0.0; 2], 1);
    type Tensors = Vec<(&'static str, Vec<usize>, Vec<f32>)>;
    let cases: Vec<(Tensors, &str)> = vec![
        (vec![("conv.weight", vec![4], vec![0.0; 4]), ("fc.bias", vec![2], vec![0.0; 2]), ("fc.weight", vec![2, 2], vec![0.0; 4])], "\"conv.weight\" is F32 [4]"),
        (vec![("fc.bias", vec![2], vec![0.0; 2]), ("fc.weight", vec![2, 2], vec![0.0; 4])], "lacks tensor \"conv.weight\""),
        (vec![("conv.weight", vec![2, 2], vec![0.0; 4]), ("extra", vec![1], vec![0.0]), ("fc.bias", vec![2], vec![0.0; 2]), ("fc.weight", vec![2, 2], vec![0.0; 4])], "unexpected tensor \"extra\""),
    ];
    for (tensors, expected) in cases {
        let bad = f.vector_with("bad", &tensors, &f.digest, &CLASSES, 1);
        let e = f.merge(&[good.clone(), bad], MergeMethod::DataVector, HeadStrategy::Mean).unwrap_err();
        assert!(e.contains("shard bad") && e.contains(expected), "{e} should mention {expected}");
        assert!(!f.merged_exists());
    }
}

#[test]
fn nan_or_inf_values_are_refused_naming_shard_and_tensor() {
    let f = fixture();
    let good = f.vector("good", vec![0.0; 4], vec![0.0; 2], 1);
    let bad = f.vector("nan", vec![0.0, f32::NAN, 0.0, 0.0], vec![0.0; 2], 1);
    let e = f.merge(&[good, bad], MergeMethod::DataVector, HeadStrategy::Mean).unwrap_err();
    assert!(e.contains("shard nan") && e.contains("conv.weight") && e.contains("NaN"), "{e}");
    assert!(!f.merged_exists(), "a failure mid-stream must not leave a merged file");
}

#[test]
fn mismatched_class_lists_are_refused() {
    let f = fixture();
    let good = f.vector("good", vec![0.0; 4], vec![0.0; 2], 1);
    let other = f.vector_with("other", &[("conv.weight", vec![2, 2], vec![0.0; 4]), ("fc.bias", vec![2], vec![0.0; 2]), ("fc.weight", vec![2, 2], vec![0.0; 4])], &f.digest, &["b", "a"], 1);
    let e = f.merge(&[good, other], MergeMethod::DataVector, HeadStrategy::Mean).unwrap_err();
    assert!(e.contains("shard other") && e.contains("classes"), "{e}");
}

#[test]
fn a_model_file_passed_as_a_vector_is_refused() {
    let f = fixture();
    let e = f.merge(&[ShardVector { shard: "oops".into(), path: f.base.clone() }], MergeMethod::DataVector, HeadStrategy::Mean).unwrap_err();
    assert!(e.contains("is a model file, expected data-vector"), "{e}");
}

#[test]
fn batch_norm_statistics_are_averaged_so_a_merged_variance_never_goes_negative() {
    // Two hospitals whose variances both fell from the base's 1.0 to 0.2: λ·Στ with λ = 1 would
    // give 1.0 - 0.8 - 0.8 = -0.6 (NaN logits in eval mode); the shards' mean is 0.2.
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.safetensors");
    let tensors = |var: f32, mean: f32, w: f32| {
        vec![("bn.running_var", vec![2], vec![var; 2]), ("bn.running_mean", vec![2], vec![mean; 2]), ("conv.weight", vec![2], vec![w; 2]), ("fc.bias", vec![2], vec![0.0; 2])]
    };
    write(&base, &tensors(1.0, 0.0, 1.0), &meta(ArtifactKind::Model, "", &CLASSES, vec![]));
    let digest = file_digest(&base).unwrap();
    let vectors: Vec<ShardVector> = ["a", "b"]
        .iter()
        .map(|shard| {
            let path = dir.path().join(format!("{shard}.safetensors"));
            let mut m = meta(ArtifactKind::Vector, &digest, &CLASSES, vec![1, 1]);
            m.shard = Some(shard.to_string());
            write(&path, &tensors(-0.8, 0.5, 0.5), &m);
            ShardVector { shard: shard.to_string(), path }
        })
        .collect();
    let opts = MergeOptions { method: MergeMethod::DataVector, lambda: 1.0, heads: HeadStrategy::Mean, ties_density: 1.0, dare_drop_rate: 0.0, seed: 1, pretrained_only: false };
    let out = dir.path().join("merged.safetensors");
    merge_files(&base, &vectors, &opts, &out).unwrap();
    let f = MappedFile::open(&out).unwrap();
    let merged: BTreeMap<String, Vec<f32>> = f.tensors().map(|t| (t.name.clone(), f.f32(&t.name).unwrap())).collect();
    assert!(merged["bn.running_var"].iter().all(|v| (v - 0.2).abs() < 1e-6), "the mean of the shards' variances: {:?}", merged["bn.running_var"]);
    assert_eq!(merged["bn.running_mean"], vec![0.5; 2]);
    assert_eq!(merged["conv.weight"], vec![2.0; 2], "weights still get base + λ·Στ");
}
