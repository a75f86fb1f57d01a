//! The operator's view of the artifact store: it reads back the evaluate stage's headline
//! results and each shard's training summary (copied into the MergeJob's status), and deletes a
//! MergeJob's artifacts when its cleanup policy says so. Parsing is pure; only
//! [`ArtifactStore`]'s methods touch storage.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use medmerge_crds::results::{CandidateResults, EvaluationResults, ShardTraining};
use medmerge_crds::{ArtifactLayout, CandidateSummary, MergeJobSpec, RestoreMode, ResultsStatus};
use medmerge_store::{S3Config, Store, StoreError};

use crate::status::ShardFact;

/// Errors reading artifacts back.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The artifact is not the JSON the trainer writes.
    #[error("artifact {key} is not valid: {why}")]
    Invalid {
        /// The artifact key.
        key: String,
        /// What is wrong with it.
        why: String,
    },
}

/// How the operator reaches MergeJobs' artifact stores: S3 buckets with its own AWS
/// credentials (standard chain), and `storage.local` directories only where it can see them.
#[derive(Clone, Debug, Default)]
pub struct ArtifactStore {
    /// Directory relative `storage.local.path` values are resolved against; `None` when the
    /// operator cannot see local stores (results then stay in the store only).
    pub local_root: Option<PathBuf>,
    /// One client per bucket, endpoint, region and addressing style, built on first use:
    /// building one resolves credentials and sets up TLS, too much to repeat on every read.
    s3_clients: Arc<Mutex<HashMap<S3ClientKey, Store>>>,
}

/// What makes two `storage.s3` blocks reachable by the same client: bucket, endpoint, region,
/// path-style addressing.
type S3ClientKey = (String, Option<String>, String, bool);

impl ArtifactStore {
    /// Reaches S3 stores, and local ones under `local_root` if given.
    pub fn new(local_root: Option<PathBuf>) -> Self {
        ArtifactStore { local_root, s3_clients: Arc::default() }
    }

    async fn store_for(&self, spec: &MergeJobSpec) -> Option<Store> {
        if let Some(s3) = &spec.storage.s3 {
            let key = (s3.bucket.clone(), s3.endpoint.clone(), s3.region.clone(), s3.path_style);
            if let Some(store) = self.s3_clients.lock().expect("client cache lock").get(&key) {
                return Some(store.clone());
            }
            // A reconcile should not hang on a slow store: fewer, shorter attempts.
            let config = S3Config { max_attempts: 3, attempt_timeout: Some(std::time::Duration::from_secs(30)), ..S3Config::from_spec(s3) };
            let store = Store::s3(config).await;
            // Two reconciles may build the same client at once; either is fine to keep.
            self.s3_clients.lock().expect("client cache lock").insert(key, store.clone());
            return Some(store);
        }
        match (&self.local_root, &spec.storage.local) {
            (Some(root), Some(local)) => Some(Store::local(resolve(root, &local.path))),
            _ => None,
        }
    }

    /// Whether the operator can read `spec`'s store at all (an S3 bucket, or a local path under
    /// the operator's own mount); [`ArtifactStore::get`] finds nothing in any other.
    pub fn reaches(&self, spec: &MergeJobSpec) -> bool {
        spec.storage.s3.is_some() || (self.local_root.is_some() && spec.storage.local.is_some())
    }

    /// The bytes at `key` in `spec`'s store, or `None` when it does not exist or the store is
    /// out of the operator's reach.
    pub async fn get(&self, spec: &MergeJobSpec, key: &str) -> Result<Option<Vec<u8>>, ArtifactError> {
        match self.store_for(spec).await {
            Some(store) => Ok(store.get(key).await?),
            None => Ok(None),
        }
    }

    /// Deletes every artifact under `prefix`; `Ok(false)` when `spec`'s store is out of reach.
    pub async fn remove_all(&self, spec: &MergeJobSpec, prefix: &str) -> Result<bool, ArtifactError> {
        match self.store_for(spec).await {
            Some(store) => {
                store.remove_prefix(prefix).await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

fn resolve(root: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        root.join(p)
    }
}

/// The headline results in the evaluate stage's `metrics.json`.
pub fn results_from_report(bytes: &[u8], spec: &MergeJobSpec, layout: &ArtifactLayout) -> Result<ResultsStatus, ArtifactError> {
    let key = layout.eval_metrics();
    let invalid = |why: &str| ArtifactError::Invalid { key: key.clone(), why: why.into() };
    let report: EvaluationResults = serde_json::from_slice(bytes).map_err(|e| invalid(&e.to_string()))?;
    let Some((primary, baselines)) = report.candidates.split_first() else { return Err(invalid("no candidates")) };
    let summary = |c: &CandidateResults| CandidateSummary { id: c.id.clone(), accuracy: c.metrics.accuracy, macro_f1: c.metrics.macro_f1.unwrap_or(f64::NAN) };
    let model = if spec.restore.mode == RestoreMode::None { layout.merged(&primary.id) } else { layout.restored(&primary.id) };
    Ok(ResultsStatus {
        accuracy: primary.metrics.accuracy,
        macro_f1: primary.metrics.macro_f1.unwrap_or(f64::NAN),
        auroc: primary.metrics.macro_auroc,
        model,
        report: Some(key.clone()),
        html_report: Some(layout.eval_html()),
        foreground_heat: primary.heat.foreground_fraction,
        deletion_auc: primary.heat.deletion_auc,
        insertion_auc: primary.heat.insertion_auc,
        deletion_gain: primary.heat.deletion_gain,
        baselines: baselines.iter().map(summary).collect(),
    })
}

/// Training images, best validation accuracy and the vector's release from a shard's
/// `metrics.json` (nothing, if it cannot be read).
pub fn shard_summary(bytes: &[u8]) -> ShardFact {
    match serde_json::from_slice::<ShardTraining>(bytes) {
        Ok(t) => ShardFact { samples: t.samples(), validation_accuracy: t.best_validation_accuracy(), release: t.release },
        Err(_) => ShardFact::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> MergeJobSpec {
        serde_yaml::from_str("model: {architecture: resnet18, weights: random}\nshards: [{name: a, data: {path: a}}]\nevaluation: {data: {path: t}}\n").unwrap()
    }

    #[tokio::test]
    async fn one_s3_client_serves_every_read_of_a_bucket() {
        let on = |bucket: &str| {
            let mut s = spec();
            s.storage.s3 = Some(medmerge_crds::S3Storage { bucket: bucket.into(), endpoint: Some("http://127.0.0.1:9".into()), region: "r".into(), path_style: true, credentials_secret: None });
            s
        };
        let store = ArtifactStore::new(None);
        for bucket in ["a", "a", "b", "a"] {
            assert!(matches!(store.store_for(&on(bucket)).await, Some(Store::S3(_))));
        }
        assert_eq!(store.s3_clients.lock().unwrap().len(), 2, "one client per bucket, built once");
    }

    #[test]
    fn the_first_candidate_is_the_headline_and_the_rest_are_baselines() {
        let report = br#"{"candidates": [
            {"id": "data-vector", "metrics": {"accuracy": 0.87, "macro_f1": 0.86, "macro_auroc": 0.97}},
            {"id": "params-mean", "metrics": {"accuracy": 0.85, "macro_f1": 0.84}}]}"#;
        let layout = ArtifactLayout::new("runs", "ns", "mj", 2);
        let r = results_from_report(report, &spec(), &layout).unwrap();
        assert_eq!((r.accuracy, r.macro_f1, r.auroc), (0.87, 0.86, Some(0.97)));
        assert_eq!(r.model, "runs/ns/mj/g2/restored/data-vector/model.safetensors");
        assert_eq!(r.baselines, vec![CandidateSummary { id: "params-mean".into(), accuracy: 0.85, macro_f1: 0.84 }]);
    }

    #[test]
    fn a_report_without_candidates_is_refused_naming_the_key() {
        let layout = ArtifactLayout::new("runs", "ns", "mj", 2);
        let err = results_from_report(br#"{"candidates": []}"#, &spec(), &layout).unwrap_err().to_string();
        assert!(err.contains("runs/ns/mj/g2/eval/metrics.json") && err.contains("no candidates"), "{err}");
        assert!(results_from_report(b"not json", &spec(), &layout).is_err());
    }

    #[test]
    fn the_merged_models_grad_cam_measures_reach_status_and_old_reports_still_read() {
        let layout = ArtifactLayout::new("runs", "ns", "mj", 1);
        let report = br#"{"candidates": [{"id": "data-vector", "metrics": {"accuracy": 0.8},
            "foreground_fraction": 0.9, "deletion_auc": 0.3, "insertion_auc": 0.6, "deletion_gain": 0.05}]}"#;
        let r = results_from_report(report, &spec(), &layout).unwrap();
        assert_eq!((r.foreground_heat, r.deletion_auc, r.insertion_auc, r.deletion_gain), (Some(0.9), Some(0.3), Some(0.6), Some(0.05)));
        let old = br#"{"candidates": [{"id": "data-vector", "metrics": {"accuracy": 0.8}, "fundus_fraction": 0.7}]}"#;
        let r = results_from_report(old, &spec(), &layout).unwrap();
        assert_eq!((r.foreground_heat, r.deletion_auc), (Some(0.7), None));
    }

    #[test]
    fn shard_summaries_report_samples_and_the_kept_epochs_validation_accuracy() {
        let m = br#"{"class_counts": [10, 20, 5], "best_epoch": 2, "epochs": [
            {"epoch": 1, "validation_accuracy": 0.5}, {"epoch": 2, "validation_accuracy": 0.75}]}"#;
        assert_eq!(shard_summary(m), ShardFact { samples: Some(35), validation_accuracy: Some(0.75), release: None });
        assert_eq!(shard_summary(b"{}"), ShardFact::default());
        let private = br#"{"class_counts": [3], "release": {"encoding": "int8", "bytes": 1200,
            "privacy": {"epsilon": 4.0, "delta": 1e-6, "clipNorm": 2.0, "noiseStddev": 0.9}}}"#;
        let release = shard_summary(private).release.unwrap();
        assert_eq!((release.encoding, release.bytes, release.privacy.unwrap().epsilon), (medmerge_crds::VectorEncoding::Int8, Some(1200), 4.0));
    }

    #[tokio::test]
    async fn local_artifacts_are_read_relative_to_the_root_and_missing_ones_are_none() {
        let dir = std::env::temp_dir().join(format!("medmerge-op-artifacts-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("store/k")).unwrap();
        std::fs::write(dir.join("store/k/x.json"), b"{}").unwrap();
        let mut s = spec();
        s.storage.local = Some(medmerge_crds::LocalStorage { path: "store".into(), persistent_volume_claim: None });
        let reader = ArtifactStore::new(Some(dir.clone()));
        assert_eq!(reader.get(&s, "k/x.json").await.unwrap(), Some(b"{}".to_vec()));
        assert_eq!(reader.get(&s, "k/missing.json").await.unwrap(), None);
        assert!(reader.remove_all(&s, "k").await.unwrap());
        assert_eq!(reader.get(&s, "k/x.json").await.unwrap(), None);
        assert!(dir.join("store").exists(), "only the prefix is removed");
        assert!(!ArtifactStore::new(None).remove_all(&s, "k").await.unwrap());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
