//! `decide`: given a MergeJob's spec and the state of the Jobs it owns, which stage Jobs to
//! create next and what the MergeJob's phase is. Pure: no I/O, exhaustively table-tested.
//!
//! A stage is done when its Job succeeded. A shard whose training Job failed (after the Job's
//! own retries) is dropped if the `minShards` quorum still holds; the plan is rebuilt without
//! it, so the merge waits only for shards that can still deliver.

use std::collections::{BTreeMap, BTreeSet};

use medmerge_crds::{validate, ArtifactLayout, MergeJobSpec, Stage, StagePlan};

/// What the cluster says about one stage's Job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    /// Created and not finished.
    Active,
    /// Completed successfully.
    Succeeded,
    /// Failed after its retries.
    Failed,
}

/// The MergeJob's phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    /// `cluster.suspend` is set.
    Suspended,
}

impl Phase {
    /// Whether the phase is final for its generation.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }
}

/// What to do now.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Stage Jobs to create, in plan order.
    pub create: Vec<Stage>,
    /// The phase to record.
    pub phase: Phase,
    /// Short machine-readable reason (becomes a condition reason).
    pub reason: &'static str,
    /// What a person should know.
    pub message: String,
    /// Shards whose vector is available, and shards in total.
    pub shards_ready: (usize, usize),
    /// Shards dropped because their Jobs failed.
    pub failed_shards: Vec<String>,
}

fn shard_of(stage: &Stage) -> Option<&str> {
    match stage {
        Stage::Finetune { shard } | Stage::Collect { shard } => Some(shard),
        _ => None,
    }
}

/// Decides the next step of generation `generation` of a MergeJob named `name`.
pub fn decide(name: &str, namespace: &str, generation: i64, spec: &MergeJobSpec, jobs: &BTreeMap<String, JobState>) -> Decision {
    let total = spec.shards.len();
    let decision = |create, phase, reason, message: String, ready, failed| Decision { create, phase, reason, message, shards_ready: (ready, total), failed_shards: failed };
    if let Err(errors) = validate(spec) {
        let message = errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
        return decision(vec![], Phase::Failed, "InvalidSpec", message, 0, vec![]);
    }
    let state = |stage: &Stage| jobs.get(&stage.name()).copied();
    let failed_shards: Vec<String> = spec
        .shards
        .iter()
        .filter(|s| {
            let stage = if s.vector.is_some() { Stage::Collect { shard: s.name.clone() } } else { Stage::Finetune { shard: s.name.clone() } };
            state(&stage) == Some(JobState::Failed)
        })
        .map(|s| s.name.clone())
        .collect();
    let required = spec.cluster.min_shards.map_or(total, |m| m as usize);
    let healthy = total - failed_shards.len();
    if healthy < required {
        let message = format!("shards {} failed; {healthy} of {total} remain, {required} required (cluster.minShards)", failed_shards.join(", "));
        return decision(vec![], Phase::Failed, "QuorumLost", message, 0, failed_shards);
    }
    let mut effective = spec.clone();
    effective.shards.retain(|s| !failed_shards.contains(&s.name));
    let plan = StagePlan::new(&effective, &ArtifactLayout::new(&spec.storage.prefix, namespace, name, generation));
    let done: BTreeSet<String> =
        plan.stages.iter().filter(|p| state(&p.stage) == Some(JobState::Succeeded)).flat_map(|p| p.writes.iter().cloned()).collect();
    let ready_shards = plan.stages.iter().filter(|p| shard_of(&p.stage).is_some() && state(&p.stage) == Some(JobState::Succeeded)).count();
    if let Some(p) = plan.stages.iter().find(|p| shard_of(&p.stage).is_none() && state(&p.stage) == Some(JobState::Failed)) {
        let message = format!("stage {} failed after {} retries; see its Job's logs", p.stage.name(), spec.cluster.backoff_limit);
        return decision(vec![], Phase::Failed, "StageFailed", message, ready_shards, failed_shards);
    }
    if plan.is_complete(&done) {
        return decision(vec![], Phase::Succeeded, "Succeeded", "every stage finished".into(), ready_shards, failed_shards);
    }
    let active: Vec<&Stage> = plan.stages.iter().map(|p| &p.stage).filter(|s| state(s) == Some(JobState::Active)).collect();
    let create: Vec<Stage> = plan.ready(&done).into_iter().map(|p| p.stage.clone()).filter(|s| state(s).is_none()).collect();
    if spec.cluster.suspend {
        let message = format!("suspended with {} stage Jobs still running", active.len());
        return decision(vec![], Phase::Suspended, "Suspended", message, ready_shards, failed_shards);
    }
    let phase = active.iter().copied().chain(&create).map(phase_of).min_by_key(|p| *p as u8).unwrap_or(Phase::Pending);
    let message = if create.is_empty() { format!("{} stage Jobs running", active.len()) } else { format!("starting {}", create.iter().map(Stage::name).collect::<Vec<_>>().join(", ")) };
    decision(create, phase, "Progressing", message, ready_shards, failed_shards)
}

fn phase_of(stage: &Stage) -> Phase {
    match stage {
        Stage::Init | Stage::Finetune { .. } | Stage::Collect { .. } | Stage::FullTraining => Phase::Training,
        Stage::Merge { .. } => Phase::Merging,
        Stage::Restore { .. } | Stage::RestoreCombine { .. } => Phase::Restoring,
        Stage::Evaluate => Phase::Evaluating,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use medmerge_crds::MergeJobSpec;

    fn spec(extra: &str) -> MergeJobSpec {
        let yaml = format!(
            "model: {{architecture: resnet18, weights: random}}\nshards:\n  - {{name: a, data: {{path: a}}}}\n  - {{name: b, data: {{path: b}}}}\n  - {{name: c, data: {{path: c}}}}\nevaluation: {{data: {{path: t}}}}\nmerge: {{baselines: []}}\n{extra}"
        );
        serde_yaml::from_str(&yaml).unwrap()
    }

    fn jobs(states: &[(&str, JobState)]) -> BTreeMap<String, JobState> {
        states.iter().map(|(n, s)| (n.to_string(), *s)).collect()
    }

    fn names(d: &Decision) -> Vec<String> {
        d.create.iter().map(Stage::name).collect()
    }

    use JobState::*;

    #[test]
    fn a_new_mergejob_starts_with_init() {
        let d = decide("mj", "ns", 1, &spec(""), &jobs(&[]));
        assert_eq!((names(&d), d.phase), (vec!["init".to_string()], Phase::Training));
    }

    #[test]
    fn after_init_every_shard_trains_at_once_and_running_jobs_are_not_recreated() {
        let d = decide("mj", "ns", 1, &spec(""), &jobs(&[("init", Succeeded), ("finetune-a", Active)]));
        assert_eq!(names(&d), vec!["finetune-b", "finetune-c"]);
        assert_eq!(d.phase, Phase::Training);
        assert_eq!(d.shards_ready, (0, 3));
    }

    #[test]
    fn merging_starts_when_every_vector_is_there() {
        let j = jobs(&[("init", Succeeded), ("finetune-a", Succeeded), ("finetune-b", Succeeded), ("finetune-c", Succeeded)]);
        let d = decide("mj", "ns", 1, &spec(""), &j);
        assert_eq!((names(&d), d.phase, d.shards_ready), (vec!["merge-data-vector".to_string()], Phase::Merging, (3, 3)));
    }

    #[test]
    fn a_failed_shard_is_dropped_when_the_quorum_holds() {
        let j = jobs(&[("init", Succeeded), ("finetune-a", Succeeded), ("finetune-b", Failed), ("finetune-c", Succeeded)]);
        let d = decide("mj", "ns", 1, &spec("cluster: {minShards: 2}"), &j);
        assert_eq!(names(&d), vec!["merge-data-vector"]);
        assert_eq!(d.failed_shards, vec!["b"]);
        assert_eq!(d.shards_ready, (2, 3));
    }

    #[test]
    fn a_failed_shard_fails_the_run_without_a_quorum() {
        let j = jobs(&[("init", Succeeded), ("finetune-a", Succeeded), ("finetune-b", Failed), ("finetune-c", Active)]);
        let d = decide("mj", "ns", 1, &spec(""), &j);
        assert_eq!((d.phase, d.reason), (Phase::Failed, "QuorumLost"));
        assert!(d.create.is_empty() && d.message.contains("shards b failed"));
    }

    #[test]
    fn restoration_follows_the_merge_then_evaluation() {
        let mut j = jobs(&[("init", Succeeded), ("finetune-a", Succeeded), ("finetune-b", Succeeded), ("finetune-c", Succeeded), ("merge-data-vector", Succeeded)]);
        let d = decide("mj", "ns", 1, &spec(""), &j);
        assert_eq!(names(&d), vec!["restore-data-vector-a", "restore-data-vector-b", "restore-data-vector-c"]);
        assert_eq!(d.phase, Phase::Restoring);
        for s in ["restore-data-vector-a", "restore-data-vector-b", "restore-data-vector-c", "restore-data-vector"] {
            j.insert(s.into(), Succeeded);
        }
        let d = decide("mj", "ns", 1, &spec(""), &j);
        assert_eq!((names(&d), d.phase), (vec!["evaluate".to_string()], Phase::Evaluating));
        j.insert("evaluate".into(), Succeeded);
        let d = decide("mj", "ns", 1, &spec(""), &j);
        assert_eq!((d.phase, d.create.len()), (Phase::Succeeded, 0));
    }

    #[test]
    fn a_failed_merge_fails_the_run_naming_the_stage() {
        let j = jobs(&[("init", Succeeded), ("finetune-a", Succeeded), ("finetune-b", Succeeded), ("finetune-c", Succeeded), ("merge-data-vector", Failed)]);
        let d = decide("mj", "ns", 1, &spec(""), &j);
        assert_eq!((d.phase, d.reason), (Phase::Failed, "StageFailed"));
        assert!(d.message.contains("merge-data-vector"));
    }

    #[test]
    fn a_suspended_mergejob_starts_nothing() {
        let d = decide("mj", "ns", 1, &spec("cluster: {suspend: true}"), &jobs(&[("init", Succeeded)]));
        assert_eq!((d.phase, d.create.len()), (Phase::Suspended, 0));
    }

    #[test]
    fn an_invalid_spec_is_failed_with_the_field_named_and_nothing_created() {
        let d = decide("mj", "ns", 1, &spec("cluster: {minShards: 9}"), &jobs(&[]));
        assert_eq!((d.phase, d.reason), (Phase::Failed, "InvalidSpec"));
        assert!(d.message.contains("spec.cluster.minShards") && d.create.is_empty());
    }
}
