//! MergeJobs on a real node: kube-apiserver, kube-controller-manager (Job, TTL, garbage
//! collector, PV binder), kube-scheduler and a kubelet running every stage as a pod from the
//! project's trainer image in containerd; the operator in its own pod, installed by `helm
//! install`, authenticated only by its ServiceAccount token, with S3 credentials from the chart.
//! An S3 server listens on the node's bridge. Nothing here plays the node.
//!
//! Run with `make e2e-cluster` (scripts/with-node.sh, scripts/with-s3.sh, scripts/e2e-cluster.sh).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PersistentVolume, PersistentVolumeClaim, Pod, Secret};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use medmerge_crds::{ArtifactLayout, MergeJob, MergeJobStatus, Phase, ShardState, StageOutcome};
use medmerge_store::Store;
use medmerge_tests::fixtures;
use serde_json::{json, Value};

const BUCKET: &str = "medmerge-cluster";
const PARTNER_VECTOR: &str = "incoming/partner.safetensors";

fn env(name: &str) -> String {
    fixtures::script_env(name, "`make e2e-cluster`")
}

fn run_trainer(args: &[&str]) {
    let status = Command::new(fixtures::trainer()).args(args).status().unwrap();
    assert!(status.success(), "medmerge-trainer {args:?} failed");
}

fn kubectl(args: &[&str]) -> String {
    let out = Command::new("kubectl").args(args).output().unwrap();
    assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The classes of the synthetic images.
const CLASSES: [&str; 3] = ["disc", "square", "stripes"];

/// Synthetic images split into four shards and a test set, under `dir` on the node: manifests
/// (with host paths) in `dir/split`, and each part as a self-contained ImageFolder in
/// `dir/volumes/<part>` (`shard-1` .. `shard-4`, `test`), as a volume would hold it.
fn make_data(dir: &Path) -> PathBuf {
    let images = dir.join("images");
    run_trainer(&["synth", "--out", images.to_str().unwrap(), "--classes", "3", "--per-class", "24", "--size", "32"]);
    let split = dir.join("split");
    run_trainer(&["split", "--data", images.to_str().unwrap(), "--out", split.to_str().unwrap(), "--shards", "4", "--test-fraction", "0.25", "--seed", "7"]);
    for part in ["shard-1", "shard-2", "shard-3", "shard-4", "test"] {
        image_folder(&split.join(format!("{part}.csv")), &dir.join("volumes").join(part));
    }
    dir.join("volumes")
}

/// Copies the images of a `path,label` manifest into a self-contained ImageFolder at `to`.
fn image_folder(manifest: &Path, to: &Path) {
    for line in std::fs::read_to_string(manifest).unwrap().lines().skip(1) {
        let (path, label) = line.rsplit_once(',').unwrap();
        std::fs::create_dir_all(to.join(label)).unwrap();
        std::fs::copy(path, to.join(label).join(Path::new(path).file_name().unwrap())).unwrap();
    }
}

async fn create<K>(api: &Api<K>, value: Value) -> K
where
    K: kube::Resource + Clone + k8s_openapi::serde::de::DeserializeOwned + k8s_openapi::serde::Serialize + std::fmt::Debug,
{
    api.create(&PostParams::default(), &serde_json::from_value(value).unwrap()).await.unwrap()
}

/// A hostPath PersistentVolume pre-bound to claim `ns/claim`, and that claim.
async fn host_claim(client: &Client, ns: &str, claim: &str, path: &Path, mode: &str) {
    let pv = format!("{ns}-{claim}");
    create(
        &Api::<PersistentVolume>::all(client.clone()),
        json!({"metadata": {"name": pv}, "spec": {
        "capacity": {"storage": "1Gi"}, "accessModes": [mode], "storageClassName": "",
        "hostPath": {"path": path, "type": "Directory"}, "claimRef": {"namespace": ns, "name": claim}}}),
    )
    .await;
    create(
        &Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns),
        json!({"metadata": {"name": claim}, "spec": {
        "accessModes": [mode], "storageClassName": "", "volumeName": pv, "resources": {"requests": {"storage": "1Gi"}}}}),
    )
    .await;
}

async fn namespace(client: &Client, ns: &str) {
    create(&Api::<Namespace>::all(client.clone()), json!({"metadata": {"name": ns}})).await;
    // Pods need the namespace's default ServiceAccount (and, on 1.20, its token Secret).
    eventually("the default ServiceAccount", Duration::from_secs(60), || async {
        kube::Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), ns).get_opt("default").await.unwrap().is_some_and(|sa| sa.secrets.is_some())
    })
    .await;
}

/// A new bucket on the test's S3 server, reached with the admin credentials.
async fn bucket(name: &str) -> Store {
    let store = Store::s3(fixtures::s3_config(name)).await;
    store.create_bucket().await.unwrap();
    store
}

async fn secret(client: &Client, ns: &str, name: &str, data: Value) {
    create(&Api::<Secret>::namespaced(client.clone(), ns), json!({"metadata": {"name": name}, "stringData": data})).await;
}

/// Polls `done` every 300 ms for up to `limit`; panics naming `what` when it never holds.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "expected {what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn final_status(mjs: &Api<MergeJob>, name: &str, limit: Duration) -> MergeJobStatus {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let status = mjs.get_status(name).await.unwrap().status.unwrap_or_default();
        if status.phase.is_some_and(Phase::is_terminal) {
            return status;
        }
        assert!(tokio::time::Instant::now() < deadline, "{name}: no final phase in {limit:?}: {status:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What a pod's container sees, read through the kernel's view of its process
/// (`/proc/<pid>/root`, `/proc/<pid>/status`, `/proc/<pid>/mountinfo`).
#[derive(Debug)]
struct Inside {
    uid: u32,
    root_read_only: bool,
    shard_data: Vec<String>,
    shard_secret: Vec<String>,
    api_token: bool,
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir).map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| !n.starts_with("..")).collect()).unwrap_or_default();
    names.sort();
    names
}

/// The container's main process on the node, found through containerd.
fn container_pid(pod: &Pod) -> Option<u32> {
    let id = pod.status.as_ref()?.container_statuses.as_ref()?.first()?.container_id.as_ref()?.strip_prefix("containerd://")?.to_string();
    let sock = format!("{}/run/containerd.sock", env("MEDMERGE_NODE_DIR"));
    let out = Command::new("ctr").args(["-a", &sock, "-n", "k8s.io", "tasks", "ls"]).output().ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find(|l| l.starts_with(&id)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

fn inside(pid: u32) -> Option<Inside> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let status = std::fs::read_to_string(proc.join("status")).ok()?;
    let uid = status.lines().find(|l| l.starts_with("Uid:"))?.split_whitespace().nth(1)?.parse().ok()?;
    let mountinfo = std::fs::read_to_string(proc.join("mountinfo")).ok()?;
    let root = mountinfo.lines().map(|l| l.split_whitespace().collect::<Vec<_>>()).find(|f| f.get(4) == Some(&"/"))?;
    let root_read_only = root.get(5).is_some_and(|o| o.split(',').any(|o| o == "ro"));
    let r = proc.join("root");
    Some(Inside {
        uid,
        root_read_only,
        shard_data: listing(&r.join("var/run/medmerge/shards")),
        shard_secret: listing(&r.join("var/run/secrets/medmerge/shard")),
        api_token: r.join("var/run/secrets/kubernetes.io/serviceaccount/token").exists(),
    })
}

/// Looks inside the running pods of Jobs whose names contain `stage` until one is seen.
async fn look_inside(client: &Client, ns: &str, stage: &str, limit: Duration) -> (String, Inside) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        for pod in pods.list(&ListParams::default()).await.unwrap().items {
            let job = pod.labels().get("job-name").cloned().unwrap_or_default();
            if job.contains(stage) {
                if let Some(view) = container_pid(&pod).and_then(inside) {
                    return (job, view);
                }
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "never saw a running pod of a {stage} Job");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every Job that existed in `ns` while it ran, by name: the UIDs seen (a Job created again
/// after being deleted shows a second UID). Polls every 250 ms; a stage Job lives longer than
/// that (its pod's run, plus `ttlSecondsAfterFinished`).
fn watch_jobs(client: &Client, ns: &str) -> std::sync::Arc<std::sync::Mutex<BTreeMap<String, std::collections::BTreeSet<String>>>> {
    let seen: std::sync::Arc<std::sync::Mutex<BTreeMap<String, std::collections::BTreeSet<String>>>> = Default::default();
    let (jobs, record) = (Api::<Job>::namespaced(client.clone(), ns), seen.clone());
    tokio::spawn(async move {
        loop {
            if let Ok(list) = jobs.list(&ListParams::default()).await {
                let mut seen = record.lock().unwrap();
                for job in list.items {
                    seen.entry(job.name_any()).or_default().insert(job.uid().unwrap_or_default());
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    seen
}

fn operator_pod(client: &Client) -> Api<Pod> {
    Api::namespaced(client.clone(), "medmerge")
}

async fn operator_pod_name(client: &Client) -> Option<String> {
    let ready = |p: &Pod| p.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let pods = operator_pod(client).list(&ListParams::default().labels("app.kubernetes.io/name=medmerge-operator")).await.unwrap().items;
    pods.into_iter().find(|p| ready(p) && p.metadata.deletion_timestamp.is_none()).map(|p| p.name_any())
}

/// A hospital that trains on its own premises: once the run waits for its vector and the base
/// is in the bucket, it fine-tunes on its own shard and uploads the vector, late.
/// Waits until run 1 of MergeJob `name` has written its base to the bucket, then downloads it.
async fn fetch_base(store: &Store, ns: &str, name: &str, to: &Path) {
    let base_key = ArtifactLayout::new("runs", ns, name, 1).base();
    while !store.exists(&base_key).await.unwrap() {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    store.get_file(&base_key, to).await.unwrap();
}

/// What a hospital runs on its own premises to fine-tune `base` on `data` (2 epochs, 1 thread).
fn finetune_args(base: &Path, data: &Path, shard: &str, out: &Path) -> Vec<String> {
    let (base, data, out) = (base.to_str().unwrap(), data.to_str().unwrap(), out.to_str().unwrap());
    ["finetune", "--base", base, "--data", data, "--shard", shard, "--out", out, "--epochs", "2", "--batch-size", "8", "--lr", "0.001", "--threads", "1"].map(String::from).to_vec()
}

async fn partner_hospital(client: Client, ns: String, store: Store, shard_data: PathBuf, work: PathBuf) {
    let jobs: Api<Job> = Api::namespaced(client, &ns);
    while jobs.get_opt("fundus-g1-collect-partner").await.unwrap().is_none() {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    std::fs::create_dir_all(&work).unwrap();
    let base = work.join("base.safetensors");
    fetch_base(&store, &ns, "fundus", &base).await;
    let vector = work.join("vector.safetensors");
    let args = finetune_args(&base, &shard_data, "partner", &vector);
    tokio::task::spawn_blocking(move || run_trainer(&args.iter().map(String::as_str).collect::<Vec<_>>())).await.unwrap();
    store.put_file(PARTNER_VECTOR, &vector).await.unwrap();
}

fn cluster_settings(extra: Value) -> Value {
    let mut cluster = json!({"image": env("MEDMERGE_E2E_TRAINER_IMAGE"), "imagePullPolicy": "Never", "scratchSizeLimit": "2Gi",
        "podOverrides": {"env": [{"name": "MEDMERGE_THREADS", "value": "1"}]}});
    for (k, v) in extra.as_object().unwrap() {
        cluster[k] = v.clone();
    }
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real node: run `make e2e-cluster`"]
async fn on_s3_a_mergejob_survives_its_operator_pod_waits_for_a_late_hospital_drops_a_failing_one_and_goes_with_its_jobs() {
    medmerge_operator::install_crypto_provider();
    let client = Client::try_default().await.unwrap();
    let ns = "e2e-s3";
    let endpoint = env("MEDMERGE_S3_ENDPOINT");
    let node_dir = PathBuf::from(env("MEDMERGE_NODE_DIR"));
    let work = node_dir.join(ns);
    let volumes = make_data(&work);
    namespace(&client, ns).await;
    let bucket_creds = json!({"AWS_ACCESS_KEY_ID": env("AWS_ACCESS_KEY_ID"), "AWS_SECRET_ACCESS_KEY": env("AWS_SECRET_ACCESS_KEY")});
    secret(&client, ns, "bucket-creds", bucket_creds).await;
    for s in ["creds-1", "creds-2", "creds-partner"] {
        secret(&client, ns, s, json!({ "token": format!("{s}-token") })).await;
    }
    // Each hospital's images on its own volume: a PVC for hospital-1, hostPath for the others.
    host_claim(&client, ns, "hospital-1-data", &volumes.join("shard-1"), "ReadOnlyMany").await;

    let store = bucket(BUCKET).await;
    let partner = tokio::spawn(partner_hospital(client.clone(), ns.into(), store.clone(), work.join("split/shard-4.csv"), work.join("partner")));

    let host = |part: &str| json!({"hostPath": {"path": volumes.join(part), "type": "Directory"}});
    let mj = json!({
        "apiVersion": "medmerge.io/v1alpha1", "kind": "MergeJob", "metadata": {"name": "fundus", "namespace": ns},
        "spec": {
            "model": {"architecture": "resnet18", "weights": "random", "imageSize": 32, "classes": CLASSES},
            "shards": [
                {"name": "hospital-1", "data": {"path": ".", "volume": {"persistentVolumeClaim": {"claimName": "hospital-1-data"}}}, "secretRef": "creds-1"},
                {"name": "hospital-2", "data": {"path": ".", "volume": host("shard-2")}, "secretRef": "creds-2"},
                {"name": "hospital-3", "data": {"path": ".", "volume": host("shard-3")}},
                // Trains on its own premises and uploads its vector while the run waits for it.
                {"name": "partner", "vector": PARTNER_VECTOR, "secretRef": "creds-partner"},
                // This hospital's volume lacks its manifest: its pod fails, the Job controller
                // retries it (backoffLimit 1) and the quorum of 4 carries on without it.
                {"name": "hospital-5", "data": {"path": "missing.csv", "volume": host("shard-3")}},
            ],
            "training": {"epochs": 2, "batchSize": 8, "learningRate": 0.001},
            "merge": {"baselines": ["paramsMean"]},
            "evaluation": {"data": {"path": ".", "volume": host("test")}, "explainImages": 4},
            "storage": {"s3": {"bucket": BUCKET, "endpoint": endpoint, "credentialsSecret": "bucket-creds"}, "cleanup": "Delete"},
            "cluster": cluster_settings(json!({"backoffLimit": 1, "minShards": 4, "stragglerDeadlineSeconds": 900})),
        }
    });
    let mjs: Api<MergeJob> = Api::namespaced(client.clone(), ns);
    let created = watch_jobs(&client, ns);
    create(&mjs, mj).await;

    // Inside a hospital's training pod: its own data and Secret only, not root, read-only root.
    let (job, view) = look_inside(&client, ns, "finetune-hospital-", Duration::from_secs(300)).await;
    let shard = job.trim_start_matches("fundus-g1-finetune-").to_string();
    assert_eq!(view.shard_data, vec![shard.clone()], "{job} sees exactly its own data volume: {view:?}");
    assert_ne!(view.uid, 0, "{job} runs as root");
    assert!(view.root_read_only, "{job}'s root filesystem is writable");
    assert!(!view.api_token, "{job} has an API token");
    let own_secret = if shard == "hospital-3" || shard == "hospital-5" { vec![] } else { vec!["token".to_string()] };
    assert_eq!(view.shard_secret, own_secret, "{job}: {view:?}");
    // The waiting collect pod of the partner: its Secret, no hospital's data.
    let (job, view) = look_inside(&client, ns, "collect-partner", Duration::from_secs(300)).await;
    assert_eq!((view.shard_data.len(), view.shard_secret.clone()), (0, vec!["token".to_string()]), "{job}: {view:?}");

    // Once a hospital has trained, the operator's pod is deleted; its Deployment brings it back.
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    eventually("a hospital trained", Duration::from_secs(300), || async {
        jobs.list(&ListParams::default()).await.unwrap().items.iter().any(|j| j.name_any().contains("finetune-hospital") && j.status.as_ref().and_then(|s| s.succeeded).unwrap_or(0) > 0)
    })
    .await;
    let first = operator_pod_name(&client).await.expect("the operator pod is ready");
    operator_pod(&client).delete(&first, &DeleteParams::default()).await.unwrap();
    eventually("a new operator pod ready", Duration::from_secs(180), || async { operator_pod_name(&client).await.is_some_and(|p| p != first) }).await;

    let status = final_status(&mjs, "fundus", Duration::from_secs(900)).await;
    assert_eq!(status.phase, Some(Phase::Succeeded), "{status:#?}");
    partner.await.unwrap();
    let results = status.results.clone().expect("results copied from the evaluation report in S3 by the operator pod");
    assert!((0.0..=1.0).contains(&results.accuracy));
    assert_eq!(results.model, format!("runs/{ns}/fundus/g1/restored/data-vector/model.safetensors"));
    assert!(store.exists(&results.model).await.unwrap(), "the merged model is in the bucket");
    assert_eq!(status.shards_ready.as_deref(), Some("4/5"));
    let failing = status.shards.iter().find(|s| s.name == "hospital-5").unwrap();
    assert_eq!((failing.state, failing.attempts), (ShardState::Failed, 2), "one try and one retry by the Job controller: {failing:?}");
    assert!(failing.reason.as_deref().unwrap_or_default().contains("BackoffLimitExceeded"), "{failing:?}");
    let partner_status = status.shards.iter().find(|s| s.name == "partner").unwrap();
    assert_eq!(partner_status.state, ShardState::Ready, "{partner_status:?}");

    // `kubectl logs` of a training pod shows the trainer's progress, one line per epoch.
    let logs = kubectl(&["-n", ns, "logs", "job/fundus-g1-finetune-hospital-1"]);
    assert_eq!(logs.lines().filter(|l| l.contains("epoch done")).count(), 2, "{logs}");
    let collect_logs = kubectl(&["-n", ns, "logs", "job/fundus-g1-collect-partner"]);
    assert!(collect_logs.contains("waiting for the hospital's vector"), "{collect_logs}");

    // No stage ran twice across the operator's restart: each Job created once, one pod each;
    // the failing shard's Job ran two.
    let created = created.lock().unwrap().clone();
    assert!(created.values().all(|uids| uids.len() == 1), "Jobs created again: {created:?}");
    assert!(created.contains_key("fundus-g1-evaluate"), "{created:?}");
    for job in jobs.list(&ListParams::default()).await.unwrap().items {
        let s = job.status.clone().unwrap_or_default();
        let pods = s.succeeded.unwrap_or(0) + s.failed.unwrap_or(0) + s.active.unwrap_or(0);
        let expected = if job.name_any().ends_with("hospital-5") { 2 } else { 1 };
        assert_eq!(pods, expected, "{} ran {pods} pods", job.name_any());
    }

    // Deleting the MergeJob: the operator's finalizer deletes its artifacts with the chart's S3
    // credentials, the garbage collector its Jobs, pods and ConfigMap.
    mjs.delete("fundus", &DeleteParams::default()).await.unwrap();
    eventually("the MergeJob gone (finalizer done)", Duration::from_secs(120), || async { mjs.get_opt("fundus").await.unwrap().is_none() }).await;
    eventually("its Jobs deleted by the garbage collector", Duration::from_secs(120), || async { jobs.list(&ListParams::default()).await.unwrap().items.is_empty() }).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    eventually("its pods deleted", Duration::from_secs(120), || async { pods.list(&ListParams::default()).await.unwrap().items.is_empty() }).await;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    eventually("its spec ConfigMap deleted", Duration::from_secs(60), || async { config_maps.list(&ListParams::default()).await.unwrap().items.iter().all(|cm| !cm.name_any().starts_with("fundus")) })
        .await;
    assert!(store.list(&format!("runs/{ns}/fundus/")).await.unwrap().is_empty(), "cleanup: Delete removes the run's artifacts");
    assert!(store.exists(PARTNER_VECTOR).await.unwrap(), "the hospital's own upload is not the run's to delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real node: run `make e2e-cluster`"]
async fn on_a_shared_claim_a_mergejob_outlives_its_ttl_deleted_jobs_and_a_deadline_ends_a_hospital_that_never_answers() {
    medmerge_operator::install_crypto_provider();
    let client = Client::try_default().await.unwrap();
    let ns = "e2e-pvc";
    let node_dir = PathBuf::from(env("MEDMERGE_NODE_DIR"));
    let work = node_dir.join(ns);
    let volumes = make_data(&work);
    namespace(&client, ns).await;
    // The same share the operator's pod mounts through the chart (`localArtifacts`).
    host_claim(&client, ns, "artifacts", Path::new(&env("MEDMERGE_E2E_ARTIFACTS_SHARE")), "ReadWriteMany").await;
    let data = |part: &str| json!({"hostPath": {"path": volumes.join(part), "type": "Directory"}});
    let mj = json!({
        "apiVersion": "medmerge.io/v1alpha1", "kind": "MergeJob", "metadata": {"name": "local", "namespace": ns},
        "spec": {
            "model": {"architecture": "resnet18", "weights": "random", "imageSize": 32, "classes": CLASSES},
            "shards": [
                {"name": "a", "data": {"path": ".", "volume": data("shard-1")}},
                {"name": "b", "data": {"path": ".", "volume": data("shard-2")}},
                // Never uploads: its collect Job waits until activeDeadlineSeconds ends it.
                {"name": "silent", "vector": "incoming/silent.safetensors"},
            ],
            "training": {"epochs": 2, "batchSize": 8, "learningRate": 0.001},
            "merge": {"baselines": []},
            "evaluation": {"data": {"path": ".", "volume": data("test")}, "explainImages": 0},
            "storage": {"local": {"path": "store", "persistentVolumeClaim": "artifacts"}, "cleanup": "Delete"},
            "cluster": cluster_settings(json!({"backoffLimit": 0, "minShards": 2, "activeDeadlineSeconds": 90, "ttlSecondsAfterFinished": 5})),
        }
    });
    let mjs: Api<MergeJob> = Api::namespaced(client.clone(), ns);
    let created = watch_jobs(&client, ns);
    create(&mjs, mj).await;
    let status = final_status(&mjs, "local", Duration::from_secs(900)).await;
    assert_eq!(status.phase, Some(Phase::Succeeded), "{status:#?}");
    let results = status.results.clone().expect("results read by the operator from its view of the claim");
    assert_eq!(results.model, format!("runs/{ns}/local/g1/restored/data-vector/model.safetensors"));
    let share = PathBuf::from(env("MEDMERGE_E2E_ARTIFACTS_SHARE")).join("store");
    assert!(share.join(&results.model).exists(), "the merged model is on the shared volume");
    let silent = status.shards.iter().find(|s| s.name == "silent").unwrap();
    assert_eq!(silent.state, ShardState::Failed, "{silent:?}");
    assert!(silent.reason.as_deref().unwrap_or_default().contains("DeadlineExceeded"), "the deadline is named: {silent:?}");

    // The TTL controller deleted finished Jobs during the run; no stage ran again for it.
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    eventually("every finished Job deleted by the TTL controller", Duration::from_secs(120), || async { jobs.list(&ListParams::default()).await.unwrap().items.is_empty() }).await;
    let created = created.lock().unwrap().clone();
    assert!(created.values().all(|uids| uids.len() == 1), "Jobs created again after the TTL controller deleted them: {created:?}");
    assert_eq!(created.len(), 15, "init, 2 x finetune, collect, merge, 3 restoration rounds of 2 shards + combine, evaluate: {created:?}");
    let status = mjs.get_status("local").await.unwrap().status.unwrap();
    assert!(status.stages.iter().any(|s| s.name == "evaluate" && s.state == StageOutcome::Succeeded), "{:?}", status.stages);

    mjs.delete("local", &DeleteParams::default()).await.unwrap();
    eventually("the MergeJob gone (finalizer done)", Duration::from_secs(120), || async { mjs.get_opt("local").await.unwrap().is_none() }).await;
    assert!(!share.join(format!("runs/{ns}/local")).exists(), "cleanup: Delete removed the run from the share");
}

/// Copies the synthetic ImageFolder `from` into `to` with the example's class names.
fn renamed_classes(from: &Path, to: &Path, names: &[&str]) {
    for (synthetic, name) in CLASSES.iter().chain(["cross"].iter()).zip(names) {
        let dir = from.join(synthetic);
        if !dir.exists() {
            continue;
        }
        std::fs::create_dir_all(to.join(name)).unwrap();
        for f in std::fs::read_dir(&dir).unwrap().flatten() {
            std::fs::copy(f.path(), to.join(name).join(f.file_name())).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real node: run `make e2e-cluster`"]
async fn the_cluster_example_runs_as_written_once_its_volumes_secrets_labels_and_gpus_are_there() {
    medmerge_operator::install_crypto_provider();
    let client = Client::try_default().await.unwrap();
    let ns = "radiology";
    let endpoint = env("MEDMERGE_S3_ENDPOINT");
    let work = PathBuf::from(env("MEDMERGE_NODE_DIR")).join("example");
    let example: Value = serde_yaml::from_str(&std::fs::read_to_string(fixtures::repo().join("examples/cluster.yaml")).unwrap()).unwrap();
    let classes: Vec<&str> = example["spec"]["model"]["classes"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();

    // What the example's header says to provision. Images: four synthetic classes renamed.
    let images = work.join("images");
    run_trainer(&["synth", "--out", images.to_str().unwrap(), "--classes", "4", "--per-class", "16", "--size", "48"]);
    run_trainer(&["split", "--data", images.to_str().unwrap(), "--out", work.join("split").to_str().unwrap(), "--shards", "4", "--test-fraction", "0.25", "--seed", "3"]);
    namespace(&client, ns).await;
    let parts = [("shard-1", Some("hospital-a-images")), ("shard-2", Some("hospital-b-images")), ("shard-3", Some("hospital-c-images")), ("test", Some("coordinator-test")), ("shard-4", None)];
    for (part, claim) in parts {
        let by_class = work.join("by-class").join(part);
        image_folder(&work.join(format!("split/{part}.csv")), &by_class);
        let volume = work.join("volumes").join(part);
        renamed_classes(&by_class, &volume, &classes);
        if let Some(claim) = claim {
            host_claim(&client, ns, claim, &volume, "ReadOnlyMany").await;
        }
    }
    for h in ["a", "b", "c"] {
        secret(&client, ns, &format!("hospital-{h}-data"), json!({"token": h})).await;
    }
    secret(&client, ns, "medmerge-s3", json!({"AWS_ACCESS_KEY_ID": env("AWS_ACCESS_KEY_ID"), "AWS_SECRET_ACCESS_KEY": env("AWS_SECRET_ACCESS_KEY")})).await;
    let store = bucket("medmerge").await;
    // The node: every hospital's and the coordinator's label, and GPUs advertised as an extended
    // resource (no device here; the trainer falls back to the CPU).
    let node = env("MEDMERGE_NODE_NAME");
    kubectl(&["label", "node", &node, "medmerge.io/hospital-a=true", "medmerge.io/hospital-b=true", "medmerge.io/hospital-c=true", "medmerge.io/pool=coordinator"]);
    kubectl(&["taint", "node", &node, "nvidia.com/gpu=present:NoSchedule"]);
    let gpus = r#"[{"op": "add", "path": "/status/capacity/nvidia.com~1gpu", "value": "8"}]"#;
    kubectl(&["patch", "node", &node, "--subresource=status", "--type=json", "-p", gpus]);
    let image = example["spec"]["cluster"]["image"].as_str().unwrap();
    let sock = format!("{}/run/containerd.sock", env("MEDMERGE_NODE_DIR"));
    let tagged = Command::new("ctr").args(["-a", &sock, "-n", "k8s.io", "images", "tag", "--force", &env("MEDMERGE_E2E_TRAINER_IMAGE"), image]).status().unwrap();
    assert!(tagged.success(), "tag the trainer image as {image}");

    // The partner clinic trains on its own premises once the run's base is in the bucket.
    let base_key = ArtifactLayout::new("runs", ns, "fundus", 1).base();
    let partner_vector = example["spec"]["shards"][3]["vector"].as_str().unwrap().to_string();
    let (store2, work2) = (store.clone(), work.clone());
    let partner = tokio::spawn(async move {
        while !store2.exists(&base_key).await.unwrap() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let base = work2.join("base.safetensors");
        store2.get_file(&base_key, &base).await.unwrap();
        let vector = work2.join("partner.safetensors");
        let args = [
            "finetune",
            "--base",
            base.to_str().unwrap(),
            "--data",
            work2.join("volumes/shard-4").to_str().unwrap(),
            "--shard",
            "partner-clinic",
            "--out",
            vector.to_str().unwrap(),
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--threads",
            "1",
        ]
        .map(String::from);
        tokio::task::spawn_blocking(move || run_trainer(&args.iter().map(String::as_str).collect::<Vec<_>>())).await.unwrap();
        store2.put_file(&partner_vector, &vector).await.unwrap();
    });

    // Applied as written, but for the S3 endpoint: the test node has no DNS.
    let yaml = std::fs::read_to_string(fixtures::repo().join("examples/cluster.yaml")).unwrap();
    let applied = work.join("cluster.yaml");
    std::fs::write(&applied, yaml.replace("http://minio.storage.svc:9000", &endpoint)).unwrap();
    kubectl(&["apply", "-f", applied.to_str().unwrap()]);
    let mjs: Api<MergeJob> = Api::namespaced(client.clone(), ns);
    let status = final_status(&mjs, "fundus", Duration::from_secs(1500)).await;
    partner.await.unwrap();
    assert_eq!(status.phase, Some(Phase::Succeeded), "{status:#?}");
    assert_eq!(status.shards_ready.as_deref(), Some("4/4"));
    let results = status.results.expect("results in status");
    assert!(results.baselines.iter().any(|b| b.id == "params-mean"), "{results:?}");
    // Placement as the example asks: hospitals on their nodes, GPUs requested, merge on CPU only.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let finetune = pods.list(&ListParams::default().labels("medmerge.io/stage=finetune-hospital-a")).await.unwrap().items;
    let spec = finetune[0].spec.clone().unwrap();
    assert_eq!(spec.node_selector.unwrap()["medmerge.io/hospital-a"], "true");
    assert_eq!(spec.containers[0].resources.clone().unwrap().limits.unwrap()["nvidia.com/gpu"].0, "1");
    let merge = pods.list(&ListParams::default().labels("medmerge.io/stage=merge-data-vector")).await.unwrap().items;
    let limits = merge[0].spec.clone().unwrap().containers[0].resources.clone().unwrap().limits.unwrap();
    assert!(!limits.contains_key("nvidia.com/gpu") && limits["memory"].0 == "2Gi", "{limits:?}");
    mjs.delete("fundus", &DeleteParams::default()).await.unwrap();
    // The node as the other scenarios expect it: no GPU taint (their pods do not tolerate it).
    kubectl(&["taint", "node", &node, "nvidia.com/gpu=present:NoSchedule-"]);
}

/// The trainer's stdout for `args` (asserting it succeeded).
fn trainer_output(args: &[&str]) -> String {
    let out = Command::new(fixtures::trainer()).args(args).output().unwrap();
    assert!(out.status.success(), "medmerge-trainer {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Where a secure-sum hospital uploads its masked vector.
fn masked_key(hospital: &str) -> String {
    format!("incoming/secure/{hospital}.masked.safetensors")
}

/// A hospital of a secure-sum MergeJob on its own premises: once the run's base is in the
/// bucket it fine-tunes on its images, masks its vector for the session and uploads only the
/// masked file; when the MergeJob's status says `dropped` was dropped, it uploads its share
/// about it (what lets the coordinator take that pair's masks out of the sum).
async fn masking_hospital(client: Client, ns: String, store: Store, me: &'static str, data: PathBuf, work: PathBuf, dropped: &'static str) {
    let path = |name: &str| work.join(name).to_str().unwrap().to_string();
    fetch_base(&store, &ns, "secure", &work.join("base.safetensors")).await;
    let identity = |w: &[String]| -> Vec<String> {
        let mut args: Vec<String> = ["--self", me, "--key", &path("key"), "--roster"].map(String::from).to_vec();
        args.extend([work.parent().unwrap().join("roster.yaml").to_str().unwrap().to_string(), "--session".into(), "e2e-secure-1".into()]);
        args.extend_from_slice(w);
        args
    };
    let finetune = finetune_args(&work.join("base.safetensors"), &data, me, &work.join("vector.safetensors"));
    let mask =
        [vec!["secure".to_string(), "mask".into()], identity(&["--base", &path("base.safetensors"), "--vector", &path("vector.safetensors"), "--out", &path("masked.safetensors")].map(String::from))]
            .concat();
    tokio::task::spawn_blocking(move || {
        for args in [finetune, mask] {
            run_trainer(&args.iter().map(String::as_str).collect::<Vec<_>>());
        }
    })
    .await
    .unwrap();
    store.put_file(&masked_key(me), &work.join("masked.safetensors")).await.unwrap();
    let mjs: Api<MergeJob> = Api::namespaced(client, &ns);
    loop {
        let status = mjs.get_status("secure").await.unwrap().status.unwrap_or_default();
        if status.shards.iter().any(|s| s.name == dropped && s.state == ShardState::Dropped) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let share = [vec!["secure".to_string(), "share".into()], identity(&["--dropped", dropped, "--out", &path("share.json")].map(String::from))].concat();
    run_trainer(&share.iter().map(String::as_str).collect::<Vec<_>>());
    store.put_file(&format!("{}.dropout-{dropped}.json", masked_key(me)), &work.join("share.json")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real node: run `make e2e-cluster`"]
async fn with_secure_sum_the_cluster_merges_only_masked_uploads_and_a_dropped_hospitals_masks_come_out_with_the_survivors_shares() {
    medmerge_operator::install_crypto_provider();
    let client = Client::try_default().await.unwrap();
    let ns = "e2e-secure";
    let endpoint = env("MEDMERGE_S3_ENDPOINT");
    let work = PathBuf::from(env("MEDMERGE_NODE_DIR")).join(ns);
    let volumes = make_data(&work);
    namespace(&client, ns).await;
    secret(&client, ns, "bucket-creds", json!({"AWS_ACCESS_KEY_ID": env("AWS_ACCESS_KEY_ID"), "AWS_SECRET_ACCESS_KEY": env("AWS_SECRET_ACCESS_KEY")})).await;
    // Each hospital's key pair; the roster of public keys is what they agree on beforehand.
    let hospitals = ["h-1", "h-2", "h-3"];
    let mut roster = String::new();
    for h in hospitals {
        std::fs::create_dir_all(work.join(h)).unwrap();
        let said = trainer_output(&["secure", "keygen", "--out", work.join(h).join("key").to_str().unwrap()]);
        roster.push_str(&format!("{h}: {}\n", said.trim().rsplit(' ').next().unwrap()));
    }
    std::fs::write(work.join("roster.yaml"), roster).unwrap();
    let store = bucket(BUCKET).await;
    // h-1 and h-2 train and upload; h-3 never does.
    let survivors: Vec<_> = ["h-1", "h-2"]
        .into_iter()
        .zip(["shard-1", "shard-2"])
        .map(|(h, shard)| tokio::spawn(masking_hospital(client.clone(), ns.into(), store.clone(), h, work.join(format!("split/{shard}.csv")), work.join(h), "h-3")))
        .collect();

    let mj = json!({
        "apiVersion": "medmerge.io/v1alpha1", "kind": "MergeJob", "metadata": {"name": "secure", "namespace": ns},
        "spec": {
            "model": {"architecture": "resnet18", "weights": "random", "imageSize": 32, "classes": CLASSES},
            "shards": hospitals.iter().map(|h| json!({"name": h, "vector": masked_key(h)})).collect::<Vec<_>>(),
            "restore": {"mode": "none"},
            "merge": {"baselines": [], "secureSum": {"session": "e2e-secure-1"}},
            "evaluation": {"data": {"path": ".", "volume": {"hostPath": {"path": volumes.join("test"), "type": "Directory"}}}, "explainImages": 0},
            "storage": {"s3": {"bucket": BUCKET, "endpoint": endpoint, "credentialsSecret": "bucket-creds"}, "cleanup": "Delete"},
            "cluster": cluster_settings(json!({"backoffLimit": 1, "minShards": 2, "stragglerDeadlineSeconds": 180})),
        }
    });
    let mjs: Api<MergeJob> = Api::namespaced(client.clone(), ns);
    create(&mjs, mj).await;
    let status = final_status(&mjs, "secure", Duration::from_secs(900)).await;
    assert_eq!(status.phase, Some(Phase::Succeeded), "{status:#?}");
    for s in survivors {
        s.await.unwrap();
    }
    let dropped = status.shards.iter().find(|s| s.name == "h-3").unwrap();
    assert_eq!(dropped.state, ShardState::Dropped, "{dropped:?}");
    let results = status.results.clone().expect("results");
    assert!((0.0..=1.0).contains(&results.accuracy), "{results:?}");

    // What the coordinator holds of each hospital is its masked upload, never its vector.
    let run = ArtifactLayout::new("runs", ns, "secure", 1);
    let held = work.join("held.safetensors");
    store.get_file(&run.shard_vector("h-1"), &held).await.unwrap();
    let file = medmerge_trainer::st::MappedFile::open(&held).unwrap();
    assert!(file.metadata().contains_key(medmerge_trainer::secure::merge::MASKED_KEY) && file.tensors().all(|t| format!("{:?}", t.dtype) == "U64"), "the run's copy of h-1's vector is masked");

    // The merged model is the plain merge of h-1 and h-2's vectors (which never left them).
    let merged = work.join("merged.safetensors");
    store.get_file(&run.merged("data-vector"), &merged).await.unwrap();
    let plain = work.join("plain.safetensors");
    let (v1, v2) = (format!("h-1={}", work.join("h-1/vector.safetensors").display()), format!("h-2={}", work.join("h-2/vector.safetensors").display()));
    run_trainer(&[
        "merge",
        "--base",
        work.join("h-1/base.safetensors").to_str().unwrap(),
        "--vector",
        &v1,
        "--vector",
        &v2,
        "--method",
        "data-vector",
        "--lambda",
        "2.0",
        "--out",
        plain.to_str().unwrap(),
    ]);
    let (a, b) = (medmerge_trainer::st::MappedFile::open(&merged).unwrap(), medmerge_trainer::st::MappedFile::open(&plain).unwrap());
    for t in a.tensors() {
        let diff = a.f32(&t.name).unwrap().iter().zip(b.f32(&t.name).unwrap()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-5, "{}: secure and plain merge differ by {diff}", t.name);
    }
    mjs.delete("secure", &DeleteParams::default()).await.unwrap();
    eventually("the MergeJob gone (finalizer done)", Duration::from_secs(120), || async { mjs.get_opt("secure").await.unwrap().is_none() }).await;
}
