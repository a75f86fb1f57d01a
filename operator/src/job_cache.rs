//! The operator's cache of every Job it manages, and a readiness gate that any number of
//! reconciles can wait on at once.
//!
//! kube-runtime 5's `Store::wait_until_ready` keeps one waker (a oneshot receiver): when two
//! reconciles wait before the first list of Jobs arrives, the first one's waker is replaced and
//! it is never woken, so that MergeJob's reconcile hangs for good and SIGTERM cannot drain it.
//! [`JobCache`] polls the store's readiness once, behind a shared future that wakes every waiter.

use futures::future::{BoxFuture, FutureExt, Shared};
use k8s_openapi::api::batch::v1::{Job, JobStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher;
use kube::ResourceExt;
use serde::Deserialize;

use crate::jobs::LABEL_MERGEJOB;

/// A Job as the operator keeps it: the fields it reads (metadata, `spec.suspend`, status) and
/// none of the rest. At 1,000 MergeJobs x 8 shards the cache holds 9,000 Jobs, and a full Job is
/// 2.6 KB before anything it points to (its spec embeds the whole pod template), so the watch
/// deserializes into this instead and never builds the rest.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct ManagedJob {
    /// The Job's metadata (labels, annotations, owner, creation time).
    pub metadata: ObjectMeta,
    /// The one field of the Job's spec the operator reads.
    pub spec: Option<ManagedJobSpec>,
    /// What the Job controller reports.
    pub status: Option<JobStatus>,
}

/// `spec.suspend` of a Job: whether its pods may run (Kueue and the operator's pause set it).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct ManagedJobSpec {
    /// `spec.suspend`.
    pub suspend: Option<bool>,
}

impl k8s_openapi::Resource for ManagedJob {
    const API_VERSION: &'static str = <Job as k8s_openapi::Resource>::API_VERSION;
    const GROUP: &'static str = <Job as k8s_openapi::Resource>::GROUP;
    const KIND: &'static str = <Job as k8s_openapi::Resource>::KIND;
    const VERSION: &'static str = <Job as k8s_openapi::Resource>::VERSION;
    const URL_PATH_SEGMENT: &'static str = <Job as k8s_openapi::Resource>::URL_PATH_SEGMENT;
    type Scope = <Job as k8s_openapi::Resource>::Scope;
}

impl k8s_openapi::Metadata for ManagedJob {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Every managed Job, kept current by the controller's watch, and whether it has filled yet.
#[derive(Clone)]
pub struct JobCache {
    store: Store<ManagedJob>,
    ready: Shared<BoxFuture<'static, bool>>,
    index: JobIndex,
}

impl JobCache {
    /// An empty cache and the writer that the Job watch feeds it through.
    pub fn new() -> (JobCache, JobCacheWriter) {
        let (store, writer) = reflector::store();
        let waiting = store.clone();
        let ready = async move { waiting.wait_until_ready().await.is_ok() }.boxed().shared();
        let index = JobIndex::default();
        (JobCache { store: store.clone(), ready, index: index.clone() }, JobCacheWriter { writer, store, index })
    }

    /// Waits until the first list of Jobs has arrived; false if the watch stopped before that
    /// (the operator is shutting down).
    pub async fn ready(&self) -> bool {
        self.ready.clone().await
    }

    /// The cached Jobs of MergeJob `name` in namespace `ns` (every run), by their label.
    pub fn of_mergejob(&self, ns: &str, name: &str) -> Vec<Arc<ManagedJob>> {
        let names = self.index.names(ns, name);
        names.into_iter().filter_map(|job| self.store.get(&ObjectRef::new(&job).within(ns))).filter(|job| job.labels().get(LABEL_MERGEJOB).is_some_and(|v| v == name)).collect()
    }
}

/// Feeds a [`JobCache`] from the Job watch: its store, then its index.
pub struct JobCacheWriter {
    writer: reflector::store::Writer<ManagedJob>,
    store: Store<ManagedJob>,
    index: JobIndex,
}

impl JobCacheWriter {
    /// Applies one event of the Job watch.
    pub fn apply_watcher_event(&mut self, event: &watcher::Event<ManagedJob>) {
        self.writer.apply_watcher_event(event);
        match event {
            watcher::Event::Apply(job) | watcher::Event::InitApply(job) => self.index.insert(job),
            watcher::Event::Delete(job) => self.index.remove(job),
            watcher::Event::Init => {}
            // A relist replaced the store's contents: the index follows (and forgets the Jobs
            // deleted while the watch was down).
            watcher::Event::InitDone => self.index.rebuild(&self.store.state()),
        }
    }
}

/// The names of the cached Jobs per MergeJob (namespace, `medmerge.io/mergejob` label). Each
/// reconcile reads its MergeJob's Jobs; scanning all 9,000 at 1,000 MergeJobs x 8 shards was
/// most of the operator's CPU. A name left behind is harmless: lookups go through the store.
#[derive(Clone, Default)]
struct JobIndex {
    by_mergejob: Arc<RwLock<JobNames>>,
}

/// (namespace, MergeJob) -> the names of its Jobs.
type JobNames = HashMap<(String, String), BTreeSet<String>>;

impl JobIndex {
    fn key(job: &ManagedJob) -> Option<(String, String)> {
        Some((job.namespace()?, job.labels().get(LABEL_MERGEJOB)?.clone()))
    }

    fn insert(&self, job: &ManagedJob) {
        if let Some(key) = JobIndex::key(job) {
            self.by_mergejob.write().expect("the job index lock is never poisoned").entry(key).or_default().insert(job.name_any());
        }
    }

    fn remove(&self, job: &ManagedJob) {
        let Some(key) = JobIndex::key(job) else { return };
        let mut index = self.by_mergejob.write().expect("the job index lock is never poisoned");
        if let Some(names) = index.get_mut(&key) {
            names.remove(&job.name_any());
            if names.is_empty() {
                index.remove(&key);
            }
        }
    }

    fn rebuild(&self, jobs: &[Arc<ManagedJob>]) {
        let mut fresh = JobNames::new();
        for job in jobs {
            if let Some(key) = JobIndex::key(job) {
                fresh.entry(key).or_default().insert(job.name_any());
            }
        }
        *self.by_mergejob.write().expect("the job index lock is never poisoned") = fresh;
    }

    fn names(&self, ns: &str, mergejob: &str) -> Vec<String> {
        let index = self.by_mergejob.read().expect("the job index lock is never poisoned");
        index.get(&(ns.to_string(), mergejob.to_string())).map(|names| names.iter().cloned().collect()).unwrap_or_default()
    }
}

/// `job` without its field-manager bookkeeping, which the operator never reads.
pub fn trim_for_cache(job: &mut ManagedJob) {
    job.metadata.managed_fields = None;
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
        let full = serde_json::json!({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "mj-g1-finetune-a", "labels": {"medmerge.io/stage": "finetune-a"}, "annotations": {"medmerge.io/paused": "true"},
                         "creationTimestamp": "2026-12-04T10:00:00Z", "managedFields": [{"manager": "medmerge"}]},
            "spec": {"suspend": true, "template": {"spec": {"containers": [{"name": "trainer", "image": "medmerge/trainer", "args": ["finetune"]}]}}},
            "status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
        });
        let before: Job = serde_json::from_value(full.clone()).unwrap();
        let mut job: ManagedJob = serde_json::from_value(full).unwrap();
        trim_for_cache(&mut job);
        assert_eq!(job.metadata.labels, before.metadata.labels);
        assert_eq!(job.metadata.annotations, before.metadata.annotations);
        assert_eq!(job.metadata.creation_timestamp, before.metadata.creation_timestamp);
        assert_eq!(job.status, before.status);
        assert_eq!(job.spec, Some(ManagedJobSpec { suspend: Some(true) }));
        assert!(job.metadata.managed_fields.is_none());
        use kube::Resource;
        assert_eq!((ManagedJob::url_path(&(), Some("ns")), ManagedJob::kind(&())), (Job::url_path(&(), Some("ns")), Job::kind(&())), "watched and listed as Jobs");
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

    fn managed(ns: &str, mergejob: &str, name: &str) -> ManagedJob {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name, "namespace": ns, "labels": {LABEL_MERGEJOB: mergejob}}})).unwrap()
    }

    fn names(cache: &JobCache, ns: &str, mergejob: &str) -> Vec<String> {
        cache.of_mergejob(ns, mergejob).iter().map(|job| job.name_any()).collect()
    }

    #[test]
    fn a_mergejobs_jobs_are_found_by_its_label_through_applies_deletes_and_relists() {
        let (cache, mut writer) = JobCache::new();
        writer.apply_watcher_event(&Event::Init);
        for job in [managed("ns", "a", "a-init"), managed("ns", "a", "a-finetune-x"), managed("ns", "b", "b-init"), managed("other", "a", "a-init")] {
            writer.apply_watcher_event(&Event::InitApply(job));
        }
        writer.apply_watcher_event(&Event::InitDone);
        assert_eq!(names(&cache, "ns", "a"), ["a-finetune-x", "a-init"], "only a's Jobs, only in its namespace");
        writer.apply_watcher_event(&Event::Apply(managed("ns", "a", "a-merge")));
        writer.apply_watcher_event(&Event::Delete(managed("ns", "a", "a-init")));
        assert_eq!(names(&cache, "ns", "a"), ["a-finetune-x", "a-merge"]);
        // A relist after the watch was down: a-merge was deleted meanwhile, a-evaluate created.
        writer.apply_watcher_event(&Event::Init);
        for job in [managed("ns", "a", "a-finetune-x"), managed("ns", "a", "a-evaluate")] {
            writer.apply_watcher_event(&Event::InitApply(job));
        }
        writer.apply_watcher_event(&Event::InitDone);
        assert_eq!(names(&cache, "ns", "a"), ["a-evaluate", "a-finetune-x"]);
        assert!(names(&cache, "ns", "b").is_empty(), "b's Job went with the relist");
        // A Job relabelled to another MergeJob is not reported under its old one.
        writer.apply_watcher_event(&Event::Apply(managed("ns", "c", "a-evaluate")));
        assert_eq!(names(&cache, "ns", "a"), ["a-finetune-x"]);
        assert_eq!(names(&cache, "ns", "c"), ["a-evaluate"]);
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
