//! The medmerge operator: a kube-rs controller that turns each MergeJob into batch Jobs.
//!
//! Pure core: what to do next (`decide`), the Jobs that do it (`jobs`, `names`, with the pod
//! settings layered by `pod_overrides`), how the
//! cluster's Jobs read in `decide`'s terms (`observe`), what to change on Jobs already created
//! (`interventions`: stop superseded and dropped work, pause and resume) and the status to
//! write (`status`).
//! Around it: the reconcile loop (`controller`), results read back from the artifact store
//! (`artifacts`), leader election (`leader`), health/metrics (`telemetry`) and retry delays (`retry`).

pub mod artifacts;
pub mod controller;
pub mod decide;
pub mod image_policy;
pub mod interventions;
pub mod job_cache;
pub mod job_work;
pub mod jobs;
pub mod lanes;
pub mod leader;
pub mod names;
pub mod observe;
pub mod pod_overrides;
pub mod retry;
pub mod status;
pub mod telemetry;

/// Selects rustls' ring provider for the whole process. kube (ring) and the AWS SDK (aws-lc-rs)
/// both link a provider, and rustls refuses to guess between two; call this before any client
/// is built. Calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
