//! Bounded fuzzing of what reads untrusted input: the MergeJob parser (with validation and
//! planning after it) and the safetensors, artifact-metadata and batch-norm-statistics readers.
//! Random inputs and random corruptions of valid ones must give an error or a value, never a
//! panic, an abort or a hang. Case counts keep each property to seconds; raise
//! `PROPTEST_CASES` to search longer.

use std::path::Path;

use medmerge_crds::{validate_for_local, ArtifactLayout, StagePlan};
use medmerge_trainer::checkpoint::{ArtifactKind, ArtifactMeta};
use medmerge_trainer::pipeline::parse_strict;
use medmerge_trainer::restore::moments::{load_moments, save_moments};
use medmerge_trainer::st::MappedFile;
use proptest::prelude::*;

const VALID_JOB: &str = "apiVersion: medmerge.io/v1alpha1
kind: MergeJob
metadata: {name: fuzz, namespace: ns}
spec:
  model: {architecture: resnet18, weights: random, imageSize: 32, classes: [a, b]}
  shards:
    - {name: h0, data: {path: s0.csv}}
    - {name: h1, vector: incoming/h1.safetensors}
  training: {epochs: 2, batchSize: 8, learningRate: 0.001, validationFraction: 0.1}
  merge: {method: dataVector, lambda: 1.0, baselines: [paramsMean, shardModels]}
  restore: {mode: averagedEpochHead}
  evaluation: {data: {path: test.csv}}
  storage: {local: {path: out}, prefix: runs}
  cluster: {minShards: 1, stragglerDeadlineSeconds: 60}
";

/// Parse, then (if valid) validate and plan: everything a local run does before any I/O.
fn parse_validate_plan(text: &str) {
    if let Ok(job) = parse_strict(text) {
        if validate_for_local(&job.spec).is_ok() {
            let layout = ArtifactLayout::new(&job.spec.storage.prefix, "ns", "fuzz", 1);
            let plan = StagePlan::new(&job.spec, &layout);
            let _ = plan.ready(&Default::default());
            let _ = medmerge_crds::run_key(&job.spec);
        }
    }
}

/// Replaces `len` bytes at `at` (both taken modulo the input) with `with`.
fn corrupt(bytes: &[u8], at: usize, len: usize, with: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    if out.is_empty() {
        return with.to_vec();
    }
    let at = at % out.len();
    let end = (at + len % 16).min(out.len());
    out.splice(at..end, with.iter().copied());
    out
}

fn read_everything(path: &Path) {
    if let Ok(file) = MappedFile::open(path) {
        let names: Vec<String> = file.tensors().map(|t| t.name.clone()).collect();
        for name in &names {
            let _ = file.f32(name);
            let _ = file.f64(name);
        }
        let _ = ArtifactMeta::from_map(path, file.metadata(), ArtifactKind::Model);
        let _ = ArtifactMeta::from_map(path, file.metadata(), ArtifactKind::Vector);
    }
    let _ = load_moments(path);
}

/// A valid batch-norm statistics file (what `bn-stats` writes).
fn valid_stats(dir: &Path) -> Vec<u8> {
    let meta = ArtifactMeta {
        kind: ArtifactKind::BnStats,
        arch: medmerge_crds::Architecture::Resnet18,
        classes: vec!["a".into(), "b".into()],
        image_size: 32,
        base_digest: "0".repeat(64),
        shard: Some("h0".into()),
        class_counts: vec![3, 4],
        multi_label: false,
    };
    let path = dir.join("valid.safetensors");
    save_moments(&path, &[("bn1".to_string(), (12.0, vec![1.0, 2.0], vec![3.0, 5.0])), ("layer1.0.bn1".to_string(), (12.0, vec![0.5], vec![1.5]))].into(), &meta).unwrap();
    std::fs::read(path).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_mergejob_parser_never_panics_on_arbitrary_text(text in ".{0,400}") {
        parse_validate_plan(&text);
    }

    #[test]
    fn the_mergejob_parser_never_panics_on_a_corrupted_valid_job(at in 0usize..4096, len in 0usize..64, with in "[ -~\n]{0,12}") {
        let text = corrupt(VALID_JOB.as_bytes(), at, len, with.as_bytes());
        parse_validate_plan(&String::from_utf8_lossy(&text));
    }

    #[test]
    fn numbers_anywhere_in_a_valid_job_never_panic(field in 0usize..6, value in prop_oneof![any::<i64>().prop_map(|v| v.to_string()), any::<f64>().prop_map(|v| v.to_string()), Just(".nan".to_string()), Just("-.inf".to_string())]) {
        let fields = ["imageSize: 32", "epochs: 2", "batchSize: 8", "lambda: 1.0", "minShards: 1", "stragglerDeadlineSeconds: 60"];
        let (key, _) = fields[field].split_once(": ").unwrap();
        parse_validate_plan(&VALID_JOB.replace(fields[field], &format!("{key}: {value}")));
    }

    #[test]
    fn the_safetensors_and_statistics_readers_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        read_everything(&path);
    }

    #[test]
    fn the_readers_never_panic_on_a_corrupted_valid_file(at in 0usize..4096, len in 0usize..64, with in proptest::collection::vec(any::<u8>(), 0..12)) {
        let dir = tempfile::tempdir().unwrap();
        let valid = valid_stats(dir.path());
        let path = dir.path().join("f.safetensors");
        std::fs::write(&path, corrupt(&valid, at, len, &with)).unwrap();
        read_everything(&path);
    }

    #[test]
    fn the_readers_never_panic_on_a_corrupted_header(at in 8usize..400, with in "[ -~]{1,8}") {
        let dir = tempfile::tempdir().unwrap();
        let valid = valid_stats(dir.path());
        let path = dir.path().join("f.safetensors");
        std::fs::write(&path, corrupt(&valid, at, with.len(), with.as_bytes())).unwrap();
        read_everything(&path);
    }
}
