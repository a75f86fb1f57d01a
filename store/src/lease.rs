//! Leases: at most one holder of a key at a time, kept by renewing it and lapsing when the
//! holder stops (a killed pod), so that runners on different machines sharing a bucket do not
//! run the same stage twice.
//!
//! A lease is an object holding its holder and expiry, created with the store's no-replace
//! publish. Taking over a lapsed lease is a delete and a new publish, and two runners can race
//! there; both then run the stage and the no-replace publish of its outputs decides. A lease
//! saves work; the publish keeps runs consistent. Expiry compares the holder's clock with the
//! reader's, so clocks are assumed within a fraction of [`LEASE_TTL`] (NTP).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{Result, Store, StoreError};

/// How long a lease lasts without renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(60);
/// How often a holder renews its lease.
pub const LEASE_RENEW_EVERY: Duration = Duration::from_secs(15);

/// Who holds a lease, and until when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRecord {
    /// The holder's name (`<host>~<pid>~<n>` for a runner).
    pub holder: String,
    /// Seconds since the Unix epoch at which the lease lapses unless renewed.
    pub expires_unix: u64,
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

impl LeaseRecord {
    fn new(holder: &str, ttl: Duration) -> LeaseRecord {
        LeaseRecord { holder: holder.into(), expires_unix: now_unix() + ttl.as_secs().max(1) }
    }

    fn to_bytes(&self) -> Vec<u8> {
        format!("holder {}\nexpires {}\n", self.holder, self.expires_unix).into_bytes()
    }

    /// The record in `bytes`; `None` when they are not one (treated as a lapsed lease).
    fn parse(bytes: &[u8]) -> Option<LeaseRecord> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut lines = text.lines();
        let holder = lines.next()?.strip_prefix("holder ")?.to_string();
        let expires_unix = lines.next()?.strip_prefix("expires ")?.parse().ok()?;
        Some(LeaseRecord { holder, expires_unix })
    }

    /// Seconds until the lease lapses (0 once it has).
    pub fn remaining(&self) -> Duration {
        Duration::from_secs(self.expires_unix.saturating_sub(now_unix()))
    }
}

impl Store {
    /// Takes the lease at `key` for `holder` for `ttl`. Returns `None` when `holder` now holds
    /// it, or the record of the other holder whose lease has not lapsed. A lapsed or unreadable
    /// lease is taken over.
    pub async fn try_lease(&self, key: &str, holder: &str, ttl: Duration) -> Result<Option<LeaseRecord>> {
        for _ in 0..3 {
            match self.publish(key, LeaseRecord::new(holder, ttl).to_bytes()).await {
                Ok(_) => return Ok(None),
                Err(StoreError::AlreadyPublished { .. }) => {}
                Err(e) => return Err(e),
            }
            let Some(bytes) = self.get(key).await? else { continue };
            match LeaseRecord::parse(&bytes) {
                Some(record) if record.holder == holder => {
                    self.put(key, LeaseRecord::new(holder, ttl).to_bytes()).await?;
                    return Ok(None);
                }
                Some(record) if record.remaining() > Duration::ZERO => return Ok(Some(record)),
                lapsed => {
                    tracing::info!(lease = %self.location(key), holder = lapsed.map(|r| r.holder).unwrap_or_default(), "taking over a lapsed lease");
                    self.remove(key).await?;
                }
            }
        }
        // Three rounds lost to other runners taking and dropping it: report whoever has it now.
        let record = self.get(key).await?.and_then(|b| LeaseRecord::parse(&b));
        Ok(Some(record.unwrap_or(LeaseRecord { holder: "another runner".into(), expires_unix: now_unix() + 1 })))
    }

    /// Extends `holder`'s lease at `key` by `ttl`; `false` when another holder has it now (it
    /// lapsed and was taken over), which the caller reports.
    pub async fn renew_lease(&self, key: &str, holder: &str, ttl: Duration) -> Result<bool> {
        match self.get(key).await?.and_then(|b| LeaseRecord::parse(&b)) {
            Some(record) if record.holder != holder => Ok(false),
            _ => {
                self.put(key, LeaseRecord::new(holder, ttl).to_bytes()).await?;
                Ok(true)
            }
        }
    }

    /// Gives `holder`'s lease at `key` up (nothing happens when another holder has it).
    pub async fn release_lease(&self, key: &str, holder: &str) -> Result<()> {
        match self.get(key).await?.and_then(|b| LeaseRecord::parse(&b)) {
            Some(record) if record.holder == holder => self.remove(key).await,
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_holder_at_a_time_until_release_or_lapse() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::local(dir.path());
        let key = "ns/job/g1/leases/merge-merged";
        assert_eq!(store.try_lease(key, "a", LEASE_TTL).await.unwrap(), None);
        let busy = store.try_lease(key, "b", LEASE_TTL).await.unwrap().expect("a holds it");
        assert_eq!(busy.holder, "a");
        assert!(busy.remaining() > Duration::from_secs(50));
        assert_eq!(store.try_lease(key, "a", LEASE_TTL).await.unwrap(), None, "its holder may take it again");
        assert!(store.renew_lease(key, "a", LEASE_TTL).await.unwrap());
        assert!(!store.renew_lease(key, "b", LEASE_TTL).await.unwrap(), "b does not hold it");
        store.release_lease(key, "b").await.unwrap();
        assert!(store.try_lease(key, "c", LEASE_TTL).await.unwrap().is_some(), "only the holder releases");
        store.release_lease(key, "a").await.unwrap();
        assert_eq!(store.try_lease(key, "b", LEASE_TTL).await.unwrap(), None);
        // b is killed: its lease lapses and c takes over; b's renewal then reports the loss.
        store.put(key, LeaseRecord { holder: "b".into(), expires_unix: now_unix() - 1 }.to_bytes()).await.unwrap();
        assert_eq!(store.try_lease(key, "c", LEASE_TTL).await.unwrap(), None);
        assert!(!store.renew_lease(key, "b", LEASE_TTL).await.unwrap());
    }

    #[tokio::test]
    async fn an_unreadable_lease_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::local(dir.path());
        store.put("run/leases/x", b"garbage".to_vec()).await.unwrap();
        assert_eq!(store.try_lease("run/leases/x", "a", LEASE_TTL).await.unwrap(), None);
        assert_eq!(LeaseRecord::parse(&store.get("run/leases/x").await.unwrap().unwrap()).unwrap().holder, "a");
    }
}
