//! `MergeJob` status, written by the operator (and mirrored by the local pipeline's summary).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Observed state of a MergeJob.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MergeJobStatus {
    /// Pending, Training, Merging, Restoring, Evaluating, Succeeded, Failed or Suspended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Shards whose vector is available, as "ready/total".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards_ready: Option<String>,
    /// Headline results of the evaluate stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results: Option<ResultsStatus>,
}

/// Headline evaluation numbers.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResultsStatus {
    /// Accuracy of the merged model on the held-out set.
    pub accuracy: f64,
    /// Macro-averaged F1 of the merged model.
    pub macro_f1: f64,
    /// Location of the merged, restored model.
    pub model: String,
}
