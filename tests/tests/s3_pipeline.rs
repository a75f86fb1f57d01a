//! The pipeline with `storage.s3` pointing at a real S3 server (run by `make test-s3`): every
//! stage runs in a fresh local cache, as separate cluster pods would, and still finds its inputs
//! and publishes its outputs through the bucket.

use medmerge_store::BlockingStore;
use medmerge_tests::fixtures;
use medmerge_trainer::pipeline::{Job, Runner};
use medmerge_trainer::synth::tiny_job;
use tch::Device;

#[test]
#[ignore = "needs an S3 server: run `make test-s3`"]
fn a_mergejob_runs_stage_by_stage_through_an_s3_bucket() {
    let _turn = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let (store, endpoint, bucket) = admin_bucket("medmerge-pipeline");

    let dir = tempfile::tempdir().unwrap();
    let storage = format!("{{s3: {{bucket: {bucket}, endpoint: \"{endpoint}\"}}}}");
    let job = tiny_job(dir.path(), "  merge: {baselines: [paramsMean]}\n", 2, &storage).unwrap();
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
    for key in [
        "base/model.safetensors",
        "shards/h0/vector.safetensors",
        "shards/h1/metrics.json",
        "merged/data-vector/model.safetensors",
        "restored/params-mean/model.safetensors",
        "eval/metrics.json",
        "eval/report.md",
    ] {
        assert!(keys.contains(&format!("runs/local/tiny/g1/{key}")), "{key} missing from the bucket: {keys:?}");
    }
    assert!(!keys.iter().any(|k| k.contains(".tmp~")), "no temporary files are published");

    // A whole-pipeline run on yet another machine finds everything done and reads the report.
    std::env::set_var("MEDMERGE_ARTIFACT_CACHE", dir.path().join("cache-final"));
    let report = Runner::new(Job::load(&job).unwrap(), Device::Cpu).unwrap().run().unwrap();
    assert_eq!(report.candidates[0].id, "data-vector");
    assert!((0.0..=1.0).contains(&report.candidates[0].metrics.accuracy));
}

/// The bucket `bucket` on the test server (created), with the admin identity from the
/// environment, and the server's endpoint.
fn admin_bucket(bucket: &'static str) -> (BlockingStore, String, &'static str) {
    let store = BlockingStore::s3(fixtures::s3_config(bucket)).unwrap();
    store.create_bucket().unwrap();
    (store, fixtures::s3_endpoint(), bucket)
}

/// Both tests set process-wide cache variables; they take turns.
static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Uploads the images of manifest `csv` as an ImageFolder under `s3://bucket/prefix/`.
fn upload_shard(store: &BlockingStore, csv: &std::path::Path, prefix: &str) {
    for line in std::fs::read_to_string(csv).unwrap().lines().skip(1) {
        let (path, label) = line.rsplit_once(',').unwrap();
        let name = std::path::Path::new(path).file_name().unwrap().to_string_lossy().into_owned();
        store.put_file(&format!("{prefix}/{label}/{name}"), std::path::Path::new(path)).unwrap();
    }
}

#[test]
#[ignore = "needs an S3 server: run `make test-s3`"]
fn shard_images_are_read_from_s3_with_the_shards_own_credentials_only() {
    let _turn = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let endpoint = fixtures::s3_endpoint();
    let config = fixtures::s3_config;
    let scans = BlockingStore::s3(config("medmerge-test")).unwrap();
    scans.create_bucket().unwrap();
    BlockingStore::s3(config("medmerge-data-run")).unwrap().create_bucket().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let storage = format!("{{s3: {{bucket: medmerge-data-run, endpoint: \"{endpoint}\"}}}}");
    let job = tiny_job(dir.path(), "  merge: {baselines: []}\n", 2, &storage).unwrap();
    upload_shard(&scans, &dir.path().join("s0.csv"), "shard-a/h0");
    upload_shard(&scans, &dir.path().join("s1.csv"), "shard-b/h1");
    let yaml = std::fs::read_to_string(&job)
        .unwrap()
        .replace("data: {path: s0.csv}", "data: {path: \"s3://medmerge-test/shard-a/h0/\"}")
        .replace("data: {path: s1.csv}", "data: {path: \"s3://medmerge-test/shard-b/h1/\"}")
        .replace("  model: {architecture: resnet18, weights: random, imageSize: 32}", "  model: {architecture: resnet18, weights: random, imageSize: 32, classes: [disc, square, stripes]}");
    std::fs::write(&job, yaml).unwrap();

    // Hospital a's pod: its Secret holds credentials that reach only shard-a/.
    let creds = dir.path().join("shard-a-secret");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::write(creds.join("AWS_ACCESS_KEY_ID"), std::env::var("MEDMERGE_S3_SHARD_A_KEY").unwrap()).unwrap();
    std::fs::write(creds.join("AWS_SECRET_ACCESS_KEY"), std::env::var("MEDMERGE_S3_SHARD_A_SECRET").unwrap()).unwrap();
    std::env::set_var("MEDMERGE_ARTIFACT_CACHE", dir.path().join("artifacts"));
    std::env::set_var("MEDMERGE_DATA_CACHE", dir.path().join("data-cache"));
    let runner = Runner::new(Job::load(&job).unwrap(), Device::Cpu).unwrap();
    runner.run_stage("init").unwrap();
    std::env::set_var("MEDMERGE_SHARD_CREDENTIALS_DIR", &creds);
    runner.run_stage("finetune-h0").unwrap();
    assert!(dir.path().join("data-cache/medmerge-test/shard-a/h0").is_dir(), "shard a's images were cached locally");

    // The same credentials cannot read hospital b's images.
    let err = format!("{:#}", runner.run_stage("finetune-h1").unwrap_err());
    std::env::remove_var("MEDMERGE_SHARD_CREDENTIALS_DIR");
    assert!(err.contains("shard h1") && err.contains("s3://medmerge-test/shard-b/h1") && err.contains("AccessDenied"), "{err}");
}

#[test]
#[ignore = "needs an S3 server: run `make test-s3`"]
fn a_hospitals_own_bucket_identity_suffices_for_its_stages_and_reaches_no_other_shard() {
    let (store, endpoint, bucket) = admin_bucket("medmerge-isolation");
    let dir = tempfile::tempdir().unwrap();
    let storage = format!("{{s3: {{bucket: {bucket}, endpoint: \"{endpoint}\"}}}}");
    let job = tiny_job(dir.path(), "  merge: {baselines: []}\n", 2, &storage).unwrap();
    let run = |stage: Option<&str>, hospital: bool, cache: &str| {
        let mut command = std::process::Command::new(fixtures::trainer());
        command.args(["--threads", "1", "pipeline"]).arg(&job).args(stage.map(|s| vec!["--stage", s]).unwrap_or_default()).env("MEDMERGE_ARTIFACT_CACHE", dir.path().join(cache));
        if hospital {
            // Hospital h0's pod: its shard's storageSecret, limited to runs/local/tiny/g1/shards/h0/.
            command.env("AWS_ACCESS_KEY_ID", std::env::var("MEDMERGE_S3_HOSPITAL_KEY").unwrap()).env("AWS_SECRET_ACCESS_KEY", std::env::var("MEDMERGE_S3_HOSPITAL_SECRET").unwrap());
        }
        command.output().unwrap()
    };
    let init = run(Some("init"), false, "coordinator");
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let own = run(Some("finetune-h0"), true, "hospital-h0");
    assert!(own.status.success(), "the shard's own identity runs its training: {}", String::from_utf8_lossy(&own.stderr));
    let other = run(Some("finetune-h1"), true, "hospital-h0-elsewhere");
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success() && err.contains("runs/local/tiny/g1/shards/h1/") && err.contains("AccessDenied"), "{err}");
    let layout = medmerge_crds::ArtifactLayout::new("runs", "local", "tiny", 1);
    assert!(store.list(&layout.shard_root("h1")).unwrap().is_empty(), "nothing was written for shard h1");
    // The coordinator (the bucket's identity) runs the rest; the run is whole and consistent.
    let rest = run(None, false, "coordinator");
    assert!(rest.status.success(), "{}", String::from_utf8_lossy(&rest.stderr));
    let records = medmerge_trainer::publish::run_provenance(&store, &layout).unwrap();
    assert!(records.iter().any(|r| r.stage == "finetune-h0") && records.iter().any(|r| r.stage == "evaluate"), "{records:?}");
    medmerge_trainer::publish::verify_run(&records, |k| Ok(store.get(k)?.map(|b| medmerge_store::sha256_hex(&b)))).unwrap();
    assert!(!store.list(layout.root()).unwrap().iter().any(|k| k.contains("/leases/")), "every lease was released");
}

#[test]
#[ignore = "needs an S3 server: run `make test-s3`"]
fn two_runners_with_separate_caches_on_one_s3_mergejob_end_consistent_or_refused() {
    let (store, endpoint, bucket) = admin_bucket("medmerge-race");
    let dir = tempfile::tempdir().unwrap();
    let storage = format!("{{s3: {{bucket: {bucket}, endpoint: \"{endpoint}\"}}}}");
    let job = tiny_job(dir.path(), "  merge: {baselines: []}\n", 2, &storage).unwrap();
    // Two machines: nothing shared but the bucket: its per-stage leases keep them from running a
    // stage twice, and where they race, publishing decides.
    let runners: Vec<_> = (0..2)
        .map(|i| {
            std::process::Command::new(fixtures::trainer())
                .args(["--threads", "1", "pipeline"])
                .arg(&job)
                .env("MEDMERGE_ARTIFACT_CACHE", dir.path().join(format!("machine-{i}")))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = runners.into_iter().map(|r| r.wait_with_output().unwrap()).collect();
    for o in &outputs {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success() || err.contains("already published with different content"), "a runner failed some other way: {err}");
    }
    assert!(outputs.iter().any(|o| o.status.success()), "one runner finishes the run");
    let layout = medmerge_crds::ArtifactLayout::new("runs", "local", "tiny", 1);
    let records = medmerge_trainer::publish::run_provenance(&store, &layout).unwrap();
    assert!(records.iter().any(|r| r.stage == "evaluate") && records.iter().any(|r| r.stage == "finetune-h0"), "{records:?}");
    medmerge_trainer::publish::verify_run(&records, |k| Ok(store.get(k)?.map(|b| medmerge_store::sha256_hex(&b)))).unwrap();
}
