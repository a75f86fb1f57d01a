//! What a run is. A MergeJob's run is keyed by the spec fields that change its results, not by
//! `metadata.generation`: an edit that changes no result continues the current run with every
//! Job and artifact it has, and only an edit that changes results starts a new one.
//!
//! | Starts a new run (changes results)                  | Applies to the current run          |
//! |-----------------------------------------------------|-------------------------------------|
//! | `model`, `training`, `merge`, `restore`, `evaluation` | `suspend`, `cluster.suspend`        |
//! | `shards[].name`, `.data`, `.vector` (shards added or removed) | `shards[].secretRef`, `.storageSecret`, `.nodeSelector`, `.tolerations`, `.podOverrides` |
//! | `storage.local`, `storage.s3` (bucket, endpoint, region, path style), `storage.prefix` | `storage.s3.credentialsSecret`, `storage.cleanup` |
//! | `cluster.image` (another trainer may compute other results) | every other `cluster` field: resources, GPUs, tolerations, overrides, deadlines, `minShards`, `backoffLimit`, TTL |
//!
//! Deadlines and `minShards` apply to the current run from the next reconcile on: a shard
//! already dropped stays dropped.

use sha2::{Digest, Sha256};

use crate::{ClusterSpec, MergeJobSpec, MergeJobStatus};

/// Fingerprint of the fields of `spec` that change a run's results (see the module's table):
/// equal keys, same run.
pub fn run_key(spec: &MergeJobSpec) -> String {
    let mut defining = spec.clone();
    defining.suspend = false;
    defining.cluster = ClusterSpec { image: spec.cluster.image.clone(), ..ClusterSpec::default() };
    defining.storage.cleanup = Default::default();
    if let Some(s3) = defining.storage.s3.as_mut() {
        s3.credentials_secret = None;
    }
    for shard in &mut defining.shards {
        shard.secret_ref = None;
        shard.storage_secret = None;
        shard.node_selector.clear();
        shard.tolerations.clear();
        shard.pod_overrides = Default::default();
    }
    // serde_json writes struct fields in declaration order and maps sorted: a stable encoding.
    let encoded = serde_json::to_vec(&defining).expect("a MergeJob spec always serialises");
    hex::encode(&Sha256::digest(&encoded)[..8])
}

/// Which run a reconcile of generation `generation` belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunDecision {
    /// The generation that started the run; it names the run's Jobs and artifact keys.
    pub run: i64,
    /// [`run_key`] of the spec.
    pub key: String,
    /// Whether the run recorded in the status goes on (false: a new run starts at `generation`).
    pub continues: bool,
}

impl RunDecision {
    /// The run of `generation` with `spec`, given the status written so far.
    pub fn of(generation: i64, spec: &MergeJobSpec, previous: &MergeJobStatus) -> Self {
        let key = run_key(spec);
        let continued = match (&previous.run_key, previous.run) {
            (Some(previous_key), Some(run)) => (previous_key == &key).then_some(run),
            // A status written before runs had keys: the same generation is the same run.
            _ => previous.observed_generation.filter(|g| *g == generation),
        };
        match continued {
            Some(run) => RunDecision { run, key, continues: true },
            None => RunDecision { run: generation, key, continues: false },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: &str) -> MergeJobSpec {
        let yaml = format!(
            "model: {{architecture: resnet18, weights: random, classes: [x, y]}}\nshards:\n  - {{name: a, data: {{path: s3://d/a/}}}}\n  - {{name: b, data: {{path: s3://d/b/}}}}\nevaluation: {{data: {{path: s3://d/t/}}}}\nstorage: {{s3: {{bucket: runs}}}}\n{extra}"
        );
        serde_yaml::from_str(&yaml).unwrap()
    }

    fn with_shard_a(extra: &str) -> MergeJobSpec {
        let mut s = spec("");
        s.shards[0] = serde_yaml::from_str(&format!("{{name: a, data: {{path: s3://d/a/}}, {extra}}}")).unwrap();
        s
    }

    #[test]
    fn edits_that_change_no_result_keep_the_run_key() {
        let base = run_key(&spec(""));
        for placement in [
            "suspend: true",
            "cluster: {suspend: true}",
            "cluster: {stragglerDeadlineSeconds: 600, minShards: 1, backoffLimit: 5, gpus: 1, ttlSecondsAfterFinished: 60}",
            "cluster: {tolerations: [{key: gpu, operator: Exists}], resources: {cpu: '4', memory: 8Gi}}",
        ] {
            assert_eq!(run_key(&spec(placement)), base, "{placement}");
        }
        assert_eq!(run_key(&with_shard_a("secretRef: hospital-a, storageSecret: hospital-a-bucket, nodeSelector: {site: a}")), base);
        let mut cleanup = spec("");
        cleanup.storage.cleanup = crate::CleanupPolicy::Delete;
        cleanup.storage.s3.as_mut().unwrap().credentials_secret = Some("s3".into());
        assert_eq!(run_key(&cleanup), base);
        assert_eq!(run_key(&spec("restore: {epochs: 1}")), base, "a spec from before restore.epochs keeps its run");
    }

    #[test]
    fn edits_that_change_results_change_the_run_key() {
        let base = run_key(&spec(""));
        for result in ["merge: {lambda: 0.5}", "training: {epochs: 7}", "restore: {mode: bnRecalibrate}", "restore: {epochs: 2}", "cluster: {image: 'registry.local/trainer:0.2.0'}"] {
            assert_ne!(run_key(&spec(result)), base, "{result}");
        }
        let mut bucket = spec("");
        bucket.storage.s3.as_mut().unwrap().bucket = "other".into();
        let mut prefix = spec("");
        prefix.storage.prefix = "elsewhere".into();
        assert!(run_key(&bucket) != base && run_key(&prefix) != base);
        assert_ne!(run_key(&with_shard_a("vector: s3://in/a.safetensors")), base);
        let mut fewer = spec("");
        fewer.shards.pop();
        assert_ne!(run_key(&fewer), base);
    }

    #[test]
    fn a_run_continues_while_its_key_holds_and_a_new_one_starts_at_the_edit() {
        let s = spec("");
        let first = RunDecision::of(1, &s, &MergeJobStatus::default());
        assert_eq!((first.run, first.continues), (1, false));
        let recorded = MergeJobStatus { observed_generation: Some(1), run: Some(1), run_key: Some(first.key.clone()), ..Default::default() };
        let suspended = RunDecision::of(2, &spec("suspend: true"), &recorded);
        assert_eq!((suspended.run, suspended.continues), (1, true));
        let edited = RunDecision::of(3, &spec("merge: {lambda: 0.5}"), &recorded);
        assert_eq!((edited.run, edited.continues), (3, false));
    }

    #[test]
    fn a_status_from_before_run_keys_continues_only_its_own_generation() {
        let legacy = MergeJobStatus { observed_generation: Some(4), ..Default::default() };
        assert_eq!(RunDecision::of(4, &spec(""), &legacy).run, 4);
        assert!(RunDecision::of(4, &spec(""), &legacy).continues);
        assert!(!RunDecision::of(5, &spec(""), &legacy).continues);
    }
}
