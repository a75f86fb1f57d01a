//! The evaluate stage's results: JSON for machines (the operator copies the headline into status)
//! and a Markdown table for people.

use serde::{Deserialize, Serialize};

pub use medmerge_crds::results::HeatMeasures;

use crate::metrics::Metrics;

/// One evaluated model.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CandidateResult {
    /// Candidate id (`data-vector`, `params-mean`, `shard-a`, ...).
    pub id: String,
    /// What it is, in words.
    pub description: String,
    /// Its metrics on the held-out set.
    pub metrics: Metrics,
    /// What its Grad-CAM maps say over the explained images.
    #[serde(flatten)]
    pub heat: HeatMeasures,
}

/// One class's ROC curve (one class against the rest).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RocCurve {
    /// Class name.
    pub class: String,
    /// Area under the curve.
    pub auroc: Option<f64>,
    /// (false-positive rate, true-positive rate) points.
    pub points: Vec<(f64, f64)>,
}

/// One Grad-CAM overlay in the report's gallery.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GalleryImage {
    /// Overlay PNG, relative to the report.
    pub overlay: String,
    /// File name of the held-out image.
    pub image: String,
    /// True class.
    pub label: String,
    /// Predicted class.
    pub predicted: String,
    /// Probability of the predicted class.
    pub probability: f32,
    /// What its map says.
    #[serde(flatten)]
    pub heat: HeatMeasures,
}

impl GalleryImage {
    /// Whether the prediction was right.
    pub fn correct(&self) -> bool {
        self.label == self.predicted
    }
}

/// What a clinician reads about the primary model beyond the headline numbers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Clinical {
    /// ROC curve per class.
    pub roc: Vec<RocCurve>,
    /// Probability threshold of the operating point.
    pub operating_point: f64,
    /// Sensitivity per class at the operating point.
    pub sensitivity: Vec<Option<f64>>,
    /// Specificity per class at the operating point.
    pub specificity: Vec<Option<f64>>,
    /// Layer the Grad-CAM heatmaps come from.
    pub explain_layer: Option<String>,
    /// Grad-CAM overlays of correct and wrong predictions.
    pub gallery: Vec<GalleryImage>,
}

/// Cosine similarity of vectors for one tensor (the paper's Figure 2).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerSimilarity {
    /// Tensor name.
    pub tensor: String,
    /// Mean cosine similarity over all pairs of shard vectors.
    pub between_shards: f64,
    /// Mean cosine similarity of each shard vector with the full-training vector, if trained.
    pub with_full_training: Option<f64>,
}

/// Everything the evaluate stage found.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalReport {
    /// MergeJob name.
    pub job: String,
    /// The run's artifact root.
    pub run: String,
    /// Class names.
    pub classes: Vec<String>,
    /// Held-out images.
    pub test_images: usize,
    /// Every candidate, the primary merged model first.
    pub candidates: Vec<CandidateResult>,
    /// Per-tensor vector similarity.
    pub similarity: Vec<LayerSimilarity>,
    /// How each shard's vector left its hospital (encoding, size, privacy).
    #[serde(default)]
    pub releases: Vec<ShardRelease>,
    /// The spec that produced this run.
    pub spec: serde_json::Value,
    /// ROC curves, operating point and Grad-CAM gallery of the primary model.
    #[serde(default)]
    pub clinical: Clinical,
    /// The primary model as ONNX, and its int8 edge variant's accuracy.
    #[serde(default)]
    pub export: Option<EdgeExport>,
}

/// The primary model exported for serving stacks and edge devices (ONNX, beside the report).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EdgeExport {
    /// ONNX operator set.
    pub opset: i64,
    /// The float32 file's name and size.
    pub float_file: String,
    /// Its size in bytes.
    pub float_bytes: u64,
    /// The int8-weights file's name.
    pub int8_file: String,
    /// Its size in bytes.
    pub int8_bytes: u64,
    /// The int8 variant's metrics on the held-out set (the float model's are the primary's).
    pub int8_accuracy: f64,
    /// Its macro F1.
    pub int8_macro_f1: f64,
}

impl EdgeExport {
    /// One line per file: name, size and held-out accuracy (the float one is `float_accuracy`).
    pub fn rows(&self, float_accuracy: f64, float_macro_f1: f64) -> [[String; 4]; 2] {
        let mb = |b: u64| format!("{:.1} MB", b as f64 / 1e6);
        let pct = |v: f64| format!("{:.1} %", 100.0 * v);
        [
            [self.float_file.clone(), mb(self.float_bytes), pct(float_accuracy), format!("{float_macro_f1:.3}")],
            [self.int8_file.clone(), mb(self.int8_bytes), pct(self.int8_accuracy), format!("{:.3}", self.int8_macro_f1)],
        ]
    }
}

/// What the exported files are, for readers of the report.
pub const EXPORT_NOTE: &str = "ONNX opset 17 files beside this report: input `image` float32 [batch, 3, size, size] RGB in [0, 1] (normalised in the graph), outputs `logits` and `probabilities`. The int8 file stores every convolution kernel and linear weight but the first convolution and the head as int8 with one scale per output channel; its accuracy is measured here on the same held-out images.";

/// How one shard's vector was released, as its file records it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ShardRelease {
    /// Shard name.
    pub shard: String,
    /// Encoding, size and privacy (vectors written without a record: float32, no privacy).
    pub release: medmerge_crds::results::ReleaseRecord,
}

impl ShardRelease {
    /// The privacy column: the guarantee, or that there is none.
    pub fn privacy(&self) -> String {
        self.release.privacy_label().unwrap_or_else(|| "none".into())
    }

    /// The encoding column, with top-k's density.
    pub fn encoding(&self) -> String {
        self.release.encoding_label()
    }

    /// The size column.
    pub fn size(&self) -> String {
        self.release.size_label()
    }
}

/// What a privacy guarantee on the vectors covers, for readers of the report.
pub const PRIVACY_SCOPE: &str = "Differential privacy covers each vector's tensors for one release, against any change of that hospital's training set; it does not cover sample counts, training metrics or what restoration stages release (an averaged epoch's weights, batch-norm moments, head statistics).";

impl EvalReport {
    /// The primary merged model's result.
    pub fn primary(&self) -> &CandidateResult {
        &self.candidates[0]
    }

    /// A Markdown report: the results table, per-class numbers of the primary model, similarity.
    pub fn to_markdown(&self) -> String {
        let mut md = format!("# medmerge results: {}\n\nRun `{}`, {} held-out images, classes: {}.\n\n", self.job, self.run, self.test_images, self.classes.join(", "));
        md.push_str(&self.table());
        md.push_str("\n![accuracy per model](results.png)\n");
        let p = self.primary();
        md.push_str(&format!("\n## Per class ({})\n\n| class | recall | specificity | F1 | AUROC |\n|---|---|---|---|---|\n", p.id));
        for (i, c) in self.classes.iter().enumerate() {
            let m = &p.metrics;
            let auc = m.auroc[i].map_or("n/a".into(), |a| format!("{a:.3}"));
            md.push_str(&format!("| {c} | {:.3} | {:.3} | {:.3} | {auc} |\n", m.recall[i], m.specificity[i], m.f1[i]));
        }
        if !p.metrics.confusion.is_empty() {
            md.push_str("\nConfusion matrix (rows: true class, columns: predicted), also in confusion.png:\n\n");
            for (c, row) in self.classes.iter().zip(&p.metrics.confusion) {
                md.push_str(&format!("- {c}: {:?}\n", row));
            }
        }
        if !self.similarity.is_empty() {
            let mean = self.similarity.iter().map(|s| s.between_shards).sum::<f64>() / self.similarity.len() as f64;
            md.push_str(&format!("\n## Vector similarity\n\nMean per-layer cosine similarity between shard vectors: {mean:.3} over {} weight tensors", self.similarity.len()));
            let full: Vec<f64> = self.similarity.iter().filter_map(|s| s.with_full_training).collect();
            if !full.is_empty() {
                md.push_str(&format!("; with the full-training vector: {:.3}", full.iter().sum::<f64>() / full.len() as f64));
            }
            md.push_str(". Per-layer values are in metrics.json.\n\n![per-layer cosine similarity](similarity.png)\n");
        }
        if !self.releases.is_empty() {
            md.push_str("\n## How the vectors left the hospitals\n\n| shard | encoding | size | privacy |\n|---|---|---|---|\n");
            for r in &self.releases {
                md.push_str(&format!("| {} | {} | {} | {} |\n", r.shard, r.encoding(), r.size(), r.privacy()));
            }
            if self.releases.iter().any(|r| r.release.privacy.is_some()) {
                md.push_str(&format!("\n{PRIVACY_SCOPE}\n"));
            }
        }
        if let Some(e) = &self.export {
            let p = &self.primary().metrics;
            md.push_str("\n## The model for serving and edge devices\n\n| file | size | accuracy | macro F1 |\n|---|---|---|---|\n");
            for [file, size, acc, f1] in e.rows(p.accuracy, p.macro_f1) {
                md.push_str(&format!("| {file} | {size} | {acc} | {f1} |\n"));
            }
            md.push_str(&format!("\n{EXPORT_NOTE}\n"));
        }
        if self.candidates.iter().any(|c| !c.heat.is_empty()) {
            md.push_str("\n## Grad-CAM\n\nPer model, over the explained images: the share of heat inside the image's foreground, the areas under the deletion (lower is better) and insertion (higher is better) curves of the explained class's probability as the hottest pixels are removed or revealed, and the deletion gain: coldest-first minus hottest-first deletion area (about 0: the maps are noise to the model). Overlays and ROC curves are in report.html.\n\n| model | heat in foreground | deletion AUC | insertion AUC | deletion gain |\n|---|---|---|---|---|\n");
            let value = |v: Option<f64>, pct: bool| v.map_or("n/a".into(), |v| if pct { format!("{:.1} %", 100.0 * v) } else { format!("{v:.3}") });
            for c in &self.candidates {
                let h = &c.heat;
                md.push_str(&format!(
                    "| {} | {} | {} | {} | {} |\n",
                    c.id,
                    value(h.foreground_fraction, true),
                    value(h.deletion_auc, false),
                    value(h.insertion_auc, false),
                    value(h.deletion_gain, false)
                ));
            }
        }
        md
    }

    /// The results table alone.
    pub fn table(&self) -> String {
        let mut md = String::from("| model | accuracy | balanced acc. | macro-F1 | macro AUROC |\n|---|---|---|---|---|\n");
        for c in &self.candidates {
            let m = &c.metrics;
            let auc = m.macro_auroc.map_or("n/a".into(), |a| format!("{:.3}", a));
            md.push_str(&format!("| {} | {:.1} % | {:.1} % | {:.3} | {auc} |\n", c.description, 100.0 * m.accuracy, 100.0 * m.balanced_accuracy, m.macro_f1));
        }
        md
    }
}
