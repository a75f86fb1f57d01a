//! The exact API calls of one reconcile, against a mock API server (tower-test). The real
//! API server is exercised by `tests/apiserver.rs`; this pins down what is sent, in what order.

use std::pin::pin;
use std::sync::Arc;

use http::{Method, Request, Response};
use kube::client::Body;
use kube::runtime::{reflector, watcher};
use kube::Client;
use medmerge_crds::MergeJob;
use medmerge_operator::artifacts::ArtifactStore;
use medmerge_operator::controller::{self, reconcile, Context};
use medmerge_operator::job_cache::ManagedJob;
use medmerge_operator::telemetry::Metrics;
use serde_json::{json, Value};
use tower_test::mock;

type Handle = mock::Handle<Request<Body>, Response<Body>>;

fn mergejob(status: Value) -> MergeJob {
    serde_json::from_value(json!({
        "apiVersion": "medmerge.io/v1alpha1", "kind": "MergeJob",
        "metadata": {"name": "retina", "namespace": "radiology", "uid": "u-1", "generation": 1, "resourceVersion": "7"},
        "spec": {
            "model": {"architecture": "resnet18", "weights": "random", "classes": ["x", "y"]},
            "shards": [{"name": "a", "data": {"path": "s3://data/a/"}, "secretRef": "creds-a"}],
            "evaluation": {"data": {"path": "s3://data/t/"}},
            "merge": {"baselines": []},
            "storage": {"s3": {"bucket": "runs"}},
        },
        "status": status,
    }))
    .unwrap()
}

/// Answers the next request with `reply` after checking its method and path; returns its body.
async fn expect(handle: &mut std::pin::Pin<&mut Handle>, method: Method, path_prefix: &str, reply: Value) -> Value {
    let (request, send) = handle.next_request().await.expect("the operator made no further API call");
    let uri = request.uri().to_string();
    assert_eq!((request.method(), uri.starts_with(path_prefix)), (&method, true), "unexpected call {} {uri}", request.method());
    let body = request.into_body().collect_bytes().await.unwrap();
    send.send_response(Response::builder().body(Body::from(serde_json::to_vec(&reply).unwrap())).unwrap());
    if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).unwrap()
    }
}

/// A context whose Job cache has had its first full listing, holding `jobs`, and whose
/// MergeJob cache holds `mj` (where Job changes look it up once their turn comes).
fn context(client: Client, jobs: Vec<ManagedJob>, mj: &MergeJob) -> Arc<Context> {
    let (store, mut writer) = controller::job_cache();
    writer.apply_watcher_event(&watcher::Event::Init);
    for job in jobs {
        writer.apply_watcher_event(&watcher::Event::InitApply(job));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    let (mergejobs, mut mergejob_writer) = reflector::store();
    mergejob_writer.apply_watcher_event(&watcher::Event::Apply(mj.clone()));
    Arc::new(Context::new(client, "test", Arc::new(Metrics::default()), ArtifactStore::new(None), store).with_mergejobs(mergejobs))
}

/// A Job of MergeJob retina's generation 1, in the state the Job controller reports.
fn job(stage: &str, status: Value) -> ManagedJob {
    serde_json::from_value(json!({
        "metadata": {"name": format!("retina-g1-{stage}"), "namespace": "radiology", "creationTimestamp": "2026-11-22T10:00:00Z",
                     "labels": {"medmerge.io/mergejob": "retina", "medmerge.io/generation": "1", "medmerge.io/stage": stage, "app.kubernetes.io/managed-by": "medmerge"}},
        "status": status,
    }))
    .unwrap()
}

#[tokio::test]
async fn a_new_mergejob_gets_a_status_its_spec_configmap_the_init_job_and_an_event() {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    // Another MergeJob's init Job, and a previous generation's, are in the cache too: not ours.
    let mut other = job("init", json!({"succeeded": 1}));
    other.metadata.labels.as_mut().unwrap().insert("medmerge.io/mergejob".into(), "fundus".into());
    let mut old = job("init", json!({"succeeded": 1}));
    old.metadata.labels.as_mut().unwrap().insert("medmerge.io/generation".into(), "0".into());
    let ctx = context(Client::new(service, "default"), vec![other, old], &mergejob(Value::Null));
    let server = tokio::spawn(async move {
        let mut handle = pin!(handle);
        // Jobs come from the cache: the first call is already the status (written before the
        // Jobs are created, so that it never waits behind other MergeJobs' Job creations).
        let status = expect(
            &mut handle,
            Method::PATCH,
            "/apis/medmerge.io/v1alpha1/namespaces/radiology/mergejobs/retina/status?&fieldManager=medmerge-operator",
            serde_json::to_value(mergejob(Value::Null)).unwrap(),
        )
        .await;
        // One JSON patch replaces the whole status.
        assert_eq!((status[0]["op"].as_str(), status[0]["path"].as_str()), (Some("add"), Some("/status")), "{status}");
        let status = &status[0]["value"];
        assert_eq!((status["phase"].as_str(), status["observedGeneration"].as_i64()), (Some("Training"), Some(1)));
        assert_eq!(status["shardsReady"], "0/1");
        let transition = expect(&mut handle, Method::POST, "/apis/events.k8s.io/v1/namespaces/radiology/events", json!({"metadata": {}})).await;
        assert_eq!(transition["reason"], "Training");
        let cm = expect(&mut handle, Method::PATCH, "/api/v1/namespaces/radiology/configmaps/retina-g1-spec?&force=true&fieldManager=medmerge-operator", json!({"metadata": {}})).await;
        assert!(cm["data"]["mergejob.yaml"].as_str().unwrap().contains("creds-a"));
        let job = expect(&mut handle, Method::POST, "/apis/batch/v1/namespaces/radiology/jobs?&fieldManager=medmerge-operator", json!({"metadata": {}})).await;
        assert_eq!(job["metadata"]["ownerReferences"][0]["uid"], "u-1");
        let volumes = job["spec"]["template"]["spec"]["volumes"].to_string();
        assert!(!volumes.contains("creds-a"), "the coordinator's init Job must not see a shard's secret");
        let event = expect(&mut handle, Method::POST, "/apis/events.k8s.io/v1/namespaces/radiology/events", json!({"metadata": {}})).await;
        assert_eq!(event["reason"], "StageStarted");
        assert!(event["note"].as_str().unwrap().contains("init as Job retina-g1-init"), "{event}");
    });
    reconcile(Arc::new(mergejob(Value::Null)), ctx).await.unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn a_finished_generation_makes_no_api_call_at_all() {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    // With the server gone, any API call would fail the reconcile.
    drop(handle);
    let finished = mergejob(json!({"phase": "Succeeded", "observedGeneration": 1}));
    let ctx = context(Client::new(service, "default"), vec![], &finished);
    let action = reconcile(Arc::new(finished), ctx).await.unwrap();
    assert_eq!(action, kube::runtime::controller::Action::await_change());
}

#[tokio::test]
async fn a_finished_init_job_in_the_cache_starts_the_hospitals_training() {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let training = mergejob(json!({"phase": "Training", "observedGeneration": 1}));
    let ctx = context(Client::new(service, "default"), vec![job("init", json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}))], &training);
    let server = tokio::spawn(async move {
        let mut handle = pin!(handle);
        let reply = serde_json::to_value(mergejob(Value::Null)).unwrap();
        let status = expect(&mut handle, Method::PATCH, "/apis/medmerge.io/v1alpha1/namespaces/radiology/mergejobs/retina/status?", reply).await;
        assert_eq!(status[0]["value"]["shardsReady"], "0/1", "{status}");
        expect(&mut handle, Method::PATCH, "/api/v1/namespaces/radiology/configmaps/retina-g1-spec?", json!({"metadata": {}})).await;
        let job = expect(&mut handle, Method::POST, "/apis/batch/v1/namespaces/radiology/jobs?", json!({"metadata": {}})).await;
        assert_eq!(job["metadata"]["name"], "retina-g1-finetune-a");
        let volumes = job["spec"]["template"]["spec"]["volumes"].to_string();
        assert!(volumes.contains("creds-a"), "shard a's training Job mounts shard a's secret: {volumes}");
    });
    let _ = reconcile(Arc::new(training), ctx).await;
    server.await.unwrap();
}

#[tokio::test]
async fn a_reconcile_that_finds_its_status_current_makes_no_api_call() {
    // The init Job is running: nothing to create. The first reconcile writes the status (and the
    // Training Event); a MergeJob that carries that status is then reconciled against a server
    // that is gone, so any call at all would fail it. In a burst most reconciles are of this
    // kind (triggered by a Job the operator created, or by its own status write): they must not
    // call out, and so never take a turn in the status lane (only a pass about to call out does).
    let running = vec![job("init", json!({"active": 1}))];
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(Client::new(service, "default"), running.clone(), &mergejob(Value::Null));
    let server = tokio::spawn(async move {
        let mut handle = pin!(handle);
        let reply = serde_json::to_value(mergejob(Value::Null)).unwrap();
        let patch = expect(&mut handle, Method::PATCH, "/apis/medmerge.io/v1alpha1/namespaces/radiology/mergejobs/retina/status?", reply).await;
        expect(&mut handle, Method::POST, "/apis/events.k8s.io/v1/namespaces/radiology/events", json!({"metadata": {}})).await;
        patch[0]["value"].clone()
    });
    reconcile(Arc::new(mergejob(Value::Null)), ctx).await.unwrap();
    let written = server.await.unwrap();
    assert_eq!(written["phase"], "Training", "{written}");

    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    drop(handle);
    let current = mergejob(written);
    let ctx = context(Client::new(service, "default"), running, &current);
    let action = reconcile(Arc::new(current), ctx).await.expect("no API call, so nothing to fail");
    assert_ne!(action, kube::runtime::controller::Action::await_change(), "a running MergeJob is looked at again");
}
