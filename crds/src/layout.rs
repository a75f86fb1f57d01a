//! Where every artifact of one run lives: `<prefix>/<namespace>/<name>/g<generation>/...`.
//!
//! Keys are `/`-separated and relative to the store's root; the local directory store and the S3
//! store both use them unchanged. Everything a shard's own stages write (its training and its
//! restoration parts, with their provenance records and leases) lies under
//! `<run>/shards/<shard>/`, so a hospital's bucket identity can be limited to that prefix.

use crate::plan::Stage;
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

    /// Where everything shard `shard`'s own stages write lies.
    pub fn shard_root(&self, shard: &str) -> String {
        self.key(&format!("shards/{shard}"))
    }

    /// Where `stage` keeps its bookkeeping: its shard's prefix for a shard's own stage, the
    /// run's root for the others.
    fn bookkeeping_root(&self, stage: &Stage) -> String {
        match stage.owning_shard() {
            Some(shard) => self.shard_root(shard),
            None => self.root.clone(),
        }
    }

    /// The record of what `stage` read and wrote (SHA-256 of each).
    pub fn provenance(&self, stage: &Stage) -> String {
        format!("{}/provenance/{}.json", self.bookkeeping_root(stage), stage.name())
    }

    /// Whether `key` is a provenance record of this run.
    pub fn is_provenance(&self, key: &str) -> bool {
        key.starts_with(&format!("{}/", self.root)) && key.ends_with(".json") && key.rsplit('/').nth(1) == Some("provenance")
    }

    /// The lease a runner holds while it runs `stage`.
    pub fn lease(&self, stage: &Stage) -> String {
        format!("{}/leases/{}", self.bookkeeping_root(stage), stage.name())
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
            RestoreRound::Epoch(_) | RestoreRound::Chain(_) => "model",
            RestoreRound::BnMoments => "bn-stats",
            RestoreRound::HeadStatistics => "head-stats",
        };
        format!("{}/restore/{candidate}/{}/{file}.safetensors", self.shard_root(shard), round.name())
    }

    /// The model after `candidate`'s restoration round `round` (the last round writes
    /// [`ArtifactLayout::restored`] instead).
    pub fn restore_round(&self, candidate: &str, round: RestoreRound) -> String {
        self.key(&format!("restore/{candidate}/{}/model.safetensors", round.name()))
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
    fn everything_a_shards_own_stages_write_lies_under_its_prefix() {
        let l = ArtifactLayout::new("runs", "ns", "mj", 1);
        let own = format!("{}/", l.shard_root("a"));
        let finetune = Stage::Finetune { shard: "a".into() };
        let part = Stage::Restore { candidate: "data-vector".into(), round: RestoreRound::BnMoments, shard: "a".into() };
        for key in
            [l.shard_vector("a"), l.shard_metrics("a"), l.restore_part("data-vector", RestoreRound::Epoch(1), "a"), l.provenance(&finetune), l.lease(&finetune), l.provenance(&part), l.lease(&part)]
        {
            assert!(key.starts_with(&own), "{key} is outside {own}");
        }
        let merge = Stage::Merge { candidate: "data-vector".into() };
        assert_eq!(l.provenance(&merge), "runs/ns/mj/g1/provenance/merge-data-vector.json");
        assert!(!l.provenance(&Stage::Collect { shard: "a".into() }).starts_with(&own), "collecting is the coordinator's");
        assert!(l.is_provenance(&l.provenance(&part)) && l.is_provenance(&l.provenance(&merge)));
        assert!(!l.is_provenance(&l.shard_metrics("a")));
    }

    #[test]
    fn an_empty_prefix_adds_no_leading_slash() {
        assert_eq!(ArtifactLayout::new("", "ns", "mj", 1).root(), "ns/mj/g1");
    }
}
