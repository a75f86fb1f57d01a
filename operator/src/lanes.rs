//! The two lanes reconciles take to the API server: one for statuses, `--concurrency` wide and
//! first come first served, and one for Job changes (as wide as the Job workers,
//! [`crate::job_work::JobWork`]), with statuses first.
//!
//! In a burst the API server is the bottleneck. Creating the Jobs of new MergeJobs can wait a
//! moment; a status that says a MergeJob's Jobs have finished should not wait behind them
//! (bench/results/operator-scale.md). So a batch of Job changes starts only while no status waits
//! for its turn. Statuses cannot starve Job changes for long: every status write answers an event
//! that already happened, and without new Jobs there are soon no new events.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Notify, Semaphore, SemaphorePermit};

/// The status lane, and the rule that Job changes wait for it.
pub struct Lanes {
    status: Semaphore,
    /// Reconciles waiting for a turn in the status lane.
    status_waiting: AtomicUsize,
    /// Signalled when the last of them got its turn.
    status_clear: Notify,
}

impl Lanes {
    /// A status lane that lets `width` calls through at once (at least one).
    pub fn new(width: u16) -> Self {
        let width = usize::from(width.max(1));
        Lanes { status: Semaphore::new(width), status_waiting: AtomicUsize::new(0), status_clear: Notify::new() }
    }

    /// A turn to read artifacts and write a status, in arrival order.
    pub async fn status_turn(&self) -> SemaphorePermit<'_> {
        self.status_waiting.fetch_add(1, Ordering::SeqCst);
        let permit = self.status.acquire().await;
        if self.status_waiting.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.status_clear.notify_waiters();
        }
        permit.expect("the status lane is never closed")
    }

    /// Returns once no status waits for its turn, so a batch of Job changes may go. How many
    /// batches go at once is the Job workers' width, not a matter for this lane.
    pub async fn wait_for_statuses(&self) {
        loop {
            let clear = self.status_clear.notified();
            tokio::pin!(clear);
            // Registered before the check, so a signal between the check and the wait is not lost.
            clear.as_mut().enable();
            if self.status_waiting.load(Ordering::SeqCst) == 0 {
                return;
            }
            clear.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn job_changes_wait_while_a_status_waits_and_go_once_it_has_its_turn() {
        let lanes = Arc::new(Lanes::new(1));
        let writing = lanes.status_turn().await;
        // A second status waits for the first; a Job batch must wait for both to be let through.
        let second = tokio::spawn({
            let lanes = lanes.clone();
            async move {
                let _turn = lanes.status_turn().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let jobs = tokio::spawn({
            let lanes = lanes.clone();
            async move {
                lanes.wait_for_statuses().await;
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!jobs.is_finished(), "a Job batch went ahead of a waiting status");
        drop(writing);
        tokio::time::timeout(Duration::from_secs(5), jobs).await.expect("the Job batch went once no status waited").unwrap();
        second.await.unwrap();
    }

    #[tokio::test]
    async fn with_no_status_waiting_job_changes_go_at_once() {
        let lanes = Lanes::new(2);
        let _status = lanes.status_turn().await;
        tokio::time::timeout(Duration::from_secs(5), lanes.wait_for_statuses()).await.expect("a status being written does not hold Job changes back");
    }
}
