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

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::watcher::Event;
    use std::time::Duration;

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
