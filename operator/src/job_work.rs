//! Which MergeJobs have Job changes (creations, stops, pauses) queued or under way, and the
//! queue the Job workers take them from.
//!
//! A reconcile writes the status and then hands its Job changes to a worker instead of waiting
//! for them. kube-runtime runs one reconcile per MergeJob at a time and holds every newer
//! trigger of that MergeJob until the running one returns; a reconcile that waited its turn to
//! create Jobs behind a burst of other MergeJobs' creations held back the status of its own
//! finished Jobs for 30-50 s (bench/results/operator-scale.md). [`JobWork`] keeps at most one
//! batch per MergeJob: a reconcile that wants changes while one is queued only marks it, and the
//! MergeJob is reconciled again, from a fresh look at its Jobs, once the batch is done.
//!
//! A queued batch is only the MergeJob's reference and the uid and generation its reconcile
//! saw: the worker decides the changes again from the newest MergeJob and Jobs once its turn
//! comes. Holding each batch's MergeJob, decision and future while it waited was the operator's
//! largest use of memory in a burst (2,500 batches queued at 1,000 MergeJobs x 8 shards).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use futures::channel::mpsc::{unbounded, UnboundedReceiver, UnboundedSender};
use kube::runtime::reflector::ObjectRef;
use medmerge_crds::MergeJob;

/// Which MergeJob a reconcile decided for: a batch is dropped (and the MergeJob reconciled
/// again) when the MergeJob was deleted, replaced or edited while the batch waited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decided {
    /// `metadata.uid` of the MergeJob the reconcile saw.
    pub uid: Option<String>,
    /// `metadata.generation` of the MergeJob the reconcile saw.
    pub generation: Option<i64>,
}

impl Decided {
    /// What a reconcile of `mj` saw.
    pub fn of(mj: &MergeJob) -> Self {
        Decided { uid: mj.metadata.uid.clone(), generation: mj.metadata.generation }
    }

    /// Whether `now` is still that MergeJob, unedited and not being deleted.
    pub fn still(&self, now: &MergeJob) -> bool {
        Decided::of(now) == *self && now.metadata.deletion_timestamp.is_none()
    }
}

/// What [`JobWork::begin`] did with a request for Job changes.
#[derive(Debug, PartialEq, Eq)]
pub enum Begun {
    /// Queued, and no worker is free to take it: the caller starts one ([`JobWork::next`]).
    StartWorker,
    /// Queued for a worker already running.
    Queued,
    /// A batch of this MergeJob was already queued or under way; it is reconciled again once
    /// that batch is done.
    Marked,
}

struct Entry {
    decided: Decided,
    /// Whether another reconcile asked for changes while this batch was queued or under way.
    again: bool,
}

#[derive(Default)]
struct Queue {
    entries: HashMap<ObjectRef<MergeJob>, Entry>,
    /// Batches not yet taken by a worker, first come first served.
    waiting: VecDeque<ObjectRef<MergeJob>>,
    workers: usize,
}

/// The MergeJobs with a batch of Job changes queued or under way.
pub struct JobWork {
    queue: Mutex<Queue>,
    /// The most workers at once.
    width: usize,
    again: UnboundedSender<ObjectRef<MergeJob>>,
    /// The receiving end of `again`, until the controller takes it ([`JobWork::take_requests`]).
    requests: Mutex<Option<UnboundedReceiver<ObjectRef<MergeJob>>>>,
}

impl JobWork {
    /// Work for at most `width` workers at once (at least one).
    pub fn new(width: u16) -> Self {
        let (again, requests) = unbounded();
        JobWork { queue: Mutex::default(), width: usize::from(width.max(1)), again, requests: Mutex::new(Some(requests)) }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().expect("the job-work lock is never poisoned")
    }

    /// Asks for Job changes of `mj`, as a reconcile that saw `decided` wanted them.
    pub fn begin(&self, mj: &ObjectRef<MergeJob>, decided: Decided) -> Begun {
        let mut queue = self.queue();
        if let Some(entry) = queue.entries.get_mut(mj) {
            entry.again = true;
            return Begun::Marked;
        }
        queue.entries.insert(mj.clone(), Entry { decided, again: false });
        queue.waiting.push_back(mj.clone());
        if queue.workers < self.width {
            queue.workers += 1;
            Begun::StartWorker
        } else {
            Begun::Queued
        }
    }

    /// The next batch for a worker; None when there is none, and the worker then ends (a later
    /// [`JobWork::begin`] starts another).
    pub fn next(&self) -> Option<(ObjectRef<MergeJob>, Decided)> {
        let mut queue = self.queue();
        match queue.waiting.pop_front() {
            Some(mj) => {
                let decided = queue.entries.get(&mj).map(|e| e.decided.clone()).expect("a waiting batch has its entry");
                Some((mj, decided))
            }
            None => {
                queue.workers -= 1;
                None
            }
        }
    }

    /// Ends `mj`'s batch; when `failed` or when another reconcile wanted changes meanwhile, asks
    /// for `mj` to be reconciled again (through [`JobWork::take_requests`]). Says whether it did.
    pub fn finish(&self, mj: &ObjectRef<MergeJob>, failed: bool) -> bool {
        let again = self.queue().entries.remove(mj).is_some_and(|e| e.again) || failed;
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

    fn decided(generation: i64) -> Decided {
        Decided { uid: Some("u-1".into()), generation: Some(generation) }
    }

    #[tokio::test]
    async fn one_batch_per_mergejob_and_a_second_request_reconciles_it_again() {
        let work = JobWork::new(8);
        let mut requests = work.take_requests().unwrap();
        assert!(work.take_requests().is_none(), "the requests go to one controller");
        let (a, b) = (mergejob("a"), mergejob("b"));
        assert_eq!(work.begin(&a, decided(1)), Begun::StartWorker);
        assert_eq!(work.begin(&b, decided(1)), Begun::StartWorker, "MergeJobs do not wait for each other");
        assert_eq!(work.begin(&a, decided(2)), Begun::Marked, "a second batch of a waits for the first");
        assert_eq!(work.next(), Some((a.clone(), decided(1))), "the batch runs for what its first reconcile saw");
        assert!(!work.finish(&b, false), "b's batch was alone and succeeded: nothing to redo");
        assert!(work.finish(&a, false), "a was asked for again while its batch ran");
        assert_eq!(requests.next().await, Some(a.clone()));
        assert_eq!(work.begin(&a, decided(2)), Begun::StartWorker, "a's batch is over: a new one may start");
        assert!(work.finish(&a, true), "a failed batch is tried again");
        assert_eq!(requests.next().await, Some(a));
    }

    #[test]
    fn batches_wait_for_a_free_worker_in_arrival_order_and_an_idle_worker_ends() {
        let work = JobWork::new(1);
        let (a, b, c) = (mergejob("a"), mergejob("b"), mergejob("c"));
        assert_eq!(work.begin(&a, decided(1)), Begun::StartWorker);
        assert_eq!(work.begin(&b, decided(1)), Begun::Queued, "one worker at most");
        assert_eq!(work.begin(&c, decided(1)), Begun::Queued);
        let taken: Vec<_> = std::iter::from_fn(|| work.next().map(|(mj, _)| mj)).collect();
        assert_eq!(taken, [a, b, c], "first come first served");
        assert_eq!(work.begin(&mergejob("d"), decided(1)), Begun::StartWorker, "the idle worker ended, so a new request starts one");
    }

    #[test]
    fn a_batch_is_for_the_mergejob_its_reconcile_saw() {
        let mj: MergeJob = serde_json::from_value(serde_json::json!({
            "apiVersion": "medmerge.io/v1alpha1", "kind": "MergeJob",
            "metadata": {"name": "retina", "namespace": "radiology", "uid": "u-1", "generation": 2},
            "spec": {"model": {"architecture": "resnet18", "weights": "random", "classes": ["x", "y"]},
                     "shards": [{"name": "a", "data": {"path": "s3://data/a/"}}], "evaluation": {"data": {"path": "s3://data/t/"}},
                     "storage": {"s3": {"bucket": "runs"}}},
        }))
        .unwrap();
        let seen = Decided::of(&mj);
        assert!(seen.still(&mj));
        let mut edited = mj.clone();
        edited.metadata.generation = Some(3);
        assert!(!seen.still(&edited), "edited since");
        let mut replaced = mj.clone();
        replaced.metadata.uid = Some("u-2".into());
        assert!(!seen.still(&replaced), "deleted and created again under the same name");
        let mut deleting = mj;
        deleting.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
        assert!(!seen.still(&deleting), "being deleted");
    }
}
