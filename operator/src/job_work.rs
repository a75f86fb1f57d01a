//! Which MergeJobs have Job changes (creations, stops, pauses) queued or under way.
//!
//! A reconcile writes the status and then hands its Job changes to a task of their own instead of
//! waiting for them. kube-runtime runs one reconcile per MergeJob at a time and holds every newer
//! trigger of that MergeJob until the running one returns; a reconcile that waited its turn to
//! create Jobs behind a burst of other MergeJobs' creations held back the status of its own
//! finished Jobs for 30-50 s (bench/results/operator-scale.md). [`JobWork`] keeps at most one
//! batch per MergeJob: a reconcile that wants changes while one is queued only marks it, and the
//! MergeJob is reconciled again, from a fresh look at its Jobs, once the batch is done.

use std::collections::HashMap;
use std::sync::Mutex;

use futures::channel::mpsc::{unbounded, UnboundedReceiver, UnboundedSender};
use kube::runtime::reflector::ObjectRef;
use medmerge_crds::MergeJob;

/// The MergeJobs with a batch of Job changes queued or under way.
pub struct JobWork {
    /// MergeJob -> whether another reconcile asked for changes while its batch was queued.
    queued: Mutex<HashMap<ObjectRef<MergeJob>, bool>>,
    again: UnboundedSender<ObjectRef<MergeJob>>,
    /// The receiving end of `again`, until the controller takes it ([`JobWork::take_requests`]).
    requests: Mutex<Option<UnboundedReceiver<ObjectRef<MergeJob>>>>,
}

impl Default for JobWork {
    fn default() -> Self {
        let (again, requests) = unbounded();
        JobWork { queued: Mutex::default(), again, requests: Mutex::new(Some(requests)) }
    }
}

impl JobWork {
    /// Whether `mj` may start a batch now: false when one is already queued, which is then marked
    /// so that [`JobWork::finish`] asks for another reconcile.
    pub fn begin(&self, mj: &ObjectRef<MergeJob>) -> bool {
        let mut queued = self.queued.lock().expect("the job-work lock is never poisoned");
        match queued.get_mut(mj) {
            Some(again) => {
                *again = true;
                false
            }
            None => {
                queued.insert(mj.clone(), false);
                true
            }
        }
    }

    /// Ends `mj`'s batch; when `failed` or when another reconcile wanted changes meanwhile, asks
    /// for `mj` to be reconciled again (through [`JobWork::take_requests`]). Says whether it did.
    pub fn finish(&self, mj: &ObjectRef<MergeJob>, failed: bool) -> bool {
        let again = self.queued.lock().expect("the job-work lock is never poisoned").remove(mj).unwrap_or(false) || failed;
        if again {
            // Closed only when the controller has stopped: nothing is left to reconcile then.
            let _ = self.again.unbounded_send(mj.clone());
        }
        again
    }

    /// The MergeJobs to reconcile again, for the controller (once; None after the first call).
    pub fn take_requests(&self) -> Option<UnboundedReceiver<ObjectRef<MergeJob>>> {
        self.requests.lock().expect("the job-work lock is never poisoned").take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn mergejob(name: &str) -> ObjectRef<MergeJob> {
        ObjectRef::new(name).within("radiology")
    }

    #[tokio::test]
    async fn one_batch_per_mergejob_and_a_second_request_reconciles_it_again() {
        let work = JobWork::default();
        let mut requests = work.take_requests().unwrap();
        assert!(work.take_requests().is_none(), "the requests go to one controller");
        let (a, b) = (mergejob("a"), mergejob("b"));
        assert!(work.begin(&a) && work.begin(&b), "MergeJobs do not wait for each other");
        assert!(!work.begin(&a), "a second batch of a waits for the first");
        assert!(!work.finish(&b, false), "b's batch was alone and succeeded: nothing to redo");
        assert!(work.finish(&a, false), "a was asked for again while its batch ran");
        assert_eq!(requests.next().await, Some(a.clone()));
        assert!(work.begin(&a), "a's batch is over: a new one may start");
        assert!(work.finish(&a, true), "a failed batch is tried again");
        assert_eq!(requests.next().await, Some(a));
    }
}
