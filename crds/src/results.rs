//! What the trainer's stages write and the operator reads back into a MergeJob's status: the
//! evaluate stage's headline results (`<run>/eval/metrics.json`) and a shard's training summary
//! (`<run>/shards/<shard>/metrics.json`). The trainer writes richer documents; these types are the
//! part the operator relies on, and a trainer test parses what it writes with them.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::spec::VectorEncoding;

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
    /// What its Grad-CAM maps say.
    #[serde(flatten)]
    pub heat: HeatMeasures,
}

/// What Grad-CAM maps say about where a model looked (for many images: their means).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HeatMeasures {
    /// Share of heat inside the image's foreground (images with a plain background only).
    #[serde(default, alias = "fundus_fraction")]
    pub foreground_fraction: Option<f64>,
    /// Area under the deletion curve: the explained class's probability as the hottest pixels
    /// are removed (lower: the map points at what the model uses).
    #[serde(default)]
    pub deletion_auc: Option<f64>,
    /// Area under the insertion curve: the probability as the hottest pixels are revealed on a
    /// blurred copy (higher: the map points at what the model uses).
    #[serde(default)]
    pub insertion_auc: Option<f64>,
    /// Deletion area with the coldest pixels first minus with the hottest first (the area between
    /// the curves): how much more the hot pixels matter to the model than the cold (about 0: the
    /// map is noise to the model).
    #[serde(default)]
    pub deletion_gain: Option<f64>,
}

impl HeatMeasures {
    /// Whether any measure was taken.
    pub fn is_empty(&self) -> bool {
        self.foreground_fraction.is_none() && self.deletion_auc.is_none() && self.insertion_auc.is_none() && self.deletion_gain.is_none()
    }
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
    /// How the shard's vector was released (noise, encoding, size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseRecord>,
}

/// How a vector left its hospital: written by the training stage into the shard's summary (and,
/// without the size, into the vector's own metadata), copied by the operator into the shard's
/// status.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseRecord {
    /// Encoding of the weight tensors.
    pub encoding: VectorEncoding,
    /// With `topK`: the fraction of entries kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub density: Option<f64>,
    /// Size of the vector file in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// The differential-privacy guarantee of the vector, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacyRecord>,
}

impl ReleaseRecord {
    /// The encoding as people read it: `int8`, `topK 0.1`.
    pub fn encoding_label(&self) -> String {
        match self.density {
            Some(d) => format!("{} {d}", self.encoding.as_str()),
            None => self.encoding.as_str().into(),
        }
    }

    /// The file's size in MB, or `n/a` when not recorded.
    pub fn size_label(&self) -> String {
        self.bytes.map_or("n/a".into(), |b| format!("{:.1} MB", b as f64 / 1e6))
    }

    /// The privacy guarantee, e.g. `(ε 4, δ 0.000001)-DP, clip 2, σ 8.000e-1`, or `None`.
    pub fn privacy_label(&self) -> Option<String> {
        self.privacy.map(|p| format!("(ε {}, δ {})-DP, clip {}, σ {:.3e}", p.epsilon, p.delta, p.clip_norm, p.noise_stddev))
    }
}

/// The differential privacy a released vector has.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrivacyRecord {
    /// Privacy loss epsilon.
    pub epsilon: f64,
    /// Failure probability delta.
    pub delta: f64,
    /// The L2 norm the vector was clipped to.
    pub clip_norm: f64,
    /// Standard deviation of the Gaussian noise added to every entry.
    pub noise_stddev: f64,
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
