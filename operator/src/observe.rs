//! Reading a MergeJob's Jobs back into `decide`'s terms. The only code that interprets what
//! the cluster reports; it does no I/O itself (the controller reads the Jobs from its cache).

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::jiff::Timestamp;

use crate::decide::{JobState, Observed};
use crate::jobs::LABEL_STAGE;

/// The state of one Job as the Job controller reports it.
pub fn job_state(job: &Job) -> JobState {
    let status = job.status.as_ref();
    let condition = |kind: &str| status.and_then(|s| s.conditions.as_ref()).is_some_and(|cs| cs.iter().any(|c| c.type_ == kind && c.status == "True"));
    if condition("Complete") || status.and_then(|s| s.succeeded).unwrap_or(0) > 0 {
        JobState::Succeeded
    } else if condition("Failed") {
        JobState::Failed
    } else {
        JobState::Active
    }
}

/// Pods the Job has started so far (running, succeeded and failed).
pub fn job_attempts(job: &Job) -> i32 {
    job.status.as_ref().map_or(0, |s| s.active.unwrap_or(0) + s.succeeded.unwrap_or(0) + s.failed.unwrap_or(0))
}

fn stage_of(job: &Job) -> Option<&String> {
    job.metadata.labels.as_ref().and_then(|l| l.get(LABEL_STAGE))
}

/// What one generation's Jobs say, as of `now`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationJobs {
    /// The input to `decide`.
    pub observed: Observed,
    /// Stage name -> pods started, for per-shard status.
    pub attempts: BTreeMap<String, i32>,
    /// When the generation's first Job was created.
    pub started: Option<Timestamp>,
}

/// Summarises the Jobs of one generation (already selected by label).
pub fn observe_jobs(jobs: &[Job], now: Timestamp) -> GenerationJobs {
    let labelled: Vec<(&String, &Job)> = jobs.iter().filter_map(|j| stage_of(j).map(|s| (s, j))).collect();
    let started = labelled.iter().filter_map(|(_, j)| j.metadata.creation_timestamp.as_ref().map(|t| t.0)).min();
    GenerationJobs {
        observed: Observed {
            jobs: labelled.iter().map(|(s, j)| ((*s).clone(), job_state(j))).collect(),
            running_for: started.map(|t| (now.as_second() - t.as_second()).max(0)),
        },
        attempts: labelled.iter().map(|(s, j)| ((*s).clone(), job_attempts(j))).collect(),
        started,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn job(status: JobStatus) -> Job {
        Job { status: Some(status), ..Default::default() }
    }

    fn staged(stage: &str, created: i64, status: JobStatus) -> Job {
        Job {
            metadata: ObjectMeta {
                labels: Some([(LABEL_STAGE.to_string(), stage.to_string())].into()),
                creation_timestamp: Some(Time(Timestamp::from_second(created).unwrap())),
                ..Default::default()
            },
            status: Some(status),
            ..Default::default()
        }
    }

    #[test]
    fn job_states_follow_the_job_controller() {
        assert_eq!(job_state(&Job::default()), JobState::Active);
        assert_eq!(job_state(&job(JobStatus { succeeded: Some(1), ..Default::default() })), JobState::Succeeded);
        let failed = JobStatus { failed: Some(3), conditions: Some(vec![JobCondition { type_: "Failed".into(), status: "True".into(), ..Default::default() }]), ..Default::default() };
        assert_eq!(job_state(&job(failed)), JobState::Failed);
        let retrying = JobStatus { failed: Some(1), active: Some(1), ..Default::default() };
        assert_eq!(job_state(&job(retrying)), JobState::Active);
    }

    #[test]
    fn a_generation_runs_from_its_first_job_and_counts_attempts_per_stage() {
        let jobs = [
            staged("init", 1_000, JobStatus { succeeded: Some(1), ..Default::default() }),
            staged("finetune-a", 1_100, JobStatus { failed: Some(2), active: Some(1), ..Default::default() }),
            Job::default(),
        ];
        let seen = observe_jobs(&jobs, Timestamp::from_second(1_500).unwrap());
        assert_eq!(seen.observed.running_for, Some(500));
        assert_eq!(seen.observed.jobs.len(), 2, "jobs without a stage label are ignored");
        assert_eq!(seen.attempts["finetune-a"], 3);
        assert_eq!(seen.observed.jobs["finetune-a"], JobState::Active);
    }

    #[test]
    fn a_generation_without_jobs_has_not_started() {
        let seen = observe_jobs(&[], Timestamp::from_second(5).unwrap());
        assert_eq!((seen.observed.running_for, seen.started), (None, None));
    }
}
