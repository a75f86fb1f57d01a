//! `MergeJob` status, written by the operator (and mirrored by the local pipeline's summary).

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

/// Reads a status enum that another version of the operator (or a person) may have written: a
/// value this version does not know becomes the default (no phase, a Pending shard, a Failed
/// stage), so one odd status never stops its MergeJob from being read and reconciled.
fn known_or_default<'de, D: Deserializer<'de>, T: DeserializeOwned + Default>(d: D) -> Result<T, D::Error> {
    Ok(serde_json::from_value(serde_json::Value::deserialize(d)?).unwrap_or_default())
}

/// The MergeJob's phase (`status.phase`).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
pub enum Phase {
    /// Nothing running yet.
    Pending,
    /// Shards are training (or vectors being collected).
    Training,
    /// Vectors are being merged.
    Merging,
    /// Batch-norm state is being restored.
    Restoring,
    /// Candidates are being evaluated.
    Evaluating,
    /// Everything finished.
    Succeeded,
    /// The run cannot finish; see the message.
    Failed,
    /// `suspend` (or `cluster.suspend`) is set.
    Suspended,
}

impl Phase {
    /// Every phase, in the order a run passes through them.
    pub const ALL: [Phase; 8] = [Phase::Pending, Phase::Training, Phase::Merging, Phase::Restoring, Phase::Evaluating, Phase::Succeeded, Phase::Failed, Phase::Suspended];

    /// Whether the phase is final for its generation.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }

    /// The name written to `status.phase`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Training => "Training",
            Phase::Merging => "Merging",
            Phase::Restoring => "Restoring",
            Phase::Evaluating => "Evaluating",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
            Phase::Suspended => "Suspended",
        }
    }
}

/// Where one shard stands.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ShardState {
    /// Its Job has not been created yet.
    #[default]
    Pending,
    /// Its Job waits for a queue (Kueue) to admit it.
    Queued,
    /// Its training Job is running.
    Training,
    /// Its collection Job is waiting for the hospital's external vector.
    Waiting,
    /// Its vector is available.
    Ready,
    /// Its Job failed after every retry; it is left out of the merge.
    Failed,
    /// It missed the straggler deadline; it is left out of the merge.
    Dropped,
}

impl ShardState {
    /// The name written to `status.shards[].state`.
    pub fn as_str(self) -> &'static str {
        match self {
            ShardState::Pending => "Pending",
            ShardState::Queued => "Queued",
            ShardState::Training => "Training",
            ShardState::Waiting => "Waiting",
            ShardState::Ready => "Ready",
            ShardState::Failed => "Failed",
            ShardState::Dropped => "Dropped",
        }
    }

    /// Whether the shard is left out of the merge (Failed or Dropped).
    pub fn is_excluded(self) -> bool {
        matches!(self, ShardState::Failed | ShardState::Dropped)
    }
}

/// How a finished stage ended (`status.stages[].state`).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum StageOutcome {
    /// Its Job completed.
    Succeeded,
    /// Its Job failed after every retry (and what an unknown outcome is read as: never as done).
    #[default]
    Failed,
    /// A straggler's Job the operator stopped.
    Dropped,
}

/// Observed state of a MergeJob.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MergeJobStatus {
    /// Pending, Training, Merging, Restoring, Evaluating, Succeeded, Failed or Suspended.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "known_or_default")]
    pub phase: Option<Phase>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The generation that started the current run. Edits that change no result (placement,
    /// deadlines, `suspend`) continue it, with its Jobs and artifacts; see [`crate::run_key`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<i64>,
    /// Fingerprint of the spec fields that define the current run's results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_key: Option<String>,
    /// Shards whose vector is available, as "ready/total".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards_ready: Option<String>,
    /// Ready, Progressing, Failed and Queued (stage Jobs waiting for Kueue to admit them), plus one
    /// per stage kind (Trained, Merged, Restored, Evaluated), each with a reason and a message a
    /// person can act on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// One entry per shard of the observed generation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub shards: Vec<ShardStatus>,
    /// Headline results of the evaluate stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results: Option<ResultsStatus>,
    /// When the observed generation's first stage Job was created (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// When the observed generation reached Succeeded or Failed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    /// Every finished stage of the observed generation. The operator's memory of what is done:
    /// a finished Job may be deleted (`ttlSecondsAfterFinished`, or by hand) and its stage does
    /// not run again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub stages: Vec<StageRecord>,
}

/// A finished stage.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StageRecord {
    /// Stage name, e.g. `finetune-hospital-a`.
    pub name: String,
    /// Succeeded, Failed, or Dropped (a straggler's Job the operator stopped).
    #[serde(deserialize_with = "known_or_default")]
    pub state: StageOutcome,
    /// Pods its Job started.
    #[serde(default)]
    pub attempts: i32,
    /// Why its Job failed (the Job controller's reason and message), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A standard Kubernetes condition (the shape of `meta/v1` Condition).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. Ready or Trained.
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    /// CamelCase reason for the last transition.
    pub reason: String,
    /// What happened, in words.
    pub message: String,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: String,
    /// The generation the condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// How one shard is doing.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardStatus {
    /// Shard name.
    pub name: String,
    /// Pending, Queued (its Job waits for Kueue's admission), Training, Waiting (external vector),
    /// Ready, Failed or Dropped.
    #[serde(deserialize_with = "known_or_default")]
    pub state: ShardState,
    /// Pods started for the shard's training or collection Job.
    #[serde(default)]
    pub attempts: i32,
    /// Where the shard's data vector is, once it is there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vector: Option<String>,
    /// Training images the shard used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<u64>,
    /// The shard's accuracy on its own validation split (if it kept one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_accuracy: Option<f64>,
    /// How its vector was released: encoding, size and differential privacy (shards trained
    /// by this MergeJob).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<crate::results::ReleaseRecord>,
    /// Why the shard failed or was dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Headline evaluation numbers.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResultsStatus {
    /// Accuracy of the merged model on the held-out set.
    pub accuracy: f64,
    /// Macro-averaged F1 of the merged model.
    pub macro_f1: f64,
    /// Macro-averaged one-vs-rest AUROC of the merged model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auroc: Option<f64>,
    /// Location of the merged, restored model.
    pub model: String,
    /// Location of the full evaluation report (JSON; Markdown beside it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<String>,
    /// Location of the self-contained HTML report for people: every model's results, per-class
    /// numbers at the operating point, confusion matrix, ROC curves, Grad-CAM gallery, settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html_report: Option<String>,
    /// Share of the merged model's Grad-CAM heat inside the images' foreground (explained images).
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "fundusHeat")]
    pub foreground_heat: Option<f64>,
    /// Mean area under the merged model's Grad-CAM deletion curves (lower: its maps point at
    /// what it uses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_auc: Option<f64>,
    /// Mean area under its insertion curves (higher: its maps point at what it uses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insertion_auc: Option<f64>,
    /// Mean deletion area with its maps' coldest pixels first minus hottest first (about 0: the
    /// maps are noise to the model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_gain: Option<f64>,
    /// Every other evaluated model (baselines and each shard alone), for comparison.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub baselines: Vec<CandidateSummary>,
}

/// One evaluated model's headline numbers.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CandidateSummary {
    /// Candidate id (`params-mean`, `shard-<name>`, `full-training`, ...).
    pub id: String,
    /// Accuracy on the held-out set.
    pub accuracy: f64,
    /// Macro-averaged F1 on the held-out set.
    pub macro_f1: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_and_states_round_trip_and_unknown_ones_fall_back_to_the_default() {
        let status = MergeJobStatus {
            phase: Some(Phase::Restoring),
            shards: vec![ShardStatus { name: "a".into(), state: ShardState::Queued, ..Default::default() }],
            stages: vec![StageRecord { name: "init".into(), state: StageOutcome::Dropped, ..Default::default() }],
            ..Default::default()
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!((json["phase"].as_str(), json["shards"][0]["state"].as_str(), json["stages"][0]["state"].as_str()), (Some("Restoring"), Some("Queued"), Some("Dropped")));
        assert_eq!(serde_json::from_value::<MergeJobStatus>(json).unwrap(), status);
        let odd: MergeJobStatus = serde_json::from_value(serde_json::json!({
            "phase": "Initializing",
            "shards": [{"name": "a", "state": "Sleeping"}],
            "stages": [{"name": "init", "state": "Maybe"}],
        }))
        .unwrap();
        assert_eq!((odd.phase, odd.shards[0].state, odd.stages[0].state), (None, ShardState::Pending, StageOutcome::Failed));
    }
}
