//! What the operator does to Jobs it already created: stop work whose result can no longer be
//! used, pause a suspended run's Jobs and resume them. Pure: the controller applies the list.
//!
//! - Jobs of a superseded run (a result-changing edit started a new one) and the Job of a shard
//!   dropped at the straggler deadline are **deleted** (their pods with them): their outputs will
//!   never be read, and deleting frees GPUs and queue quota on every Kubernetes version and
//!   under Kueue alike. Finished Jobs are left to `ttlSecondsAfterFinished`.
//! - A suspended MergeJob's running Jobs are **suspended** (`spec.suspend`: the Job controller
//!   removes their pods, the Jobs stay) and marked with [`PAUSED`]; resuming unsuspends exactly
//!   those. Jobs queued through Kueue are deleted instead, because Kueue owns their `suspend`
//!   field and would unsuspend them on admission; they start again on resume.

use std::borrow::Borrow;

use crate::job_cache::ManagedJob;
use kube::ResourceExt;

use crate::decide::{vector_stage, Decision, JobState, ShardState};
use crate::jobs::{KUEUE_LABELS, LABEL_GENERATION, LABEL_STAGE};
use crate::observe::job_state;
use medmerge_crds::MergeJobSpec;

/// Annotation on a stage Job the operator suspended because its MergeJob was suspended.
pub const PAUSED: &str = "medmerge.io/paused";

/// One change to an existing Job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Intervention {
    /// Delete the Job and its pods; `reason` and `note` become a Kubernetes Event.
    Delete {
        /// The Job.
        job: String,
        /// The stage it ran.
        stage: String,
        /// CamelCase Event reason.
        reason: &'static str,
        /// Why, in words.
        note: String,
    },
    /// Suspend the Job (its pods go) and mark it [`PAUSED`].
    Pause {
        /// The Job.
        job: String,
    },
    /// Unsuspend a Job this operator paused.
    Resume {
        /// The Job.
        job: String,
    },
}

/// What to change, given every Job of one MergeJob (all runs), the run being reconciled, its
/// spec and `decide`'s decision for it.
pub fn interventions(jobs: &[impl Borrow<ManagedJob>], run: i64, spec: &MergeJobSpec, decision: &Decision) -> Vec<Intervention> {
    let run_label = run.to_string();
    let dropped: Vec<String> = spec.shards.iter().filter(|s| decision.shards.iter().any(|(n, state)| n == &s.name && *state == ShardState::Dropped)).map(|s| vector_stage(s).name()).collect();
    let mut out = Vec::new();
    for job in jobs.iter().map(Borrow::borrow) {
        let state = job_state(job);
        if matches!(state, JobState::Succeeded | JobState::Failed | JobState::Stopped) {
            continue;
        }
        let name = job.name_any();
        let labels = job.labels();
        let stage = labels.get(LABEL_STAGE).cloned().unwrap_or_default();
        let job_run = labels.get(LABEL_GENERATION).map(String::as_str).unwrap_or_default();
        let paused = job.annotations().contains_key(PAUSED);
        let queued_by_kueue = KUEUE_LABELS.iter().any(|k| labels.contains_key(*k));
        if job_run != run_label {
            let note = format!("stopped Job {name} (stage {stage} of run {job_run}): run {run} superseded it after a result-changing edit");
            out.push(Intervention::Delete { job: name, stage, reason: "SupersededJobStopped", note });
        } else if dropped.contains(&stage) {
            let note = format!("stopped Job {name}: its shard missed the straggler deadline and the merge goes on without it");
            out.push(Intervention::Delete { job: name, stage, reason: "StragglerStopped", note });
        } else if spec.is_suspended() && queued_by_kueue {
            let note = format!("stopped Job {name} while the MergeJob is suspended (Kueue owns its suspend field); stage {stage} starts again on resume");
            out.push(Intervention::Delete { job: name, stage, reason: "SuspendedJobStopped", note });
        } else if spec.is_suspended() && !paused && state == JobState::Active {
            out.push(Intervention::Pause { job: name });
        } else if !spec.is_suspended() && paused {
            out.push(Intervention::Resume { job: name });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::{decide, Observed};
    use crate::job_cache::ManagedJobSpec;
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use std::collections::BTreeMap;

    fn spec(extra: &str) -> MergeJobSpec {
        let yaml = format!(
            "model: {{architecture: resnet18, weights: random, classes: [x, y]}}\nshards:\n  - {{name: a, data: {{path: s3://d/a/}}}}\n  - {{name: b, data: {{path: s3://d/b/}}}}\nevaluation: {{data: {{path: s3://d/t/}}}}\nmerge: {{baselines: []}}\nstorage: {{s3: {{bucket: runs}}}}\n{extra}"
        );
        serde_yaml::from_str(&yaml).unwrap()
    }

    fn job(run: i64, stage: &str, finished: bool, extra_labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> ManagedJob {
        let mut labels: BTreeMap<String, String> = [(LABEL_GENERATION, run.to_string()), (LABEL_STAGE, stage.to_string())].into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        labels.extend(extra_labels.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let conditions = finished.then(|| vec![JobCondition { type_: "Complete".into(), status: "True".into(), ..Default::default() }]);
        ManagedJob {
            metadata: ObjectMeta {
                name: Some(format!("mj-g{run}-{stage}")),
                labels: Some(labels),
                annotations: Some(annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                ..Default::default()
            },
            spec: Some(ManagedJobSpec::default()),
            status: Some(JobStatus { conditions, ..Default::default() }),
        }
    }

    fn decision(s: &MergeJobSpec, observed: &Observed) -> Decision {
        decide("mj", "ns", 2, s, observed)
    }

    #[test]
    fn unfinished_jobs_of_a_superseded_run_are_deleted_and_finished_ones_left() {
        let s = spec("");
        let jobs = [job(1, "finetune-a", false, &[], &[]), job(1, "init", true, &[], &[]), job(2, "init", false, &[], &[])];
        let out = interventions(&jobs, 2, &s, &decision(&s, &Observed::default()));
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(matches!(&out[0], Intervention::Delete { job, reason: "SupersededJobStopped", .. } if job == "mj-g1-finetune-a"));
    }

    #[test]
    fn the_job_of_a_dropped_straggler_is_deleted() {
        let s = spec("cluster: {minShards: 1, stragglerDeadlineSeconds: 100}");
        let observed = Observed {
            jobs: [("init", JobState::Succeeded), ("finetune-a", JobState::Succeeded), ("finetune-b", JobState::Active)].into_iter().map(|(n, st)| (n.to_string(), st)).collect(),
            active_for: [("finetune-b".to_string(), 101)].into(),
        };
        let d = decision(&s, &observed);
        let out = interventions(&[job(2, "finetune-b", false, &[], &[])], 2, &s, &d);
        assert!(matches!(&out[..], [Intervention::Delete { reason: "StragglerStopped", stage, .. }] if stage == "finetune-b"), "{out:?}");
    }

    #[test]
    fn suspending_pauses_running_jobs_deletes_kueue_ones_and_resuming_unpauses_only_paused_ones() {
        let suspended = spec("suspend: true");
        let jobs = [job(2, "finetune-a", false, &[], &[]), job(2, "finetune-b", false, &[("kueue.x-k8s.io/queue-name", "gpus")], &[]), job(2, "init", true, &[], &[])];
        let out = interventions(&jobs, 2, &suspended, &decision(&suspended, &Observed::default()));
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0], Intervention::Pause { job: "mj-g2-finetune-a".into() });
        assert!(matches!(&out[1], Intervention::Delete { reason: "SuspendedJobStopped", .. }));

        let resumed = spec("");
        let jobs = [job(2, "finetune-a", false, &[], &[(PAUSED, "true")]), job(2, "finetune-b", false, &[], &[])];
        let out = interventions(&jobs, 2, &resumed, &decision(&resumed, &Observed::default()));
        assert_eq!(out, vec![Intervention::Resume { job: "mj-g2-finetune-a".into() }]);
    }

    #[test]
    fn a_paused_job_is_not_paused_twice() {
        let suspended = spec("suspend: true");
        let mut paused = job(2, "finetune-a", false, &[], &[(PAUSED, "true")]);
        paused.spec.as_mut().unwrap().suspend = Some(true);
        assert!(interventions(&[paused], 2, &suspended, &decision(&suspended, &Observed::default())).is_empty());
    }
}
