//! `decide`: given a MergeJob's spec, the state of the Jobs it owns and how long the run has
//! been going, which stage Jobs to create next and what the MergeJob's phase is. Pure: no I/O,
//! exhaustively table-tested.
//!
//! A stage is done when its Job succeeded. A shard whose training Job failed (after the Job's
//! own retries), or that has not delivered its vector by the straggler deadline, is dropped if
//! the `minShards` quorum still holds; the plan is rebuilt without it, so the merge waits only
//! for shards that can still deliver.

use std::collections::{BTreeMap, BTreeSet};

use medmerge_crds::{validate_for_cluster, ArtifactLayout, MergeJobSpec, Stage, StagePlan};

/// What the cluster says about one stage's Job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    /// Created suspended and not yet admitted by a queue (Kueue): nothing runs and the straggler
    /// clock has not started.
    Queued,
    /// Created and not finished.
    Active,
    /// Completed successfully.
    Succeeded,
    /// Failed after its retries.
    Failed,
    /// Deleted by the operator because its shard missed the straggler deadline (remembered
    /// from the status once the Job is gone).
    Stopped,
}

/// Everything `decide` needs to know about the cluster, gathered by `observe`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    /// Stage name -> state of its Job, for the generation being decided.
    pub jobs: BTreeMap<String, JobState>,
    /// Stage name -> seconds its Job has been admitted and running (from the Job's `startTime`),
    /// for unfinished Jobs: the straggler deadline's clock, which waiting in a queue does not
    /// advance, kept per shard so that shards admitted one after another each get the deadline.
    pub active_for: BTreeMap<String, i64>,
}

pub use medmerge_crds::status::{Phase, ShardState};

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
    /// Every shard's state, in spec order.
    pub shards: Vec<(String, ShardState)>,
    /// Seconds until the decision may change without any Job changing (the straggler deadline).
    pub recheck_in: Option<i64>,
}

impl Decision {
    /// Shards whose vector is available, and shards in total.
    pub fn shards_ready(&self) -> (usize, usize) {
        (self.shards.iter().filter(|(_, s)| *s == ShardState::Ready).count(), self.shards.len())
    }

    /// Names of the shards left out of the merge.
    pub fn excluded_shards(&self) -> Vec<&str> {
        self.shards.iter().filter(|(_, s)| s.is_excluded()).map(|(n, _)| n.as_str()).collect()
    }
}

/// The stage that delivers a shard's vector: training here, or collecting the hospital's upload.
pub fn vector_stage(shard: &medmerge_crds::ShardSpec) -> Stage {
    if shard.vector.is_some() {
        Stage::Collect { shard: shard.name.clone() }
    } else {
        Stage::Finetune { shard: shard.name.clone() }
    }
}

fn shard_state(shard: &medmerge_crds::ShardSpec, job: Option<JobState>, past_deadline: bool) -> ShardState {
    match job {
        Some(JobState::Succeeded) => ShardState::Ready,
        Some(JobState::Failed) => ShardState::Failed,
        Some(JobState::Stopped) => ShardState::Dropped,
        _ if past_deadline => ShardState::Dropped,
        None => ShardState::Pending,
        Some(JobState::Queued) => ShardState::Queued,
        Some(JobState::Active) if shard.vector.is_some() => ShardState::Waiting,
        Some(JobState::Active) => ShardState::Training,
    }
}

/// Decides the next step of generation `generation` of a MergeJob named `name`.
pub fn decide(name: &str, namespace: &str, generation: i64, spec: &MergeJobSpec, observed: &Observed) -> Decision {
    let state = |stage: &Stage| observed.jobs.get(&stage.name()).copied();
    let deadline = spec.cluster.straggler_deadline_seconds;
    let clock = |shard: &medmerge_crds::ShardSpec| observed.active_for.get(&vector_stage(shard).name()).copied();
    let past_deadline = |shard: &medmerge_crds::ShardSpec| deadline.zip(clock(shard)).is_some_and(|(d, t)| t >= d);
    let shards: Vec<(String, ShardState)> = spec.shards.iter().map(|s| (s.name.clone(), shard_state(s, state(&vector_stage(s)), past_deadline(s)))).collect();
    let decision = |create, phase, reason, message: String| Decision { create, phase, reason, message, shards: shards.clone(), recheck_in: None };
    if let Err(errors) = validate_for_cluster(spec) {
        let message = errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
        return decision(vec![], Phase::Failed, "InvalidSpec", message);
    }
    let excluded: Vec<&str> = shards.iter().filter(|(_, s)| s.is_excluded()).map(|(n, _)| n.as_str()).collect();
    let total = spec.shards.len();
    let required = spec.cluster.min_shards.map_or(total, |m| m as usize);
    let healthy = total - excluded.len();
    if healthy < required {
        let why = if shards.iter().any(|(_, s)| *s == ShardState::Dropped) { " or missed the straggler deadline" } else { "" };
        let message = format!("shards {} failed{why}; {healthy} of {total} remain, {required} required (cluster.minShards)", excluded.join(", "));
        return decision(vec![], Phase::Failed, "QuorumLost", message);
    }
    let mut effective = spec.clone();
    effective.shards.retain(|s| !excluded.contains(&s.name.as_str()));
    let plan = StagePlan::new(&effective, &ArtifactLayout::new(&spec.storage.prefix, namespace, name, generation));
    let done: BTreeSet<String> = plan.stages.iter().filter(|p| state(&p.stage) == Some(JobState::Succeeded)).flat_map(|p| p.writes.iter().cloned()).collect();
    if let Some(p) = plan.stages.iter().find(|p| shard_of(&p.stage).is_none() && state(&p.stage) == Some(JobState::Failed)) {
        let message = format!("stage {} failed after {} retries; see its Job's logs", p.stage.name(), spec.cluster.backoff_limit);
        return decision(vec![], Phase::Failed, "StageFailed", message);
    }
    if plan.is_complete(&done) {
        return decision(vec![], Phase::Succeeded, "Succeeded", "every stage finished".into());
    }
    let active: Vec<&Stage> = plan.stages.iter().map(|p| &p.stage).filter(|s| matches!(state(s), Some(JobState::Active | JobState::Queued))).collect();
    let queued = active.iter().filter(|s| state(s) == Some(JobState::Queued)).count();
    let create: Vec<Stage> = plan.ready(&done).into_iter().map(|p| p.stage.clone()).filter(|s| state(s).is_none()).collect();
    if spec.is_suspended() {
        let message = format!("suspended: {} unfinished stage Jobs paused, nothing new starts; clear spec.suspend to carry the run on", active.len());
        return decision(vec![], Phase::Suspended, "Suspended", message);
    }
    let phase = active.iter().copied().chain(&create).map(phase_of).min().unwrap_or(Phase::Pending);
    let message = match (create.is_empty(), queued) {
        (false, _) => format!("starting {}", create.iter().map(Stage::name).collect::<Vec<_>>().join(", ")),
        (true, 0) => format!("{} stage Jobs running", active.len()),
        (true, q) => format!("{} stage Jobs running, {q} waiting for admission by their queue", active.len() - q),
    };
    let unfinished = spec.shards.iter().filter(|s| state(&vector_stage(s)) == Some(JobState::Active));
    let recheck_in = deadline.and_then(|d| unfinished.filter_map(clock).map(|t| d - t).filter(|left| *left > 0).min());
    Decision { recheck_in, ..decision(create, phase, "Progressing", message) }
}

fn shard_of(stage: &Stage) -> Option<&str> {
    match stage {
        Stage::Finetune { shard } | Stage::Collect { shard } => Some(shard),
        _ => None,
    }
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
            "model: {{architecture: resnet18, weights: random, classes: [x, y]}}\nshards:\n  - {{name: a, data: {{path: s3://d/a/}}}}\n  - {{name: b, data: {{path: s3://d/b/}}}}\n  - {{name: c, data: {{path: s3://d/c/}}}}\nevaluation: {{data: {{path: s3://d/t/}}}}\nmerge: {{baselines: []}}\nstorage: {{s3: {{bucket: runs}}}}\n{extra}"
        );
        serde_yaml::from_str(&yaml).unwrap()
    }

    fn jobs(states: &[(&str, JobState)]) -> Observed {
        let active_for = states.iter().filter(|(_, s)| *s == Active).map(|(n, _)| (n.to_string(), 60)).collect();
        Observed { jobs: states.iter().map(|(n, s)| (n.to_string(), *s)).collect(), active_for }
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
        assert_eq!(d.shards_ready(), (0, 3));
    }

    #[test]
    fn merging_starts_when_every_vector_is_there() {
        let j = jobs(&[("init", Succeeded), ("finetune-a", Succeeded), ("finetune-b", Succeeded), ("finetune-c", Succeeded)]);
        let d = decide("mj", "ns", 1, &spec(""), &j);
        assert_eq!((names(&d), d.phase, d.shards_ready()), (vec!["merge-data-vector".to_string()], Phase::Merging, (3, 3)));
    }

    #[test]
    fn a_failed_shard_is_dropped_when_the_quorum_holds() {
        let j = jobs(&[("init", Succeeded), ("finetune-a", Succeeded), ("finetune-b", Failed), ("finetune-c", Succeeded)]);
        let d = decide("mj", "ns", 1, &spec("cluster: {minShards: 2}"), &j);
        assert_eq!(names(&d), vec!["merge-data-vector"]);
        assert_eq!(d.excluded_shards(), vec!["b"]);
        assert_eq!(d.shards_ready(), (2, 3));
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
        // The default restoration: an epoch, batch-norm and head round, every shard at once in each.
        for round in ["epoch", "bn", "head"] {
            let d = decide("mj", "ns", 1, &spec(""), &j);
            let parts: Vec<String> = ["a", "b", "c"].iter().map(|s| format!("restore-data-vector-{round}-{s}")).collect();
            assert_eq!((names(&d), d.phase), (parts.clone(), Phase::Restoring));
            for p in parts {
                j.jobs.insert(p, Succeeded);
            }
            let d = decide("mj", "ns", 1, &spec(""), &j);
            assert_eq!(names(&d), vec![format!("restore-data-vector-{round}")]);
            j.jobs.insert(format!("restore-data-vector-{round}"), Succeeded);
        }
        let d = decide("mj", "ns", 1, &spec(""), &j);
        assert_eq!((names(&d), d.phase), (vec!["evaluate".to_string()], Phase::Evaluating));
        j.jobs.insert("evaluate".into(), Succeeded);
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

    /// Every running Job admitted `seconds` ago.
    fn at(mut o: Observed, seconds: i64) -> Observed {
        o.active_for.values_mut().for_each(|t| *t = seconds);
        o
    }

    #[test]
    fn a_straggler_is_dropped_at_the_deadline_when_the_quorum_holds() {
        let j = jobs(&[("init", Succeeded), ("finetune-a", Succeeded), ("finetune-b", Active), ("finetune-c", Succeeded)]);
        let s = spec("cluster: {minShards: 2, stragglerDeadlineSeconds: 3600}");
        let before = decide("mj", "ns", 1, &s, &at(j.clone(), 3000));
        assert_eq!((names(&before), before.phase, before.recheck_in), (vec![], Phase::Training, Some(600)));
        let after = decide("mj", "ns", 1, &s, &at(j, 3600));
        assert_eq!(names(&after), vec!["merge-data-vector"]);
        assert_eq!(after.shards[1], ("b".to_string(), ShardState::Dropped));
        assert_eq!(after.recheck_in, None);
    }

    #[test]
    fn stragglers_past_the_deadline_without_a_quorum_fail_the_run() {
        let j = jobs(&[("init", Succeeded), ("finetune-a", Succeeded), ("finetune-b", Active), ("finetune-c", Active)]);
        let d = decide("mj", "ns", 1, &spec("cluster: {minShards: 2, stragglerDeadlineSeconds: 60}"), &at(j, 61));
        assert_eq!((d.phase, d.reason), (Phase::Failed, "QuorumLost"));
        assert!(d.message.contains("b, c") && d.message.contains("straggler deadline"), "{}", d.message);
    }

    #[test]
    fn without_a_deadline_the_run_waits_for_every_shard() {
        let j = jobs(&[("init", Succeeded), ("finetune-a", Succeeded), ("finetune-b", Active), ("finetune-c", Succeeded)]);
        let d = decide("mj", "ns", 1, &spec("cluster: {minShards: 2}"), &at(j, 1_000_000));
        assert_eq!((names(&d).len(), d.phase, d.recheck_in), (0, Phase::Training, None));
    }

    #[test]
    fn a_shard_waiting_in_a_queue_is_never_dropped_and_each_shard_has_its_own_clock() {
        let mut j = jobs(&[("init", Succeeded), ("finetune-a", Active), ("finetune-b", Queued), ("finetune-c", Active)]);
        j.active_for.insert("finetune-a".into(), 100);
        j.active_for.insert("finetune-c".into(), 10);
        let d = decide("mj", "ns", 1, &spec("cluster: {minShards: 2, stragglerDeadlineSeconds: 60}"), &j);
        let states: Vec<ShardState> = d.shards.iter().map(|(_, s)| *s).collect();
        assert_eq!(states, [ShardState::Dropped, ShardState::Queued, ShardState::Training]);
        assert_eq!((d.phase, d.recheck_in), (Phase::Training, Some(50)), "c's own clock says when to look again");
        assert!(d.message.contains("1 waiting for admission"), "{}", d.message);
    }

    #[test]
    fn an_external_shard_waits_for_its_vector_while_others_train() {
        let yaml = "model: {architecture: resnet18, weights: random, classes: [x, y]}\nshards:\n  - {name: a, data: {path: s3://d/a/}}\n  - {name: remote, vector: incoming/remote.safetensors}\nevaluation: {data: {path: s3://d/t/}}\nmerge: {baselines: []}\nstorage: {s3: {bucket: runs}}\n";
        let s: MergeJobSpec = serde_yaml::from_str(yaml).unwrap();
        let d = decide("mj", "ns", 1, &s, &jobs(&[("init", Succeeded), ("finetune-a", Active), ("collect-remote", Active)]));
        assert_eq!(d.shards, vec![("a".to_string(), ShardState::Training), ("remote".to_string(), ShardState::Waiting)]);
    }

    #[test]
    fn phases_only_move_forward_through_the_plan() {
        let order: Vec<Phase> = [
            vec![],
            vec![("init", Succeeded)],
            vec![("init", Succeeded), ("finetune-a", Succeeded), ("finetune-b", Succeeded), ("finetune-c", Succeeded)],
            vec![("init", Succeeded), ("finetune-a", Succeeded), ("finetune-b", Succeeded), ("finetune-c", Succeeded), ("merge-data-vector", Succeeded)],
        ]
        .iter()
        .map(|j| decide("mj", "ns", 1, &spec(""), &jobs(j)).phase)
        .collect();
        assert_eq!(order, vec![Phase::Training, Phase::Training, Phase::Merging, Phase::Restoring]);
    }

    #[test]
    fn a_new_generation_starts_from_the_beginning_regardless_of_the_old_one() {
        let d = decide("mj", "ns", 2, &spec(""), &Observed::default());
        assert_eq!((names(&d), d.phase), (vec!["init".to_string()], Phase::Training));
    }
}
