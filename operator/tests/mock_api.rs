//! The exact API calls of one reconcile, against a mock API server (tower-test). The real
//! API server is exercised by `tests/apiserver.rs`; this pins down what is sent, in what order.

use std::pin::pin;
use std::sync::Arc;

use http::{Method, Request, Response};
use kube::client::Body;
use kube::Client;
use medmerge_crds::MergeJob;
use medmerge_operator::artifacts::ArtifactStore;
use medmerge_operator::controller::{reconcile, Context};
use medmerge_operator::telemetry::Metrics;
use serde_json::{json, Value};
use tower_test::mock;

type Handle = mock::Handle<Request<Body>, Response<Body>>;

fn mergejob(status: Value) -> MergeJob {
    serde_json::from_value(json!({
        "apiVersion": "medmerge.io/v1alpha1", "kind": "MergeJob",
        "metadata": {"name": "retina", "namespace": "radiology", "uid": "u-1", "generation": 1, "resourceVersion": "7"},
        "spec": {
            "model": {"architecture": "resnet18", "weights": "random"},
            "shards": [{"name": "a", "data": {"path": "a"}, "secretRef": "creds-a"}],
            "evaluation": {"data": {"path": "t"}},
            "merge": {"baselines": []},
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

fn context(client: Client) -> Arc<Context> {
    Arc::new(Context::new(client, "test", Arc::new(Metrics::default()), ArtifactStore::new(None)))
}

#[tokio::test]
async fn a_new_mergejob_gets_its_spec_configmap_the_init_job_an_event_and_a_status() {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(Client::new(service, "default"));
    let server = tokio::spawn(async move {
        let mut handle = pin!(handle);
        let list = json!({"apiVersion": "batch/v1", "kind": "JobList", "metadata": {}, "items": []});
        let list_call = expect(&mut handle, Method::GET, "/apis/batch/v1/namespaces/radiology/jobs?&labelSelector=medmerge.io%2Fmergejob%3Dretina%2Cmedmerge.io%2Fgeneration%3D1&resourceVersion=0&resourceVersionMatch=NotOlderThan", list).await;
        assert_eq!(list_call, Value::Null);
        let cm = expect(&mut handle, Method::PATCH, "/api/v1/namespaces/radiology/configmaps/retina-g1-spec?&force=true&fieldManager=medmerge-operator", json!({"metadata": {}})).await;
        assert!(cm["data"]["mergejob.yaml"].as_str().unwrap().contains("creds-a"));
        let job = expect(&mut handle, Method::PATCH, "/apis/batch/v1/namespaces/radiology/jobs/retina-g1-init?&force=true&fieldManager=medmerge-operator", json!({"metadata": {}})).await;
        assert_eq!(job["metadata"]["ownerReferences"][0]["uid"], "u-1");
        let volumes = job["spec"]["template"]["spec"]["volumes"].to_string();
        assert!(!volumes.contains("creds-a"), "the coordinator's init Job must not see a shard's secret");
        let event = expect(&mut handle, Method::POST, "/apis/events.k8s.io/v1/namespaces/radiology/events", json!({"metadata": {}})).await;
        assert_eq!(event["reason"], "StageStarted");
        let status = expect(&mut handle, Method::PATCH, "/apis/medmerge.io/v1alpha1/namespaces/radiology/mergejobs/retina/status?&force=true&fieldManager=medmerge-operator", serde_json::to_value(mergejob(Value::Null)).unwrap()).await;
        assert_eq!((status["status"]["phase"].as_str(), status["status"]["observedGeneration"].as_i64()), (Some("Training"), Some(1)));
        assert_eq!(status["status"]["shardsReady"], "0/1");
        let transition = expect(&mut handle, Method::POST, "/apis/events.k8s.io/v1/namespaces/radiology/events", json!({"metadata": {}})).await;
        assert_eq!(transition["reason"], "Training");
    });
    reconcile(Arc::new(mergejob(Value::Null)), ctx).await.unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn a_finished_generation_makes_no_api_call_at_all() {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    // With the server gone, any API call would fail the reconcile.
    drop(handle);
    let ctx = context(Client::new(service, "default"));
    let action = reconcile(Arc::new(mergejob(json!({"phase": "Succeeded", "observedGeneration": 1}))), ctx).await.unwrap();
    assert_eq!(action, kube::runtime::controller::Action::await_change());
}
