//! The MergeJob status the operator writes: phase, conditions, per-shard state and results,
//! computed from a decision and what was observed. Pure.
//!
//! Conditions keep their `lastTransitionTime` while their status does not flip, so a person
//! reading `kubectl describe` sees when something actually changed.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use medmerge_crds::results::ReleaseRecord;
use medmerge_crds::{ArtifactLayout, Condition, MergeJobSpec, MergeJobStatus, ResultsStatus, RunDecision, ShardStatus};

use crate::decide::{Decision, JobState, Observed, Phase, ShardState};
use crate::observe::GenerationJobs;

/// What a shard's training summary says, as the shard's status shows it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShardFact {
    /// Training images.
    pub samples: Option<u64>,
    /// Validation accuracy of the kept epoch.
    pub validation_accuracy: Option<f64>,
    /// How the vector was released.
    pub release: Option<ReleaseRecord>,
}

/// Per-shard facts read from the shards' training summaries.
pub type ShardFacts = BTreeMap<String, ShardFact>;

/// Everything the new status is computed from.
pub struct StatusInputs<'a> {
    /// The status as it is now (conditions keep their transition times).
    pub previous: &'a MergeJobStatus,
    /// The generation being reported.
    pub generation: i64,
    /// The run it belongs to.
    pub run: &'a RunDecision,
    /// The MergeJob's spec.
    pub spec: &'a MergeJobSpec,
    /// The run's artifact keys.
    pub layout: &'a ArtifactLayout,
    /// What `decide` concluded.
    pub decision: &'a Decision,
    /// The run's Jobs.
    pub jobs: &'a GenerationJobs,
    /// Shard training summaries found in the store.
    pub shard_facts: &'a ShardFacts,
    /// The evaluate stage's results, once read.
    pub results: Option<ResultsStatus>,
    /// The current time.
    pub now: Timestamp,
}

/// The status to write.
pub fn build_status(i: &StatusInputs) -> MergeJobStatus {
    let d = i.decision;
    let (ready, total) = d.shards_ready();
    // Within one run, conditions keep their transition times and the completion time stays.
    let same_run = i.run.continues;
    let previous_conditions: &[Condition] = if same_run { &i.previous.conditions } else { &[] };
    let conditions =
        conditions(d, &i.jobs.observed, i.run.run).into_iter().map(|(type_, status, reason, message)| condition(previous_conditions, type_, status, reason, message, i.generation, i.now)).collect();
    let completion_time = if d.phase.is_terminal() { same_run.then(|| i.previous.completion_time.clone()).flatten().or_else(|| Some(i.now.to_string())) } else { None };
    MergeJobStatus {
        phase: Some(d.phase),
        observed_generation: Some(i.generation),
        run: Some(i.run.run),
        run_key: Some(i.run.key.clone()),
        shards_ready: Some(format!("{ready}/{total}")),
        conditions,
        shards: shard_statuses(i),
        results: i.results.clone(),
        start_time: i.jobs.started.map(|t| t.to_string()),
        completion_time,
        stages: i.jobs.finished(),
    }
}

fn shard_statuses(i: &StatusInputs) -> Vec<ShardStatus> {
    i.spec
        .shards
        .iter()
        .zip(&i.decision.shards)
        .map(|(spec, (name, state))| {
            let stage = if spec.vector.is_some() { format!("collect-{name}") } else { format!("finetune-{name}") };
            let ShardFact { samples, validation_accuracy, release } = i.shard_facts.get(name).cloned().unwrap_or_default();
            let reason = match state {
                ShardState::Failed => Some(match i.jobs.failures.get(&stage) {
                    Some(why) => format!("Job {stage} failed: {why}"),
                    None => format!("Job {stage} failed after every retry; see its logs"),
                }),
                ShardState::Dropped => Some("no vector by cluster.stragglerDeadlineSeconds".to_string()),
                _ => None,
            };
            ShardStatus {
                name: name.clone(),
                state: *state,
                attempts: i.jobs.attempts.get(&stage).copied().unwrap_or(0),
                vector: (*state == ShardState::Ready).then(|| i.layout.shard_vector(name)),
                samples,
                validation_accuracy,
                release,
                reason,
            }
        })
        .collect()
}

type ConditionRow = (&'static str, bool, String, String);

/// The state of every Job whose stage name starts with `prefix`: (any exist, all succeeded, any failed).
fn stage_group(observed: &Observed, prefix: &str) -> (bool, bool, bool) {
    let states: Vec<JobState> = observed.jobs.iter().filter(|(n, _)| n.starts_with(prefix)).map(|(_, s)| *s).collect();
    (!states.is_empty(), !states.is_empty() && states.iter().all(|s| *s == JobState::Succeeded), states.contains(&JobState::Failed))
}

fn conditions(d: &Decision, observed: &Observed, run: i64) -> Vec<ConditionRow> {
    let running = !d.phase.is_terminal() && d.phase != Phase::Suspended;
    let (ready, total) = d.shards_ready();
    let healthy = total - d.excluded_shards().len();
    let mut rows: Vec<ConditionRow> = vec![
        ("Ready", d.phase == Phase::Succeeded, d.reason.into(), if d.phase == Phase::Succeeded { format!("run {run} finished; results are in status.results") } else { d.message.clone() }),
        ("Progressing", running, if running { "StagesRunning".into() } else { d.reason.into() }, d.message.clone()),
        ("Failed", d.phase == Phase::Failed, d.reason.into(), if d.phase == Phase::Failed { d.message.clone() } else { "nothing has failed".into() }),
    ];
    // A suspended run's paused Jobs are suspended too, but no queue holds them.
    let queued = if d.phase == Phase::Suspended { 0 } else { observed.jobs.values().filter(|s| **s == JobState::Queued).count() };
    let queue_message = if queued > 0 { format!("{queued} stage Jobs wait for their queue to admit them") } else { "no stage Job waits for admission".into() };
    rows.push(("Queued", queued > 0, if queued > 0 { "WaitingForAdmission" } else { "NothingQueued" }.into(), queue_message));
    let trained = ready == healthy && healthy > 0;
    let trained_reason = if trained { "VectorsReady" } else { "WaitingForVectors" };
    rows.push(("Trained", trained, trained_reason.into(), format!("{ready} of {total} shard vectors available")));
    for (type_, prefix, what) in [("Merged", "merge-", "merge"), ("Restored", "restore-", "restoration"), ("Evaluated", "evaluate", "evaluation")] {
        let (exists, done, failed) = stage_group(observed, prefix);
        let (reason, message) = match (exists, done, failed) {
            (_, true, _) => ("Done", format!("{what} finished")),
            (_, _, true) => ("JobFailed", format!("a {what} Job failed; see its logs")),
            (true, ..) => ("Running", format!("{what} Jobs running")),
            _ => ("NotStarted", format!("{what} has not started")),
        };
        rows.push((type_, done, reason.into(), message));
    }
    rows
}

fn condition(previous: &[Condition], type_: &str, status: bool, reason: String, message: String, generation: i64, now: Timestamp) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let last_transition_time = previous.iter().find(|c| c.type_ == type_ && c.status == status).map_or_else(|| now.to_string(), |c| c.last_transition_time.clone());
    Condition { type_: type_.into(), status, reason, message, last_transition_time, observed_generation: Some(generation) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::decide;

    fn spec() -> MergeJobSpec {
        serde_yaml::from_str(
            "model: {architecture: resnet18, weights: random, classes: [x, y]}\nshards: [{name: a, data: {path: s3://d/a/}}, {name: b, data: {path: s3://d/b/}}]\nevaluation: {data: {path: s3://d/t/}}\nmerge: {baselines: []}\ncluster: {minShards: 1}\nstorage: {s3: {bucket: runs}}\n",
        )
        .unwrap()
    }

    fn observed(states: &[(&str, JobState)]) -> GenerationJobs {
        GenerationJobs {
            observed: Observed { jobs: states.iter().map(|(n, s)| (n.to_string(), *s)).collect(), active_for: Default::default() },
            attempts: [("finetune-b".to_string(), 3)].into(),
            started: Some(Timestamp::from_second(1_000).unwrap()),
            failures: Default::default(),
        }
    }

    fn status(previous: &MergeJobStatus, jobs: &GenerationJobs, now: i64) -> MergeJobStatus {
        let spec = spec();
        let layout = ArtifactLayout::new("runs", "ns", "mj", 1);
        let decision = decide("mj", "ns", 1, &spec, &jobs.observed);
        let facts: ShardFacts = [("a".to_string(), ShardFact { samples: Some(120), validation_accuracy: Some(0.8), release: None })].into();
        let run = RunDecision::of(1, &spec, previous);
        build_status(&StatusInputs {
            previous,
            generation: 1,
            run: &run,
            spec: &spec,
            layout: &layout,
            decision: &decision,
            jobs,
            shard_facts: &facts,
            results: None,
            now: Timestamp::from_second(now).unwrap(),
        })
    }

    fn get<'a>(s: &'a MergeJobStatus, type_: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    use JobState::*;

    #[test]
    fn shards_report_their_state_attempts_vector_and_training_numbers() {
        let s = status(&MergeJobStatus::default(), &observed(&[("init", Succeeded), ("finetune-a", Succeeded), ("finetune-b", Failed)]), 2_000);
        let a = &s.shards[0];
        assert_eq!((a.state, a.samples, a.validation_accuracy), (ShardState::Ready, Some(120), Some(0.8)));
        assert_eq!(a.vector.as_deref(), Some("runs/ns/mj/g1/shards/a/vector.safetensors"));
        let b = &s.shards[1];
        assert_eq!((b.state, b.attempts, b.vector.clone()), (ShardState::Failed, 3, None));
        assert!(b.reason.as_deref().unwrap().contains("finetune-b"));
        assert_eq!(s.shards_ready.as_deref(), Some("1/2"));
        assert_eq!(get(&s, "Trained").status, "True", "the remaining quorum is trained");
        assert_eq!(s.start_time.as_deref(), Some("1970-01-01T00:16:40Z"));
    }

    #[test]
    fn conditions_keep_their_transition_time_until_they_flip() {
        let training = observed(&[("init", Succeeded), ("finetune-a", Active), ("finetune-b", Active)]);
        let first = status(&MergeJobStatus::default(), &training, 2_000);
        assert_eq!((get(&first, "Progressing").status.as_str(), get(&first, "Ready").status.as_str()), ("True", "False"));
        let again = status(&first, &training, 3_000);
        assert_eq!(get(&again, "Progressing").last_transition_time, get(&first, "Progressing").last_transition_time);
        let merged = observed(&[("init", Succeeded), ("finetune-a", Succeeded), ("finetune-b", Succeeded), ("merge-data-vector", Succeeded)]);
        let later = status(&again, &merged, 4_000);
        assert_eq!(get(&later, "Trained").last_transition_time, Timestamp::from_second(4_000).unwrap().to_string());
        assert_eq!((get(&later, "Merged").status.as_str(), get(&later, "Merged").reason.as_str()), ("True", "Done"));
        assert_eq!(get(&later, "Restored").reason, "NotStarted");
    }

    #[test]
    fn a_finished_run_is_ready_with_a_completion_time_that_does_not_move() {
        let mut stages = vec!["init".to_string(), "finetune-a".into(), "finetune-b".into(), "merge-data-vector".into(), "evaluate".into()];
        for round in ["epoch", "bn", "head"] {
            stages.extend(["-a", "-b", ""].map(|shard| format!("restore-data-vector-{round}{shard}")));
        }
        let all = observed(&stages.iter().map(|s| (s.as_str(), Succeeded)).collect::<Vec<_>>());
        let done = status(&MergeJobStatus::default(), &all, 5_000);
        assert_eq!((done.phase, get(&done, "Ready").status.as_str(), get(&done, "Progressing").status.as_str()), (Some(Phase::Succeeded), "True", "False"));
        let again = status(&done, &all, 6_000);
        assert_eq!(again.completion_time, done.completion_time);
    }

    #[test]
    fn a_failed_stage_sets_the_failed_condition_with_an_actionable_message() {
        let s = status(&MergeJobStatus::default(), &observed(&[("init", Failed)]), 2_000);
        let failed = get(&s, "Failed");
        assert_eq!((failed.status.as_str(), failed.reason.as_str()), ("True", "StageFailed"));
        assert!(failed.message.contains("init") && failed.message.contains("logs"));
        assert!(s.completion_time.is_some());
    }
}
