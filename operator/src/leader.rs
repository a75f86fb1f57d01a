//! Leader election with a `coordination.k8s.io/v1` Lease, so two operator replicas never
//! reconcile at once. The holder renews the Lease every third of its duration; another replica
//! takes it over only after it expired. Writes carry the Lease's `resourceVersion`, so two
//! replicas racing for an expired Lease cannot both win.
//!
//! Why not a crate (compared 2026-12): `kube-lease-manager` 0.12 (server-side apply, skew grace)
//! is built on kube 4 / k8s-openapi 0.28 and `kube-leader-election` 0.37 on kube 0.96 (and says
//! it has no fencing); either would put a second, semver-incompatible k8s-openapi in the tree,
//! which kube does not support. This module is the same algorithm as client-go's Lease lock in
//! ~150 lines, tested against a real API server (tests/tests/apiserver.rs). Revisit when a
//! maintained crate follows kube 5.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tracing::{info, warn};

/// Whether `me` may hold the Lease described by `spec` at `now`.
pub fn may_hold(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> bool {
    let Some(spec) = spec else { return true };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() || holder == me {
        return true;
    }
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    match spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) {
        Some(renewed) => renewed.0.as_second() + duration < now.as_second(),
        None => true,
    }
}

/// The Lease spec after `me` takes or renews it at `now`.
pub fn held_by(previous: Option<&LeaseSpec>, me: &str, duration: Duration, now: Timestamp) -> LeaseSpec {
    let previous_holder = previous.and_then(|s| s.holder_identity.as_deref());
    let taking_over = previous_holder != Some(me);
    let transitions = previous.and_then(|s| s.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(me.into()),
        lease_duration_seconds: Some(duration.as_secs() as i32),
        acquire_time: if taking_over { Some(MicroTime(now)) } else { previous.and_then(|s| s.acquire_time.clone()) },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if taking_over && previous_holder.is_some() { transitions + 1 } else { transitions }),
        ..Default::default()
    }
}

/// A Lease-based leader elector for one identity.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaderElector {
    /// An elector for Lease `name` (in `api`'s namespace), held as `identity` for `duration`.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        LeaderElector { api, name: name.into(), identity: identity.into(), duration }
    }

    /// Tries once to take or renew the Lease; `Ok(true)` when this replica holds it now.
    pub async fn try_hold(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        match self.api.get_opt(&self.name).await? {
            None => {
                let lease = Lease { metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() }, spec: Some(held_by(None, &self.identity, self.duration, now)) };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Some(mut lease) => {
                if !may_hold(lease.spec.as_ref(), &self.identity, now) {
                    return Ok(false);
                }
                lease.spec = Some(held_by(lease.spec.as_ref(), &self.identity, self.duration, now));
                match self.api.replace(&self.name, &PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) {
        let retry = self.duration / 3;
        loop {
            match self.try_hold().await {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.identity, "became leader");
                    return;
                }
                Ok(false) => {}
                Err(error) => warn!(%error, lease = %self.name, "leader election failed; retrying"),
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// Renews the Lease until renewal fails for longer than the Lease lasts; then returns, and
    /// the caller must stop reconciling (another replica may take over).
    pub async fn keep(&self) {
        let period = self.duration / 3;
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(period).await;
            match self.try_hold().await {
                Ok(true) => last_renewed = tokio::time::Instant::now(),
                Ok(false) => {
                    warn!(lease = %self.name, "leadership lost to another replica");
                    return;
                }
                Err(error) => warn!(%error, lease = %self.name, "renewing the leader lease failed"),
            }
            if last_renewed.elapsed() >= self.duration {
                warn!(lease = %self.name, "could not renew the leader lease in time");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn lease(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec { holder_identity: Some(holder.into()), lease_duration_seconds: Some(15), renew_time: Some(MicroTime(at(renewed))), ..Default::default() }
    }

    #[test]
    fn a_live_lease_belongs_to_its_holder_until_it_expires() {
        assert!(may_hold(None, "b", at(100)));
        assert!(may_hold(Some(&lease("b", 95)), "b", at(100)), "the holder renews");
        assert!(!may_hold(Some(&lease("a", 95)), "b", at(100)), "another replica waits");
        assert!(!may_hold(Some(&lease("a", 85)), "b", at(100)), "exactly at expiry it still waits");
        assert!(may_hold(Some(&lease("a", 80)), "b", at(100)), "an expired lease can be taken");
        assert!(may_hold(Some(&LeaseSpec::default()), "b", at(100)), "an unheld lease can be taken");
    }

    #[test]
    fn taking_over_counts_a_transition_and_renewing_keeps_the_acquire_time() {
        let taken = held_by(Some(&lease("a", 80)), "b", Duration::from_secs(15), at(100));
        assert_eq!((taken.holder_identity.as_deref(), taken.lease_transitions), (Some("b"), Some(1)));
        assert_eq!(taken.acquire_time, Some(MicroTime(at(100))));
        let renewed = held_by(Some(&taken), "b", Duration::from_secs(15), at(105));
        assert_eq!((renewed.acquire_time, renewed.renew_time, renewed.lease_transitions), (Some(MicroTime(at(100))), Some(MicroTime(at(105))), Some(1)));
        assert_eq!(held_by(None, "a", Duration::from_secs(15), at(1)).lease_transitions, Some(0));
    }
}
