//! Fixtures shared by the pipeline tests.
#![allow(dead_code)]

use std::path::Path;

use medmerge_trainer::{split, synth};

/// A tiny MergeJob (ResNet-18, random init, 32 px, generated images cut into `shards` shards
/// and a test set) in `dir`, storing artifacts in `dir/out`.
pub fn write_job(dir: &Path, extra_spec: &str, shards: usize) -> std::path::PathBuf {
    write_job_with_storage(dir, extra_spec, shards, "{local: {path: out}}")
}

/// [`write_job`] with the given `storage` (YAML flow mapping).
pub fn write_job_with_storage(dir: &Path, extra_spec: &str, shards: usize, storage: &str) -> std::path::PathBuf {
    let data = dir.join("images");
    synth::generate(&data, 3, 24, 32, 7).unwrap();
    let ds = medmerge_trainer::data::Dataset::open(&data, None).unwrap();
    let s = split::split(&ds, shards, 0.25, 1, &split::Skew::Equal);
    ds.subset(&s.test).write_manifest(&dir.join("test.csv")).unwrap();
    let mut shard_yaml = String::new();
    for (i, idx) in s.shards.iter().enumerate() {
        ds.subset(idx).write_manifest(&dir.join(format!("s{i}.csv"))).unwrap();
        shard_yaml.push_str(&format!("    - {{name: h{i}, data: {{path: s{i}.csv}}}}\n"));
    }
    let yaml = format!(
        "apiVersion: medmerge.io/v1alpha1\nkind: MergeJob\nmetadata: {{name: tiny}}\nspec:\n  model: {{architecture: resnet18, weights: random, imageSize: 32}}\n  shards:\n{shard_yaml}  training: {{epochs: 2, batchSize: 8, learningRate: 0.001}}\n  evaluation: {{data: {{path: test.csv}}}}\n  storage: {storage}\n{extra_spec}"
    );
    let job = dir.join("job.yaml");
    std::fs::write(&job, yaml).unwrap();
    job
}
