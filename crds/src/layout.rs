//! Where every artifact of one run lives: `<prefix>/<namespace>/<name>/g<generation>/...`.
//!
//! Keys are `/`-separated and relative to the store's root; the local directory store and the S3
//! store both use them unchanged.

use crate::spec::RestoreRound;

/// The artifact keys of one run (one MergeJob generation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArtifactLayout {
    root: String,
}

/// The key under which every generation of MergeJob `namespace/name` lives.
pub fn mergejob_root(prefix: &str, namespace: &str, name: &str) -> String {
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        format!("{namespace}/{name}")
    } else {
        format!("{prefix}/{namespace}/{name}")
    }
}

impl ArtifactLayout {
    /// Layout of generation `generation` of MergeJob `namespace/name` under `prefix`.
    pub fn new(prefix: &str, namespace: &str, name: &str, generation: i64) -> Self {
        ArtifactLayout { root: format!("{}/g{generation}", mergejob_root(prefix, namespace, name)) }
    }

    /// The run's root key.
    pub fn root(&self) -> &str {
        &self.root
    }

    fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.root)
    }

    /// The pretrained weights every shard starts from (`theta_pre`).
    pub fn base(&self) -> String {
        self.key("base/model.safetensors")
    }

    /// Shard `shard`'s data vector and head.
    pub fn shard_vector(&self, shard: &str) -> String {
        self.key(&format!("shards/{shard}/vector.safetensors"))
    }

    /// Shard `shard`'s training metrics (JSON).
    pub fn shard_metrics(&self, shard: &str) -> String {
        self.key(&format!("shards/{shard}/metrics.json"))
    }

    /// The full-training baseline model.
    pub fn full_training(&self) -> String {
        self.key("baselines/full-training/model.safetensors")
    }

    /// A merged model before restoration.
    pub fn merged(&self, candidate: &str) -> String {
        self.key(&format!("merged/{candidate}/model.safetensors"))
    }

    /// What shard `shard` produced in `candidate`'s restoration round `round`: a model (epoch,
    /// chain), batch-norm moments (bn) or per-class feature statistics (head).
    pub fn restore_part(&self, candidate: &str, round: RestoreRound, shard: &str) -> String {
        let file = match round {
            RestoreRound::Epoch | RestoreRound::Chain => "model",
            RestoreRound::BnMoments => "bn-stats",
            RestoreRound::HeadStatistics => "head-stats",
        };
        self.key(&format!("restore/{candidate}/{}/{shard}/{file}.safetensors", round.as_str()))
    }

    /// The model after `candidate`'s restoration round `round` (the last round writes
    /// [`ArtifactLayout::restored`] instead).
    pub fn restore_round(&self, candidate: &str, round: RestoreRound) -> String {
        self.key(&format!("restore/{candidate}/{}/model.safetensors", round.as_str()))
    }

    /// A merged model after restoration: what is evaluated and shipped.
    pub fn restored(&self, candidate: &str) -> String {
        self.key(&format!("restored/{candidate}/model.safetensors"))
    }

    /// Evaluation results (JSON).
    pub fn eval_metrics(&self) -> String {
        self.key("eval/metrics.json")
    }

    /// Evaluation report (Markdown).
    pub fn eval_report(&self) -> String {
        self.key("eval/report.md")
    }

    /// Self-contained HTML report (figures, ROC curves, Grad-CAM gallery, settings).
    pub fn eval_html(&self) -> String {
        self.key("eval/report.html")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_nest_under_prefix_namespace_name_and_generation() {
        let l = ArtifactLayout::new("/runs/", "default", "retina", 3);
        assert_eq!(l.base(), "runs/default/retina/g3/base/model.safetensors");
        assert_eq!(l.shard_vector("a"), "runs/default/retina/g3/shards/a/vector.safetensors");
        assert_eq!(l.restored("data-vector"), "runs/default/retina/g3/restored/data-vector/model.safetensors");
    }

    #[test]
    fn an_empty_prefix_adds_no_leading_slash() {
        assert_eq!(ArtifactLayout::new("", "ns", "mj", 1).root(), "ns/mj/g1");
    }
}
