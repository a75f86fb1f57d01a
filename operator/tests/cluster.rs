//! MergeJobs run end to end the way a cluster runs them, with real parts: the real kube-apiserver
//! with kube-controller-manager's garbage collector, the operator binary running as the Helm
//! chart's ServiceAccount (so the chart's RBAC is all it has), a real S3 server as the artifact
//! store, and the real trainer binary doing every stage. No kubelet runs here, so this test plays
//! the node: for each Job the operator creates it materialises the pod's ConfigMap, Secrets and
//! environment, runs the container's arguments with the trainer binary as a local process, and
//! writes the Job's status as the Job controller would (retrying up to the Job's backoff limit).
//!
//! Run with `make e2e-cluster` (starts the servers, applies the CRD and the chart's RBAC).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use medmerge_crds::{ArtifactLayout, MergeJob};
use medmerge_operator::jobs::{JOB_FILE, SHARD_SECRET_DIR};
use medmerge_store::{S3Config, Store};
use serde_json::json;

const NS: &str = "e2e-cluster";
const BUCKET: &str = "medmerge-cluster";
const PARTNER_VECTOR: &str = "incoming/partner.safetensors";

fn binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("target"));
    let bin = target.join("debug").join(name);
    assert!(bin.exists(), "{} is missing: build the workspace first", bin.display());
    bin
}

fn trainer() -> PathBuf {
    binary("medmerge-trainer")
}

/// Starts the operator binary as the chart's ServiceAccount, logging (appended) to `log`.
fn start_operator(log: &Path) -> Child {
    let kubeconfig = std::env::var("MEDMERGE_E2E_OPERATOR_KUBECONFIG").expect("MEDMERGE_E2E_OPERATOR_KUBECONFIG: run `make e2e-cluster`");
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    Command::new(binary("medmerge-operator"))
        .args(["--metrics-addr", "127.0.0.1:0", "--lease-namespace", "medmerge", "--identity", "e2e-cluster-operator", "--log-json"])
        .env("KUBECONFIG", kubeconfig)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap()
}

fn run_trainer(args: &[&str]) {
    let status = std::process::Command::new(trainer()).args(args).status().unwrap();
    assert!(status.success(), "medmerge-trainer {args:?} failed");
}

/// Plays the kubelet and the Job controller for one namespace: every Job's pod runs as soon as
/// the Job appears, concurrently with the others, as on a cluster.
#[derive(Clone)]
struct Node {
    client: Client,
    work: PathBuf,
    /// Pod runs per Job, so the test can tell that no finished stage ran twice.
    runs: Arc<Mutex<BTreeMap<String, u32>>>,
    failures: Arc<Mutex<BTreeMap<String, i32>>>,
}

impl Node {
    fn new(client: Client, work: PathBuf) -> Self {
        Node { client, work, runs: Arc::default(), failures: Arc::default() }
    }

    fn runs(&self) -> BTreeMap<String, u32> {
        self.runs.lock().unwrap().clone()
    }

    /// Starts a pod for every unfinished Job not started yet (`started` remembers them).
    async fn start_new_jobs(&self, started: &mut BTreeSet<String>) {
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), NS);
        for job in jobs.list(&ListParams::default()).await.unwrap().items {
            let status = job.status.clone().unwrap_or_default();
            let finished = status.succeeded.unwrap_or(0) > 0 || status.conditions.iter().flatten().any(|c| c.type_ == "Failed");
            if !finished && started.insert(job.uid().unwrap()) {
                tokio::spawn(self.clone().run_job(job));
            }
        }
    }

    /// Runs the Job's pod until it succeeds or exceeds the backoff limit, writing the Job's
    /// status after every attempt as the Job controller would.
    async fn run_job(self, job: Job) {
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), NS);
        let name = job.name_any();
        let backoff = job.spec.as_ref().and_then(|s| s.backoff_limit).unwrap_or(6);
        let start = Timestamp::now().to_string();
        loop {
            let ok = self.run_pod(&job).await;
            *self.runs.lock().unwrap().entry(name.clone()).or_default() += 1;
            let failed = {
                let mut failures = self.failures.lock().unwrap();
                let failed = failures.entry(name.clone()).or_default();
                if !ok {
                    *failed += 1;
                }
                *failed
            };
            let now = Timestamp::now().to_string();
            let (status, done) = if ok {
                (json!({"startTime": start, "completionTime": now, "succeeded": 1, "failed": failed, "active": null, "conditions": [{"type": "Complete", "status": "True", "lastProbeTime": now, "lastTransitionTime": now}]}), true)
            } else if failed > backoff {
                (json!({"startTime": start, "failed": failed, "active": null, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "lastProbeTime": now, "lastTransitionTime": now}]}), true)
            } else {
                (json!({"startTime": start, "failed": failed, "active": 1}), false)
            };
            jobs.patch_status(&name, &PatchParams::default(), &Patch::Merge(json!({"status": status}))).await.unwrap();
            if done {
                return;
            }
        }
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
        cmd.args(&args).env("MEDMERGE_ARTIFACT_CACHE", dir.join("artifact-cache")).env("MEDMERGE_DATA_CACHE", dir.join("data-cache")).env("MEDMERGE_THREADS", "1");
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
    run_trainer(&["split", "--data", images.to_str().unwrap(), "--out", split.to_str().unwrap(), "--shards", "4", "--test-fraction", "0.25", "--seed", "7"]);
    split
}

/// A hospital that trains on its own premises: once the operator waits for its vector (the
/// collect Job exists) and the run's base is in the bucket, it downloads the base, fine-tunes on
/// its own shard and uploads the vector, late.
async fn partner_hospital(client: Client, store: Store, shard_data: PathBuf, work: PathBuf) {
    let jobs: Api<Job> = Api::namespaced(client, NS);
    while jobs.get_opt("fundus-g1-collect-partner").await.unwrap().is_none() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let base_key = ArtifactLayout::new("runs", NS, "fundus", 1).base();
    while !store.exists(&base_key).await.unwrap() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    std::fs::create_dir_all(&work).unwrap();
    let base = work.join("base.safetensors");
    store.get_file(&base_key, &base).await.unwrap();
    let vector = work.join("vector.safetensors");
    let args = ["finetune", "--base", base.to_str().unwrap(), "--data", shard_data.to_str().unwrap(), "--shard", "partner", "--out", vector.to_str().unwrap(), "--epochs", "2", "--batch-size", "8", "--lr", "0.001", "--threads", "1"].map(String::from);
    tokio::task::spawn_blocking(move || run_trainer(&args.iter().map(String::as_str).collect::<Vec<_>>())).await.unwrap();
    store.put_file(PARTNER_VECTOR, &vector).await.unwrap();
}

/// Polls `done` every 500 ms for up to `limit`; panics naming `what` when it never holds.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "expected {what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kube-apiserver and an S3 server: run `make e2e-cluster`"]
async fn a_mergejob_survives_an_operator_restart_waits_for_a_late_hospital_and_its_jobs_go_with_it() {
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

    let operator_log = work.path().join("operator.log");
    let mut operator = start_operator(&operator_log);
    let partner = tokio::spawn(partner_hospital(client.clone(), store.clone(), split.join("shard-4.csv"), work.path().join("partner")));

    let shard = |i: usize| json!({"name": format!("hospital-{i}"), "data": {"path": split.join(format!("shard-{i}.csv")).display().to_string()}});
    let mj: MergeJob = serde_json::from_value(json!({
        "apiVersion": "medmerge.io/v1alpha1", "kind": "MergeJob", "metadata": {"name": "fundus", "namespace": NS},
        "spec": {
            "model": {"architecture": "resnet18", "weights": "random", "imageSize": 32},
            "shards": [
                shard(1), shard(2), shard(3),
                // Trains on its own premises and uploads its vector while the run waits for it.
                {"name": "partner", "vector": PARTNER_VECTOR},
                // This hospital's images are missing: its Job fails, is retried, and the quorum
                // of 4 carries on without it.
                {"name": "hospital-5", "data": {"path": work.path().join("missing.csv").display().to_string()}},
            ],
            "training": {"epochs": 2, "batchSize": 8, "learningRate": 0.001},
            "merge": {"baselines": ["paramsMean"]},
            "evaluation": {"data": {"path": split.join("test.csv").display().to_string()}},
            "storage": {"s3": {"bucket": BUCKET, "endpoint": endpoint, "credentialsSecret": "bucket-creds"}, "cleanup": "Delete"},
            "cluster": {"backoffLimit": 1, "minShards": 4, "stragglerDeadlineSeconds": 600},
        }
    }))
    .unwrap();
    let mjs: Api<MergeJob> = Api::namespaced(client.clone(), NS);
    mjs.create(&PostParams::default(), &mj).await.unwrap();

    let node = Node::new(client.clone(), work.path().join("pods"));
    let mut started = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    let mut restarted = false;
    let phase = loop {
        node.start_new_jobs(&mut started).await;
        // Once a hospital has trained, the operator dies (SIGKILL) while the node goes on with
        // the running pods; the restarted operator must carry on from where the Jobs are.
        if !restarted && node.runs().keys().any(|job| job.contains("finetune-hospital")) {
            operator.kill().unwrap();
            operator.wait().unwrap();
            for _ in 0..6 {
                node.start_new_jobs(&mut started).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            operator = start_operator(&operator_log);
            restarted = true;
        }
        let status = mjs.get_status("fundus").await.unwrap().status.unwrap_or_default();
        match status.phase.as_deref() {
            Some(p @ ("Succeeded" | "Failed")) => break p.to_string(),
            _ if tokio::time::Instant::now() > deadline => panic!("no final phase in 10 minutes: {status:?}"),
            _ => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    };
    let logs = format!("pod logs in {}, operator log {}", node.work.display(), operator_log.display());
    let status = mjs.get_status("fundus").await.unwrap().status.unwrap();
    assert_eq!(phase, "Succeeded", "{status:?}\n{logs}");
    assert!(restarted);
    partner.await.unwrap();

    let results = status.results.expect("results copied from the evaluation report in S3");
    assert!((0.0..=1.0).contains(&results.accuracy));
    assert_eq!(results.baselines[0].id, "params-mean");
    assert_eq!(results.model, "runs/e2e-cluster/fundus/g1/restored/data-vector/model.safetensors");
    assert!(store.exists(&results.model).await.unwrap(), "the merged model is in the bucket");
    assert_eq!(status.shards_ready.as_deref(), Some("4/5"));
    let dropped = status.shards.iter().find(|s| s.name == "hospital-5").unwrap();
    assert_eq!((dropped.state.as_str(), dropped.attempts), ("Failed", 2), "one try and one retry (backoffLimit 1)");
    assert!(status.shards.iter().filter(|s| s.name.starts_with("hospital-") && s.name != "hospital-5").all(|s| s.samples.is_some_and(|n| n > 0)), "{:?}", status.shards);
    let partner_status = status.shards.iter().find(|s| s.name == "partner").unwrap();
    assert_eq!((partner_status.state.as_str(), partner_status.vector.as_deref()), ("Ready", Some("runs/e2e-cluster/fundus/g1/shards/partner/vector.safetensors")), "{partner_status:?}");

    // The late vector: the collect pod was already waiting when the hospital uploaded it.
    let collect_log = std::fs::read_to_string(node.work.join("fundus-g1-collect-partner/pod.log")).unwrap();
    assert!(collect_log.contains("waiting for the hospital's vector"), "{collect_log}");
    // The restart redid nothing: every Job ran once, except the failing shard's retry.
    assert_eq!(node.failures.lock().unwrap().get("fundus-g1-finetune-hospital-5"), Some(&2));
    let runs = node.runs();
    let reruns: Vec<_> = runs.iter().filter(|(job, runs)| **runs != 1 && !job.ends_with("finetune-hospital-5")).collect();
    assert!(reruns.is_empty(), "stages ran again after the operator restarted: {reruns:?}\n{logs}");
    assert!(runs.keys().any(|job| job.contains("-evaluate")), "{runs:?}");
    let operator_log_text = std::fs::read_to_string(&operator_log).unwrap();
    assert!(!operator_log_text.contains("forbidden"), "the chart's RBAC was not enough:\n{operator_log_text}");

    // Deleting the MergeJob: the operator's finalizer removes its artifacts (cleanup: Delete) and
    // the garbage collector removes its Jobs and ConfigMaps through their owner references.
    mjs.delete("fundus", &DeleteParams::default()).await.unwrap();
    eventually("the MergeJob gone (finalizer done)", Duration::from_secs(60), || async { mjs.get_opt("fundus").await.unwrap().is_none() }).await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), NS);
    eventually("its Jobs deleted by the garbage collector", Duration::from_secs(120), || async { jobs.list(&ListParams::default()).await.unwrap().items.is_empty() }).await;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    eventually("its spec ConfigMap deleted", Duration::from_secs(60), || async {
        config_maps.list(&ListParams::default()).await.unwrap().items.iter().all(|cm| !cm.name_any().starts_with("fundus"))
    })
    .await;
    assert!(store.list("runs/e2e-cluster/fundus/").await.unwrap().is_empty(), "cleanup: Delete removes the run's artifacts");
    assert!(store.exists(PARTNER_VECTOR).await.unwrap(), "the hospital's own upload is not the run's to delete");
    operator.kill().unwrap();
    let _ = operator.wait();
}
