//! How soon a MergeJob whose reconcile failed is tried again: at once after a first hiccup, then
//! exponentially less often while it keeps failing, so a brief API-server overload costs a
//! MergeJob a fraction of a second rather than a fixed pause, and a lasting fault does not spin.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// The first retry's delay; each further consecutive failure doubles it.
const FIRST: Duration = Duration::from_millis(200);
/// The longest delay between retries.
const MAX: Duration = Duration::from_secs(60);

/// Consecutive failed reconciles per MergeJob (`namespace/name`).
#[derive(Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    /// Records a failure of `key` and says when to try it again.
    pub fn failed(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let count = failures.entry(key.to_string()).or_insert(0);
        *count = count.saturating_add(1);
        delay(*count)
    }

    /// Forgets `key`'s failures after a reconcile that worked.
    pub fn succeeded(&self, key: &str) {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

/// The delay after `failures` consecutive failures (1 or more), with up to 25 % added at random
/// so that MergeJobs that failed together (an API-server restart) do not retry in lockstep.
fn delay(failures: u32) -> Duration {
    let exact = FIRST.saturating_mul(1u32 << failures.saturating_sub(1).min(16)).min(MAX);
    exact + exact.mul_f64(rand_fraction() * 0.25)
}

/// A number in [0, 1) from the clock's sub-second digits: spreading retries needs no better.
fn rand_fraction() -> f64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    f64::from(nanos % 1000) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_start_fast_back_off_and_reset_after_a_success() {
        let b = Backoff::default();
        let first = b.failed("ns/a");
        assert!(first >= FIRST && first <= FIRST.mul_f64(1.25), "{first:?}");
        let second = b.failed("ns/a");
        assert!(second >= FIRST * 2, "{second:?}");
        assert!(b.failed("ns/b") <= FIRST.mul_f64(1.25), "MergeJobs back off independently");
        for _ in 0..40 {
            assert!(b.failed("ns/a") <= MAX.mul_f64(1.25));
        }
        b.succeeded("ns/a");
        assert!(b.failed("ns/a") <= FIRST.mul_f64(1.25));
    }
}
