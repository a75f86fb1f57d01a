//! What the trainer's stages write and the operator reads back into a MergeJob's status: the
//! evaluate stage's headline results (`<run>/eval/metrics.json`) and a shard's training summary
//! (`<run>/shards/<shard>/metrics.json`). The trainer writes richer documents; these types are the
//! part the operator relies on, and a trainer test parses what it writes with them.

use serde::{Deserialize, Serialize};

/// The evaluate stage's results, as far as the status needs them.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
pub struct EvaluationResults {
    /// Every candidate, the primary merged model first.
    pub candidates: Vec<CandidateResults>,
}

/// One evaluated model.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
pub struct CandidateResults {
    /// Candidate id (`data-vector`, `params-mean`, `shard-a`, ...).
    pub id: String,
    /// Its metrics on the held-out set.
    pub metrics: HeadlineMetrics,
    /// Share of Grad-CAM heat inside the images' foreground (older reports: `fundus_fraction`).
    #[serde(default, alias = "fundus_fraction")]
    pub foreground_fraction: Option<f64>,
    /// Area under the deletion curve.
    #[serde(default)]
    pub deletion_auc: Option<f64>,
    /// Area under the insertion curve.
    #[serde(default)]
    pub insertion_auc: Option<f64>,
    /// Deletion area, coldest pixels first minus hottest first.
    #[serde(default)]
    pub deletion_gain: Option<f64>,
}

/// The metrics copied into the status.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
pub struct HeadlineMetrics {
    /// Fraction of images whose top class is the label.
    pub accuracy: f64,
    /// Mean per-class F1.
    #[serde(default)]
    pub macro_f1: Option<f64>,
    /// Mean one-vs-rest AUROC.
    #[serde(default)]
    pub macro_auroc: Option<f64>,
}

/// A shard's training summary.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
pub struct ShardTraining {
    /// Per-epoch numbers.
    #[serde(default)]
    pub epochs: Vec<EpochSummary>,
    /// The epoch whose weights were kept.
    #[serde(default)]
    pub best_epoch: Option<u32>,
    /// Training images per class.
    #[serde(default)]
    pub class_counts: Vec<u64>,
}

/// One epoch of a shard's training.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
pub struct EpochSummary {
    /// 1-based epoch.
    pub epoch: u32,
    /// Accuracy on the shard's validation split, if it kept one.
    #[serde(default)]
    pub validation_accuracy: Option<f64>,
}

impl ShardTraining {
    /// Training images, when the summary says.
    pub fn samples(&self) -> Option<u64> {
        (!self.class_counts.is_empty()).then(|| self.class_counts.iter().sum())
    }

    /// The validation accuracy of the epoch that was kept.
    pub fn best_validation_accuracy(&self) -> Option<f64> {
        self.epochs.iter().find(|e| Some(e.epoch) == self.best_epoch).and_then(|e| e.validation_accuracy)
    }
}
