//! The operator against a real kube-apiserver + etcd. No kubelet or Job controller runs there,
//! so this test plays the node: it sets each stage Job's status from outside, as the Job
//! controller would, and checks which Jobs the operator creates next and what it writes back.
//!
//! Run with `make e2e-operator` (it starts the API server and applies the CRD); ignored by a
//! plain `cargo test` because it needs that server.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use medmerge_crds::{ArtifactLayout, MergeJob};
use medmerge_operator::artifacts::ArtifactStore;
use medmerge_operator::controller::{self, Context};
use medmerge_operator::jobs::LABEL_GENERATION;
use medmerge_operator::leader::LeaderElector;
use medmerge_operator::telemetry::Metrics;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// One namespace with its own operator (leader-elected through a real Lease) watching it.
struct Harness {
    client: Client,
    ns: String,
    store: PathBuf,
    metrics: Arc<Metrics>,
    controller: tokio::task::JoinHandle<()>,
}

impl Harness {
    async fn start(ns: &str) -> Harness {
        medmerge_operator::install_crypto_provider();
        let client = Client::try_default().await.expect("KUBECONFIG points at the test API server (run `make e2e-operator`)");
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
        namespaces.create(&PostParams::default(), &namespace).await.unwrap();
        let store = std::env::temp_dir().join(format!("medmerge-e2e-{ns}-{}", std::process::id()));
        std::fs::create_dir_all(&store).unwrap();
        let metrics = Arc::new(Metrics::default());
        let elector = LeaderElector::new(Api::<Lease>::namespaced(client.clone(), ns), "medmerge-operator", "e2e-replica", Duration::from_secs(15));
        tokio::time::timeout(WAIT, elector.acquire()).await.expect("the leader Lease is taken");
        let (job_store, job_cache) = controller::job_cache();
        let ctx = Arc::new(Context::new(client.clone(), "e2e-replica", metrics.clone(), ArtifactStore::new(Some(store.parent().unwrap().to_path_buf())), job_store));
        let (mjs, jobs) = (Api::namespaced(client.clone(), ns), Api::namespaced(client.clone(), ns));
        let controller = tokio::spawn(controller::run(mjs, jobs, job_cache, ctx, std::future::pending()));
        Harness { client, ns: ns.into(), store, metrics, controller }
    }

    fn mergejobs(&self) -> Api<MergeJob> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn jobs(&self) -> Api<Job> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn mergejob(&self, name: &str, extra_spec: serde_json::Value) -> MergeJob {
        let mut spec = json!({
            "model": {"architecture": "resnet18", "weights": "random", "classes": ["a", "b"]},
            "shards": [{"name": "a", "data": {"path": "s3://data/a/"}}, {"name": "b", "data": {"path": "s3://data/b/"}}, {"name": "c", "data": {"path": "s3://data/c/"}}],
            "evaluation": {"data": {"path": "s3://data/test/"}},
            "merge": {"baselines": ["paramsMean"]},
            // One restoration round keeps the stage sequence short; rounds are the plan's business.
            "restore": {"mode": "bnRecalibrate"},
            // The operator sees the artifacts claim at the store's parent directory.
            "storage": {"local": {"path": self.store.file_name().unwrap().to_str().unwrap(), "persistentVolumeClaim": "artifacts"}},
        });
        merge_json(&mut spec, extra_spec);
        serde_json::from_value(json!({"apiVersion": "medmerge.io/v1alpha1", "kind": "MergeJob", "metadata": {"name": name, "namespace": self.ns}, "spec": spec})).unwrap()
    }

    /// Stage Job names of `generation` of `mj`.
    async fn stage_jobs(&self, mj: &str, generation: i64) -> BTreeSet<String> {
        let selector = format!("medmerge.io/mergejob={mj},{LABEL_GENERATION}={generation}");
        let jobs = self.jobs().list(&ListParams::default().labels(&selector)).await.unwrap();
        jobs.items.iter().map(|j| j.labels()["medmerge.io/stage"].clone()).collect()
    }

    /// Plays the Job controller: marks Job `name` as finished.
    async fn finish(&self, name: &str, succeeded: bool) {
        let now = Timestamp::now().to_string();
        let status = if succeeded {
            json!({"startTime": now, "completionTime": now, "succeeded": 1, "conditions": [{"type": "Complete", "status": "True", "lastProbeTime": now, "lastTransitionTime": now}]})
        } else {
            json!({"startTime": now, "failed": 3, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "lastProbeTime": now, "lastTransitionTime": now}]})
        };
        self.jobs().patch_status(name, &PatchParams::default(), &Patch::Merge(json!({"status": status}))).await.unwrap();
    }

    /// Waits until generation `generation` of `mj` has exactly `expected` stage Jobs.
    async fn expect_stages(&self, mj: &str, generation: i64, expected: &[&str]) {
        let expected: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
        let seen = std::cell::RefCell::new(BTreeSet::new());
        let ok = poll(|| async {
            let now = self.stage_jobs(mj, generation).await;
            let done = now == expected;
            *seen.borrow_mut() = now;
            done
        })
        .await;
        assert!(ok, "expected stage Jobs {expected:?} for {mj} g{generation}, the operator created {:?}", seen.borrow());
    }

    async fn status_of(&self, mj: &str) -> serde_json::Value {
        serde_json::to_value(self.mergejobs().get_status(mj).await.unwrap().status).unwrap()
    }
}

fn merge_json(base: &mut serde_json::Value, extra: serde_json::Value) {
    if let (Some(b), serde_json::Value::Object(e)) = (base.as_object_mut(), extra) {
        b.extend(e);
    }
}

/// Polls `check` every 200 ms until it holds or `WAIT` passes.
async fn poll<F: Future<Output = bool>>(mut check: impl FnMut() -> F) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

#[tokio::test]
#[ignore = "needs a kube-apiserver: run `make e2e-operator`"]
async fn a_mergejob_drives_every_stage_as_jobs_and_records_results() {
    let h = Harness::start("e2e-run").await;
    let mj = h.mergejob("retina", json!({"cluster": {"minShards": 2}}));
    let created = h.mergejobs().create(&PostParams::default(), &mj).await.unwrap();

    h.expect_stages("retina", 1, &["init"]).await;
    assert!(poll(|| async { h.status_of("retina").await["phase"] == "Training" }).await, "phase Training while init runs");
    let init = h.jobs().get("retina-g1-init").await.unwrap();
    let owner = &init.owner_references()[0];
    assert_eq!((owner.kind.as_str(), owner.uid.as_str(), owner.controller), ("MergeJob", created.uid().unwrap().as_str(), Some(true)));
    h.finish("retina-g1-init", true).await;

    h.expect_stages("retina", 1, &["init", "finetune-a", "finetune-b", "finetune-c"]).await;
    let layout = ArtifactLayout::new("runs", "e2e-run", "retina", 1);
    let shard_metrics = h.store.join(layout.shard_metrics("a"));
    std::fs::create_dir_all(shard_metrics.parent().unwrap()).unwrap();
    std::fs::write(&shard_metrics, br#"{"class_counts": [30, 12], "best_epoch": 1, "epochs": [{"epoch": 1, "validation_accuracy": 0.8}]}"#).unwrap();
    h.finish("retina-g1-finetune-a", true).await;
    h.finish("retina-g1-finetune-b", true).await;
    h.finish("retina-g1-finetune-c", false).await;

    // Shard c failed; the quorum of 2 holds, so the merge goes on without it.
    let stages_before_merge = ["init", "finetune-a", "finetune-b", "finetune-c"];
    let with = |more: &[&'static str]| stages_before_merge.iter().copied().chain(more.iter().copied()).collect::<Vec<_>>();
    h.expect_stages("retina", 1, &with(&["merge-data-vector", "merge-params-mean"])).await;
    let status = h.status_of("retina").await;
    assert_eq!((status["phase"].as_str(), status["shardsReady"].as_str()), (Some("Merging"), Some("2/3")));
    let shard_c = status["shards"].as_array().unwrap().iter().find(|s| s["name"] == "c").unwrap().clone();
    assert_eq!(shard_c["state"], "Failed");
    let shard_a = status["shards"].as_array().unwrap().iter().find(|s| s["name"] == "a").unwrap().clone();
    assert_eq!((shard_a["samples"].as_u64(), shard_a["validationAccuracy"].as_f64()), (Some(42), Some(0.8)));
    h.finish("retina-g1-merge-data-vector", true).await;
    h.finish("retina-g1-merge-params-mean", true).await;

    let restores = ["restore-data-vector-bn-a", "restore-data-vector-bn-b", "restore-params-mean-bn-a", "restore-params-mean-bn-b"];
    let merges = ["merge-data-vector", "merge-params-mean"];
    let all: Vec<&str> = with(&merges).into_iter().chain(restores).collect();
    h.expect_stages("retina", 1, &all).await;
    for stage in restores {
        h.finish(&format!("retina-g1-{stage}"), true).await;
    }
    let all: Vec<&str> = all.into_iter().chain(["restore-data-vector-bn", "restore-params-mean-bn"]).collect();
    h.expect_stages("retina", 1, &all).await;
    h.finish("retina-g1-restore-data-vector-bn", true).await;
    h.finish("retina-g1-restore-params-mean-bn", true).await;

    let all: Vec<&str> = all.into_iter().chain(["evaluate"]).collect();
    h.expect_stages("retina", 1, &all).await;
    let report = h.store.join(layout.eval_metrics());
    std::fs::create_dir_all(report.parent().unwrap()).unwrap();
    std::fs::write(
        &report,
        br#"{"candidates": [{"id": "data-vector", "metrics": {"accuracy": 0.913, "macro_f1": 0.9, "macro_auroc": 0.98}},
                            {"id": "params-mean", "metrics": {"accuracy": 0.88, "macro_f1": 0.87}}]}"#,
    )
    .unwrap();
    h.finish("retina-g1-evaluate", true).await;

    assert!(poll(|| async { h.status_of("retina").await["phase"] == "Succeeded" }).await, "phase Succeeded after evaluate");
    let status = h.status_of("retina").await;
    assert_eq!(status["results"]["accuracy"].as_f64(), Some(0.913));
    assert_eq!(status["results"]["baselines"][0]["id"], "params-mean");
    assert_eq!(status["observedGeneration"], 1);
    assert!(status["completionTime"].is_string() && status["startTime"].is_string());
    let ready = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap().clone();
    assert_eq!(ready["status"], "True");

    let events: Api<Event> = Api::namespaced(h.client.clone(), "e2e-run");
    let reasons = std::cell::RefCell::new(BTreeSet::new());
    let found = poll(|| async {
        let now: BTreeSet<String> = events.list(&ListParams::default()).await.unwrap().items.into_iter().filter_map(|e| e.reason).collect();
        let done = now.contains("StageStarted") && now.contains("Succeeded");
        *reasons.borrow_mut() = now;
        done
    })
    .await;
    assert!(found, "Events for stage starts and success; found {:?}", reasons.borrow());

    // What an MLOps team sees.
    let table = std::process::Command::new("kubectl").args(["get", "mj", "-n", "e2e-run"]).output().expect("kubectl runs");
    let table = String::from_utf8_lossy(&table.stdout);
    let row = table.lines().find(|l| l.starts_with("retina")).unwrap_or_default();
    assert!(row.split_whitespace().take(4).eq(["retina", "Succeeded", "2/3", "0.913"]), "kubectl get mj shows:\n{table}");

    // A finished generation stays finished; a spec edit starts generation 2 beside it.
    let jobs_before = h.stage_jobs("retina", 1).await;
    h.mergejobs().patch("retina", &PatchParams::default(), &Patch::Merge(json!({"spec": {"merge": {"lambda": 0.5}}}))).await.unwrap();
    h.expect_stages("retina", 2, &["init"]).await;
    assert_eq!(h.stage_jobs("retina", 1).await, jobs_before, "generation 1's Jobs are left alone");
    assert!(poll(|| async { h.status_of("retina").await["observedGeneration"] == 2 }).await);
    assert_eq!(h.status_of("retina").await["phase"], "Training");
    h.controller.abort();
}

#[tokio::test]
#[ignore = "needs a kube-apiserver: run `make e2e-operator`"]
async fn bad_mergejobs_are_refused_by_field_and_never_spin() {
    let h = Harness::start("e2e-invalid").await;

    // What the schema can check, the API server refuses at once, naming the field.
    let out_of_range = h.mergejob("lambda", json!({"merge": {"lambda": 9.0}}));
    let err = h.mergejobs().create(&PostParams::default(), &out_of_range).await.unwrap_err().to_string();
    assert!(err.contains("spec.merge.lambda"), "{err}");

    // What needs the whole spec, the operator refuses with an InvalidSpec condition.
    let quorum = h.mergejob("quorum", json!({"cluster": {"minShards": 5}}));
    h.mergejobs().create(&PostParams::default(), &quorum).await.unwrap();
    assert!(poll(|| async { h.status_of("quorum").await["phase"] == "Failed" }).await, "an invalid spec fails");
    let status = h.status_of("quorum").await;
    let failed = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Failed").unwrap().clone();
    assert_eq!(failed["reason"], "InvalidSpec");
    assert!(failed["message"].as_str().unwrap().contains("spec.cluster.minShards"), "{failed}");
    assert!(h.stage_jobs("quorum", 1).await.is_empty(), "no Jobs for an invalid spec");

    // No hot loop: with nothing changing, reconciles stop.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let count = || h.metrics.render().lines().find(|l| l.starts_with("medmerge_reconciles_total")).unwrap().to_string();
    let before = count();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(count(), before, "the invalid MergeJob is not reconciled again without a change");
    h.controller.abort();
}

#[tokio::test]
#[ignore = "needs a kube-apiserver: run `make e2e-operator`"]
async fn deleting_a_mergejob_deletes_its_artifacts_only_when_asked() {
    let h = Harness::start("e2e-cleanup").await;
    for (name, cleanup) in [("keep", "Retain"), ("drop", "Delete")] {
        let mut mj = h.mergejob(name, json!({}));
        mj.spec.storage.cleanup = serde_json::from_value(json!(cleanup)).unwrap();
        h.mergejobs().create(&PostParams::default(), &mj).await.unwrap();
        h.expect_stages(name, 1, &["init"]).await;
        let artifact = h.store.join(ArtifactLayout::new("runs", "e2e-cleanup", name, 1).base());
        std::fs::create_dir_all(artifact.parent().unwrap()).unwrap();
        std::fs::write(&artifact, b"weights").unwrap();
    }
    let api = h.mergejobs();
    let has_finalizer = |name: &'static str| {
        let api = api.clone();
        async move { !api.get(name).await.unwrap().finalizers().is_empty() }
    };
    assert!(poll(|| has_finalizer("drop")).await, "cleanup: Delete holds a finalizer");
    assert!(!has_finalizer("keep").await, "cleanup: Retain holds none");

    for name in ["keep", "drop"] {
        h.mergejobs().delete(name, &Default::default()).await.unwrap();
    }
    let gone = |name: &'static str| {
        let api = api.clone();
        async move { api.get_opt(name).await.unwrap().is_none() }
    };
    assert!(poll(|| gone("drop")).await && poll(|| gone("keep")).await, "both MergeJobs are deleted");
    assert!(!h.store.join("runs/e2e-cleanup/drop").exists(), "Delete removed the artifacts");
    assert!(h.store.join(ArtifactLayout::new("runs", "e2e-cleanup", "keep", 1).base()).exists(), "Retain kept them");
    h.controller.abort();
}

#[tokio::test]
#[ignore = "needs a kube-apiserver: run `make e2e-operator`"]
async fn suspend_and_placement_edits_continue_the_run_and_a_result_edit_stops_the_old_one() {
    let h = &Harness::start("e2e-runs").await;
    h.mergejobs().create(&PostParams::default(), &h.mergejob("cornea", json!({}))).await.unwrap();
    h.expect_stages("cornea", 1, &["init"]).await;
    h.finish("cornea-g1-init", true).await;
    let training = ["init", "finetune-a", "finetune-b", "finetune-c"];
    h.expect_stages("cornea", 1, &training).await;
    h.finish("cornea-g1-finetune-a", true).await;
    let finished_uid = h.jobs().get("cornea-g1-finetune-a").await.unwrap().uid();
    let patch = |spec: serde_json::Value| async move { h.mergejobs().patch("cornea", &PatchParams::default(), &Patch::Merge(json!({ "spec": spec }))).await.unwrap() };
    let status_is = |generation: i64, phase: &'static str| async move {
        let s = h.status_of("cornea").await;
        s["observedGeneration"] == generation && s["phase"] == phase
    };

    // Suspend: the run stays run 1, nothing new starts, and the unfinished Jobs stop running:
    // suspended where the API server keeps Job spec.suspend, deleted where it does not (< 1.21).
    patch(json!({"suspend": true})).await;
    assert!(poll(|| status_is(2, "Suspended")).await, "phase Suspended at generation 2");
    assert_eq!(h.status_of("cornea").await["run"], 1);
    let stopped = |job: &'static str| async move { h.jobs().get_opt(job).await.unwrap().is_none_or(|j| j.spec.and_then(|s| s.suspend) == Some(true)) };
    assert!(poll(|| async { stopped("cornea-g1-finetune-b").await && stopped("cornea-g1-finetune-c").await }).await, "unfinished Jobs stop");
    assert!(h.stage_jobs("cornea", 2).await.is_empty(), "a suspend starts no new run");

    // Resume: the same run carries on; the finished stage is not run again.
    patch(json!({"suspend": false})).await;
    assert!(poll(|| status_is(3, "Training")).await, "training again at generation 3");
    h.expect_stages("cornea", 1, &training).await;
    assert!(poll(|| async { !stopped("cornea-g1-finetune-b").await && !stopped("cornea-g1-finetune-c").await }).await, "unfinished stages run again");
    assert_eq!(h.jobs().get("cornea-g1-finetune-a").await.unwrap().uid(), finished_uid, "finetune-a is kept, not redone");

    // A placement-only edit applies to the current run.
    patch(json!({"cluster": {"stragglerDeadlineSeconds": 3600, "backoffLimit": 4}})).await;
    assert!(poll(|| status_is(4, "Training")).await);
    assert_eq!(h.status_of("cornea").await["run"], 1);
    assert!(h.stage_jobs("cornea", 4).await.is_empty(), "no new run for a deadline");

    // A result-changing edit starts run 5 and stops run 1's unfinished Jobs; finished ones stay.
    patch(json!({"merge": {"lambda": 0.5}})).await;
    h.expect_stages("cornea", 5, &["init"]).await;
    assert!(poll(|| async { h.stage_jobs("cornea", 1).await == BTreeSet::from(["init".to_string(), "finetune-a".to_string()]) }).await, "run 1's unfinished Jobs are deleted");
    assert_eq!(h.status_of("cornea").await["run"], 5);
    let events: Api<Event> = Api::namespaced(h.client.clone(), "e2e-runs");
    // Events with one reason form one series (kube's recorder): count its occurrences.
    let occurrences = |e: &Event| e.series.as_ref().map_or(1, |s| s.count);
    let superseded = || async { events.list(&ListParams::default()).await.unwrap().items.iter().filter(|e| e.reason.as_deref() == Some("SupersededJobStopped")).map(occurrences).sum::<i32>() >= 2 };
    assert!(poll(superseded).await, "an Event for each stopped Job");
    h.controller.abort();
}

#[tokio::test]
#[ignore = "needs a kube-apiserver: run `make e2e-operator`"]
async fn a_straggler_past_its_deadline_is_dropped_and_its_job_stopped() {
    let h = &Harness::start("e2e-straggler").await;
    let mj = h.mergejob("slow", json!({"cluster": {"minShards": 2, "stragglerDeadlineSeconds": 3}}));
    h.mergejobs().create(&PostParams::default(), &mj).await.unwrap();
    h.expect_stages("slow", 1, &["init"]).await;
    h.finish("slow-g1-init", true).await;
    h.expect_stages("slow", 1, &["init", "finetune-a", "finetune-b", "finetune-c"]).await;
    h.finish("slow-g1-finetune-a", true).await;
    h.finish("slow-g1-finetune-b", true).await;

    // finetune-c never finishes: past the deadline its Job is deleted and the merge goes on.
    let merging = ["init", "finetune-a", "finetune-b", "merge-data-vector", "merge-params-mean"];
    h.expect_stages("slow", 1, &merging).await;
    let status = h.status_of("slow").await;
    let shard_c = status["shards"].as_array().unwrap().iter().find(|s| s["name"] == "c").unwrap().clone();
    assert_eq!(shard_c["state"], "Dropped", "{status}");
    let record = status["stages"].as_array().unwrap().iter().find(|s| s["name"] == "finetune-c").cloned();
    assert_eq!(record.map(|r| r["state"].clone()), Some(json!("Dropped")), "remembered once its Job is gone");
    // Still dropped, and not started again, after more reconciles.
    h.finish("slow-g1-merge-data-vector", true).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!h.stage_jobs("slow", 1).await.contains("finetune-c"), "the dropped shard is not trained again");
    h.controller.abort();
}

#[tokio::test]
#[ignore = "needs a kube-apiserver: run `make e2e-operator`"]
async fn the_serving_example_deployment_and_service_are_accepted_by_the_api_server() {
    use kube::api::DynamicObject;
    use kube::core::GroupVersionKind;
    use serde::Deserialize;
    medmerge_operator::install_crypto_provider();
    let client = Client::try_default().await.unwrap();
    let text = std::fs::read_to_string(medmerge_tests::fixtures::repo().join("examples/serving/merged-model.yaml")).unwrap();
    let mut kinds = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let object = DynamicObject::deserialize(doc).unwrap();
        let types = object.types.clone().expect("every document names its kind");
        let (group, version) = types.api_version.rsplit_once('/').unwrap_or(("", &types.api_version));
        let (resource, _) = kube::discovery::pinned_kind(&client, &GroupVersionKind::gvk(group, version, &types.kind)).await.unwrap();
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &resource);
        // Server-side dry run: the real API server's validation and defaulting, nothing stored.
        api.create(&PostParams { dry_run: true, ..Default::default() }, &object).await.unwrap_or_else(|e| panic!("{} {}: {e}", types.kind, object.name_any()));
        kinds.push(types.kind);
    }
    assert_eq!(kinds, ["Deployment", "Service"]);
}
