//! The pipeline with `storage.s3` pointing at a real S3 server (run by `make test-s3`): every
//! stage runs in a fresh local cache, as separate cluster pods would, and still finds its inputs
//! and publishes its outputs through the bucket.

mod common;

use medmerge_store::{BlockingStore, S3Config};
use medmerge_trainer::pipeline::{Job, Runner};
use tch::Device;

#[test]
#[ignore = "needs an S3 server: run `make test-s3`"]
fn a_mergejob_runs_stage_by_stage_through_an_s3_bucket() {
    let endpoint = std::env::var("MEDMERGE_S3_ENDPOINT").expect("set by scripts/with-s3.sh");
    let bucket = "medmerge-pipeline";
    let store = BlockingStore::s3(S3Config { bucket: bucket.into(), endpoint: Some(endpoint.clone()), region: "us-east-1".into(), path_style: true, credentials: None, max_attempts: 3, attempt_timeout: None }).unwrap();
    store.create_bucket().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let storage = format!("{{s3: {{bucket: {bucket}, endpoint: \"{endpoint}\"}}}}");
    let job = common::write_job_with_storage(dir.path(), "  merge: {baselines: [paramsMean]}\n", 2, &storage);
    let stages: Vec<String> = {
        std::env::set_var("MEDMERGE_ARTIFACT_CACHE", dir.path().join("cache-plan"));
        let runner = Runner::new(Job::load(&job).unwrap(), Device::Cpu).unwrap();
        runner.status().unwrap().into_iter().map(|(name, _)| name).collect()
    };
    for (i, stage) in stages.iter().enumerate() {
        // A fresh cache per stage: nothing is shared between "pods" except the bucket.
        std::env::set_var("MEDMERGE_ARTIFACT_CACHE", dir.path().join(format!("cache-{i}")));
        let runner = Runner::new(Job::load(&job).unwrap(), Device::Cpu).unwrap();
        runner.run_stage(stage).unwrap_or_else(|e| panic!("stage {stage}: {e:#}"));
    }

    let keys = store.list("runs/local/tiny/g1").unwrap();
    for key in ["base/model.safetensors", "shards/h0/vector.safetensors", "shards/h1/metrics.json", "merged/data-vector/model.safetensors", "restored/params-mean/model.safetensors", "eval/metrics.json", "eval/report.md"] {
        assert!(keys.contains(&format!("runs/local/tiny/g1/{key}")), "{key} missing from the bucket: {keys:?}");
    }
    assert!(!keys.iter().any(|k| k.contains(".tmp-")), "no temporary files are published");

    // A whole-pipeline run on yet another machine finds everything done and reads the report.
    std::env::set_var("MEDMERGE_ARTIFACT_CACHE", dir.path().join("cache-final"));
    let report = Runner::new(Job::load(&job).unwrap(), Device::Cpu).unwrap().run().unwrap();
    assert_eq!(report.candidates[0].id, "data-vector");
    assert!((0.0..=1.0).contains(&report.candidates[0].metrics.accuracy));
}
