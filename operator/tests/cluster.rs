//! A MergeJob run end to end the way a cluster runs it, with real parts: the real kube-apiserver,
//! the operator's controller, a real S3 server as the artifact store, and the real trainer
//! binary doing every stage. No kubelet runs here, so this test plays the node: for each Job the
//! operator creates it materialises the pod's ConfigMap, Secrets and environment, runs the
//! container's arguments with the trainer binary as a local process, and writes the Job's status
//! as the Job controller would (retrying up to the Job's backoff limit).
//!
//! Run with `make e2e-cluster` (starts both servers and applies the CRD).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use medmerge_crds::MergeJob;
use medmerge_operator::artifacts::ArtifactStore;
use medmerge_operator::controller::{self, Context};
use medmerge_operator::jobs::{JOB_FILE, SHARD_SECRET_DIR};
use medmerge_operator::telemetry::Metrics;
use medmerge_store::{S3Config, Store};
use serde_json::json;

const NS: &str = "e2e-cluster";
const BUCKET: &str = "medmerge-cluster";

fn trainer() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("target"));
    let bin = target.join("debug/medmerge-trainer");
    assert!(bin.exists(), "{} is missing: build the workspace first", bin.display());
    bin
}

fn run_trainer(args: &[&str]) {
    let status = std::process::Command::new(trainer()).args(args).status().unwrap();
    assert!(status.success(), "medmerge-trainer {args:?} failed");
}

/// Plays the kubelet and the Job controller for one namespace.
struct Node {
    client: Client,
    work: PathBuf,
    failures: BTreeMap<String, i32>,
}

impl Node {
    /// Runs every unfinished Job once; returns how many ran.
    async fn step(&mut self) -> usize {
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), NS);
        let mut ran = 0;
        for job in jobs.list(&ListParams::default()).await.unwrap().items {
            let status = job.status.clone().unwrap_or_default();
            if status.succeeded.unwrap_or(0) > 0 || status.conditions.iter().flatten().any(|c| c.type_ == "Failed") {
                continue;
            }
            let name = job.name_any();
            let ok = self.run_pod(&job).await;
            let failed = self.failures.entry(name.clone()).or_default();
            if !ok {
                *failed += 1;
            }
            let backoff = job.spec.as_ref().and_then(|s| s.backoff_limit).unwrap_or(6);
            let now = Timestamp::now().to_string();
            let status = if ok {
                json!({"startTime": now, "completionTime": now, "succeeded": 1, "failed": *failed, "active": null, "conditions": [{"type": "Complete", "status": "True", "lastProbeTime": now, "lastTransitionTime": now}]})
            } else if *failed > backoff {
                json!({"startTime": now, "failed": *failed, "active": null, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "lastProbeTime": now, "lastTransitionTime": now}]})
            } else {
                json!({"startTime": now, "failed": *failed, "active": 1})
            };
            jobs.patch_status(&name, &PatchParams::default(), &Patch::Merge(json!({"status": status}))).await.unwrap();
            ran += 1;
        }
        ran
    }

    /// Runs the Job's pod as a local process; `true` when it exited 0.
    async fn run_pod(&self, job: &Job) -> bool {
        let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let container = &pod.containers[0];
        let dir = self.work.join(job.name_any());
        let _ = std::fs::remove_dir_all(&dir);
        let mut mounts: BTreeMap<String, PathBuf> = BTreeMap::new();
        for volume in pod.volumes.iter().flatten() {
            let target = dir.join(&volume.name);
            std::fs::create_dir_all(&target).unwrap();
            if let Some(cm) = &volume.config_map {
                let cm = Api::<ConfigMap>::namespaced(self.client.clone(), NS).get(&cm.name).await.unwrap();
                for (file, content) in cm.data.unwrap_or_default() {
                    std::fs::write(target.join(file), content).unwrap();
                }
            }
            if let Some(secret) = &volume.secret {
                let secret = Api::<Secret>::namespaced(self.client.clone(), NS).get(secret.secret_name.as_deref().unwrap()).await.unwrap();
                for (file, content) in secret.data.unwrap_or_default() {
                    std::fs::write(target.join(file), content.0).unwrap();
                }
            }
            mounts.insert(volume.name.clone(), target);
        }
        let mount_path = |path: &str| -> PathBuf {
            for m in container.volume_mounts.iter().flatten() {
                if let Some(rest) = path.strip_prefix(&m.mount_path) {
                    return mounts[&m.name].join(rest.trim_start_matches('/'));
                }
            }
            PathBuf::from(path)
        };
        let args: Vec<String> = container.args.clone().unwrap_or_default().into_iter().map(|a| if a == JOB_FILE { mount_path(&a).display().to_string() } else { a }).collect();
        let mut cmd = std::process::Command::new(trainer());
        cmd.args(&args).env("MEDMERGE_ARTIFACT_CACHE", dir.join("artifact-cache")).env("MEDMERGE_DATA_CACHE", dir.join("data-cache")).env("MEDMERGE_THREADS", "2");
        cmd.env_remove("AWS_ACCESS_KEY_ID").env_remove("AWS_SECRET_ACCESS_KEY");
        for env in container.env.iter().flatten() {
            let value = match (&env.value, env.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref())) {
                (Some(v), _) if v == SHARD_SECRET_DIR => mount_path(v).display().to_string(),
                (Some(v), _) if env.name == "HOME" => {
                    let _ = v;
                    dir.join("home").display().to_string()
                }
                (Some(v), _) => v.clone(),
                (None, Some(r)) => {
                    let secret = Api::<Secret>::namespaced(self.client.clone(), NS).get(&r.name).await.unwrap();
                    String::from_utf8(secret.data.unwrap_or_default()[&r.key].0.clone()).unwrap()
                }
                _ => continue,
            };
            cmd.env(&env.name, value);
        }
        let log = std::fs::File::create(dir.join("pod.log")).unwrap();
        cmd.stdout(log.try_clone().unwrap()).stderr(log);
        let status = tokio::task::spawn_blocking(move || cmd.status()).await.unwrap().unwrap();
        status.success()
    }
}

fn make_data(dir: &Path) -> PathBuf {
    let images = dir.join("images");
    run_trainer(&["synth", "--out", images.to_str().unwrap(), "--classes", "3", "--per-class", "24", "--size", "32"]);
    let split = dir.join("split");
    run_trainer(&["split", "--data", images.to_str().unwrap(), "--out", split.to_str().unwrap(), "--shards", "3", "--test-fraction", "0.25", "--seed", "7"]);
    split
}

#[tokio::test]
#[ignore = "needs a kube-apiserver and an S3 server: run `make e2e-cluster`"]
async fn a_mergejob_reaches_succeeded_with_accuracy_in_status_and_the_model_in_s3() {
    medmerge_operator::install_crypto_provider();
    let client = Client::try_default().await.unwrap();
    let endpoint = std::env::var("MEDMERGE_S3_ENDPOINT").unwrap();
    let work = tempfile::tempdir().unwrap();
    let split = make_data(work.path());

    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap()).await.unwrap();
    let creds: Secret = serde_json::from_value(json!({"metadata": {"name": "bucket-creds"}, "stringData": {
        "AWS_ACCESS_KEY_ID": std::env::var("AWS_ACCESS_KEY_ID").unwrap(),
        "AWS_SECRET_ACCESS_KEY": std::env::var("AWS_SECRET_ACCESS_KEY").unwrap()}}))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), NS).create(&PostParams::default(), &creds).await.unwrap();
    let store = Store::s3(S3Config { bucket: BUCKET.into(), endpoint: Some(endpoint.clone()), region: "us-east-1".into(), path_style: true, credentials: None, max_attempts: 3, attempt_timeout: None }).await;
    store.create_bucket().await.unwrap();

    let ctx = Arc::new(Context::new(client.clone(), "e2e-cluster", Arc::new(Metrics::default()), ArtifactStore::new(None)));
    let controller = tokio::spawn(controller::run(Api::namespaced(client.clone(), NS), Api::namespaced(client.clone(), NS), ctx, std::future::pending()));

    let shard = |i: usize| json!({"name": format!("hospital-{i}"), "data": {"path": split.join(format!("shard-{i}.csv")).display().to_string()}});
    let mj: MergeJob = serde_json::from_value(json!({
        "apiVersion": "medmerge.io/v1alpha1", "kind": "MergeJob", "metadata": {"name": "fundus", "namespace": NS},
        "spec": {
            "model": {"architecture": "resnet18", "weights": "random", "imageSize": 32},
            // Hospital 4's images are missing: its Job fails, is retried, and the quorum of 3
            // carries on without it.
            "shards": [shard(1), shard(2), shard(3), {"name": "hospital-4", "data": {"path": work.path().join("missing.csv").display().to_string()}}],
            "training": {"epochs": 2, "batchSize": 8, "learningRate": 0.001},
            "merge": {"baselines": ["paramsMean"]},
            "evaluation": {"data": {"path": split.join("test.csv").display().to_string()}},
            "storage": {"s3": {"bucket": BUCKET, "endpoint": endpoint, "credentialsSecret": "bucket-creds"}},
            "cluster": {"backoffLimit": 1, "minShards": 3},
        }
    }))
    .unwrap();
    let mjs: Api<MergeJob> = Api::namespaced(client.clone(), NS);
    mjs.create(&PostParams::default(), &mj).await.unwrap();

    let mut node = Node { client: client.clone(), work: work.path().join("pods"), failures: BTreeMap::new() };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    let phase = loop {
        node.step().await;
        let status = mjs.get_status("fundus").await.unwrap().status.unwrap_or_default();
        match status.phase.as_deref() {
            Some(p @ ("Succeeded" | "Failed")) => break p.to_string(),
            _ if tokio::time::Instant::now() > deadline => panic!("no final phase in 10 minutes: {status:?}"),
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    let status = mjs.get_status("fundus").await.unwrap().status.unwrap();
    assert_eq!(phase, "Succeeded", "{status:?}\nlogs in {}", node.work.display());
    let results = status.results.expect("results copied from the evaluation report in S3");
    assert!((0.0..=1.0).contains(&results.accuracy));
    assert_eq!(results.baselines[0].id, "params-mean");
    assert_eq!(results.model, "runs/e2e-cluster/fundus/g1/restored/data-vector/model.safetensors");
    assert!(store.exists(&results.model).await.unwrap(), "the merged model is in the bucket");
    assert_eq!(status.shards_ready.as_deref(), Some("3/4"));
    let dropped = status.shards.iter().find(|s| s.name == "hospital-4").unwrap();
    assert_eq!((dropped.state.as_str(), dropped.attempts), ("Failed", 2), "one try and one retry (backoffLimit 1)");
    assert!(status.shards.iter().filter(|s| s.name != "hospital-4").all(|s| s.samples.is_some_and(|n| n > 0)), "{:?}", status.shards);
    assert_eq!(node.failures.get("fundus-g1-finetune-hospital-4"), Some(&2));
    controller.abort();
}
