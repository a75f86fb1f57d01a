//! The operator's cache of every Job it manages, and a readiness gate that any number of
//! reconciles can wait on at once.
//!
//! kube-runtime 5's `Store::wait_until_ready` keeps one waker (a oneshot receiver): when two
//! reconciles wait before the first list of Jobs arrives, the first one's waker is replaced and
//! it is never woken, so that MergeJob's reconcile hangs for good and SIGTERM cannot drain it.
//! [`JobCache`] polls the store's readiness once, behind a shared future that wakes every waiter.

use futures::future::{BoxFuture, FutureExt, Shared};
use k8s_openapi::api::batch::v1::Job;
use kube::runtime::reflector::{self, Store};

/// Every managed Job, kept current by the controller's watch, and whether it has filled yet.
#[derive(Clone)]
pub struct JobCache {
    store: Store<Job>,
    ready: Shared<BoxFuture<'static, bool>>,
}

impl JobCache {
    /// An empty cache and the writer that the Job watch feeds it through.
    pub fn new() -> (JobCache, reflector::store::Writer<Job>) {
        let (store, writer) = reflector::store();
        (JobCache::over(store), writer)
    }

    /// A gate over an existing store.
    pub fn over(store: Store<Job>) -> JobCache {
        let waiting = store.clone();
        let ready = async move { waiting.wait_until_ready().await.is_ok() }.boxed().shared();
        JobCache { store, ready }
    }

    /// Waits until the first list of Jobs has arrived; false if the watch stopped before that
    /// (the operator is shutting down).
    pub async fn ready(&self) -> bool {
        self.ready.clone().await
    }

    /// The Jobs in the cache now.
    pub fn state(&self) -> Vec<std::sync::Arc<Job>> {
        self.store.state()
    }
}

/// `job` reduced to what the operator reads from a cached Job (labels, annotations, creation
/// time, `spec.suspend`, status): the pod template and field-manager bookkeeping are most of a
/// Job's memory, and at 1,000 MergeJobs x 8 shards the cache holds 9,000 Jobs.
pub fn trim_for_cache(job: &mut Job) {
    job.metadata.managed_fields = None;
    if let Some(spec) = job.spec.as_mut() {
        spec.template = Default::default();
        spec.selector = None;
    }
}

/// `mj` reduced to what the controller reads from a cached MergeJob: every field but the
/// field-manager bookkeeping (a tree of JSON maps per manager, the operator's status applies
/// among them) and `kubectl apply`'s copy of the whole object in an annotation.
pub fn trim_mergejob_for_cache(mj: &mut medmerge_crds::MergeJob) {
    mj.metadata.managed_fields = None;
    if let Some(annotations) = mj.metadata.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

/// Where `kubectl apply` keeps the last object it applied.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::watcher::Event;
    use std::time::Duration;

    #[test]
    fn a_cached_job_keeps_what_the_operator_reads_and_drops_its_pod_template() {
        let mut job: Job = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "mj-g1-finetune-a", "labels": {"medmerge.io/stage": "finetune-a"}, "annotations": {"medmerge.io/paused": "true"},
                         "creationTimestamp": "2026-12-04T10:00:00Z", "managedFields": [{"manager": "medmerge"}]},
            "spec": {"suspend": true, "template": {"spec": {"containers": [{"name": "trainer", "image": "medmerge/trainer", "args": ["finetune"]}]}}},
            "status": {"succeeded": 1}
        }))
        .unwrap();
        let before = job.clone();
        trim_for_cache(&mut job);
        assert_eq!(job.metadata.labels, before.metadata.labels);
        assert_eq!(job.metadata.annotations, before.metadata.annotations);
        assert_eq!(job.metadata.creation_timestamp, before.metadata.creation_timestamp);
        assert_eq!(job.status, before.status);
        assert_eq!(job.spec.as_ref().unwrap().suspend, Some(true));
        assert!(job.spec.as_ref().unwrap().template.spec.is_none());
        assert!(job.metadata.managed_fields.is_none());
    }

    #[test]
    fn a_cached_mergejob_keeps_spec_status_and_own_annotations_but_no_bookkeeping() {
        let mut mj: medmerge_crds::MergeJob = serde_json::from_value(serde_json::json!({
            "apiVersion": "medmerge.io/v1alpha1", "kind": "MergeJob",
            "metadata": {"name": "mj", "namespace": "ns", "resourceVersion": "7", "finalizers": ["medmerge.io/artifact-cleanup"],
                         "annotations": {"team": "radiology", LAST_APPLIED: "{\"spec\": {}}"},
                         "managedFields": [{"manager": "medmerge-operator", "operation": "Apply", "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:phase": {}}}}]},
            "spec": {"model": {"architecture": "resnet18", "imageSize": 32, "classes": ["x", "y"]},
                     "shards": [{"name": "h0", "data": {"path": "train.csv"}}], "evaluation": {"data": {"path": "test.csv"}},
                     "storage": {"local": {"path": "runs"}}},
            "status": {"phase": "Running"}
        }))
        .unwrap();
        let before = mj.clone();
        trim_mergejob_for_cache(&mut mj);
        assert!(mj.metadata.managed_fields.is_none());
        assert_eq!(mj.metadata.annotations, Some([("team".to_string(), "radiology".to_string())].into()));
        assert_eq!((&mj.spec, &mj.status, &mj.metadata.finalizers, &mj.metadata.resource_version), (&before.spec, &before.status, &before.metadata.finalizers, &before.metadata.resource_version));
    }

    #[tokio::test]
    async fn every_waiter_is_woken_when_the_first_list_arrives() {
        let (cache, mut writer) = JobCache::new();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                tokio::spawn({
                    let c = cache.clone();
                    async move { c.ready().await }
                })
            })
            .collect();
        // Let every waiter register before the store fills.
        tokio::time::sleep(Duration::from_millis(50)).await;
        writer.apply_watcher_event(&Event::Init);
        writer.apply_watcher_event(&Event::InitDone);
        for waiter in waiters {
            let woke = tokio::time::timeout(Duration::from_secs(5), waiter).await;
            assert!(matches!(woke, Ok(Ok(true))), "a waiter was not woken: {woke:?}");
        }
    }

    #[tokio::test]
    async fn a_watch_that_stops_before_filling_releases_the_waiters() {
        let (cache, writer) = JobCache::new();
        let waiter = tokio::spawn({
            let c = cache.clone();
            async move { c.ready().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(writer);
        assert!(!tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap());
    }
}
