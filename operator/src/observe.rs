//! Reading a MergeJob's Jobs back into `decide`'s terms. The only code that interprets what
//! the cluster reports; it does no I/O itself (the controller reads the Jobs from its cache).

use std::borrow::Borrow;
use std::collections::BTreeMap;

use crate::job_cache::ManagedJob;
use k8s_openapi::jiff::Timestamp;
use medmerge_crds::{MergeJobStatus, StageOutcome, StageRecord};

use crate::decide::{JobState, Observed};
use crate::jobs::LABEL_STAGE;

/// The state of one Job as the Job controller reports it. An unfinished suspended Job is queued:
/// Kueue creates nothing itself, it unsuspends the Jobs it admits.
pub fn job_state(job: &ManagedJob) -> JobState {
    let status = job.status.as_ref();
    let condition = |kind: &str| status.and_then(|s| s.conditions.as_ref()).is_some_and(|cs| cs.iter().any(|c| c.type_ == kind && c.status == "True"));
    if condition("Complete") || status.and_then(|s| s.succeeded).unwrap_or(0) > 0 {
        JobState::Succeeded
    } else if condition("Failed") {
        JobState::Failed
    } else if job.spec.as_ref().and_then(|s| s.suspend) == Some(true) {
        JobState::Queued
    } else {
        JobState::Active
    }
}

/// When a Job was admitted: the Job controller's `startTime` (set when it starts or is
/// unsuspended), or its creation where nothing has stamped one yet.
fn admitted_at(job: &ManagedJob) -> Option<Timestamp> {
    job.status.as_ref().and_then(|s| s.start_time.as_ref()).or(job.metadata.creation_timestamp.as_ref()).map(|t| t.0)
}

/// Why a failed Job failed, as the Job controller says (`DeadlineExceeded: Job was active
/// longer than specified deadline`); `None` while it has not failed.
pub fn job_failure(job: &ManagedJob) -> Option<String> {
    let failed = job.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == "Failed" && c.status == "True")?;
    let reason = failed.reason.clone().unwrap_or_else(|| "Failed".into());
    Some(match failed.message.as_deref().filter(|m| !m.is_empty()) {
        Some(message) => format!("{reason}: {message}"),
        None => reason,
    })
}

/// Pods the Job has started so far (running, succeeded and failed).
pub fn job_attempts(job: &ManagedJob) -> i32 {
    job.status.as_ref().map_or(0, |s| s.active.unwrap_or(0) + s.succeeded.unwrap_or(0) + s.failed.unwrap_or(0))
}

fn stage_of(job: &ManagedJob) -> Option<&String> {
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
    /// Stage name -> why its Job failed, for failed stages.
    pub failures: BTreeMap<String, String>,
}

impl GenerationJobs {
    /// Adds what the status remembers of the same generation: finished stages whose Jobs are
    /// gone (deleted after `ttlSecondsAfterFinished`, or by hand) count as they finished, and the
    /// run started when the status says if that is earlier than any Job left.
    pub fn remember(&mut self, previous: &MergeJobStatus) {
        for record in &previous.stages {
            if self.observed.jobs.contains_key(&record.name) {
                continue;
            }
            let state = match record.state {
                StageOutcome::Succeeded => JobState::Succeeded,
                StageOutcome::Dropped => JobState::Stopped,
                StageOutcome::Failed => JobState::Failed,
            };
            self.observed.jobs.insert(record.name.clone(), state);
            self.attempts.insert(record.name.clone(), record.attempts);
            if let Some(reason) = &record.reason {
                self.failures.insert(record.name.clone(), reason.clone());
            }
        }
        let remembered = previous.start_time.as_deref().and_then(|t| t.parse::<Timestamp>().ok());
        self.started = match (self.started, remembered) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    /// The finished stages, for the status.
    pub fn finished(&self) -> Vec<StageRecord> {
        let finished = self.observed.jobs.iter().filter_map(|(name, state)| match state {
            JobState::Succeeded => Some((name, StageOutcome::Succeeded)),
            JobState::Failed => Some((name, StageOutcome::Failed)),
            JobState::Stopped => Some((name, StageOutcome::Dropped)),
            JobState::Queued | JobState::Active => None,
        });
        finished.map(|(name, state)| StageRecord { name: name.clone(), state, attempts: self.attempts.get(name).copied().unwrap_or(0), reason: self.failures.get(name).cloned() }).collect()
    }
}

/// Summarises the Jobs of one generation (already selected by label).
pub fn observe_jobs(jobs: &[impl Borrow<ManagedJob>], now: Timestamp) -> GenerationJobs {
    let labelled: Vec<(&String, &ManagedJob)> = jobs.iter().map(Borrow::borrow).filter_map(|j| stage_of(j).map(|s| (s, j))).collect();
    let started = labelled.iter().filter_map(|(_, j)| j.metadata.creation_timestamp.as_ref().map(|t| t.0)).min();
    let states: BTreeMap<String, JobState> = labelled.iter().map(|(s, j)| ((*s).clone(), job_state(j))).collect();
    let active = labelled.iter().filter(|(s, _)| states[*s] == JobState::Active);
    let active_for = active.filter_map(|(s, j)| admitted_at(j).map(|t| ((*s).clone(), (now.as_second() - t.as_second()).max(0)))).collect();
    GenerationJobs {
        observed: Observed { jobs: states, active_for },
        attempts: labelled.iter().map(|(s, j)| ((*s).clone(), job_attempts(j))).collect(),
        started,
        failures: labelled.iter().filter_map(|(s, j)| job_failure(j).map(|f| ((*s).clone(), f))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job_cache::ManagedJobSpec;
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn job(status: JobStatus) -> ManagedJob {
        ManagedJob { status: Some(status), ..Default::default() }
    }

    fn staged(stage: &str, created: i64, status: JobStatus) -> ManagedJob {
        ManagedJob {
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
        assert_eq!(job_state(&ManagedJob::default()), JobState::Active);
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
            ManagedJob::default(),
        ];
        let seen = observe_jobs(&jobs, Timestamp::from_second(1_500).unwrap());
        assert_eq!(seen.started, Some(Timestamp::from_second(1_000).unwrap()));
        assert_eq!(seen.observed.active_for, BTreeMap::from([("finetune-a".to_string(), 400)]), "only unfinished Jobs run a clock");
        assert_eq!(seen.observed.jobs.len(), 2, "jobs without a stage label are ignored");
        assert_eq!(seen.attempts["finetune-a"], 3);
        assert_eq!(seen.observed.jobs["finetune-a"], JobState::Active);
    }

    #[test]
    fn a_generation_without_jobs_has_not_started() {
        let seen = observe_jobs(&[] as &[ManagedJob], Timestamp::from_second(5).unwrap());
        assert_eq!((seen.observed.active_for.len(), seen.started), (0, None));
    }

    #[test]
    fn finished_stages_whose_jobs_are_gone_are_remembered_from_the_status() {
        let jobs = [staged("merge-data-vector", 2_000, JobStatus { active: Some(1), ..Default::default() })];
        let mut seen = observe_jobs(&jobs, Timestamp::from_second(2_100).unwrap());
        let previous = MergeJobStatus {
            start_time: Some(Timestamp::from_second(1_000).unwrap().to_string()),
            stages: vec![
                StageRecord { name: "init".into(), state: StageOutcome::Succeeded, attempts: 1, reason: None },
                StageRecord { name: "finetune-b".into(), state: StageOutcome::Failed, attempts: 3, reason: Some("BackoffLimitExceeded".into()) },
            ],
            ..Default::default()
        };
        seen.remember(&previous);
        assert_eq!(seen.observed.jobs["init"], JobState::Succeeded);
        assert_eq!(seen.observed.jobs["finetune-b"], JobState::Failed);
        assert_eq!(seen.observed.jobs["merge-data-vector"], JobState::Active);
        assert_eq!(seen.started, Some(Timestamp::from_second(1_000).unwrap()), "the run started with its first Job, not its oldest Job left");
        let finished = seen.finished();
        assert_eq!(finished.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["finetune-b", "init"]);
        assert_eq!(finished[0].reason.as_deref(), Some("BackoffLimitExceeded"));
        assert_eq!(finished[0].attempts, 3);
    }

    #[test]
    fn a_job_kueue_has_not_admitted_is_queued_and_its_clock_starts_at_admission() {
        let mut queued = staged("finetune-a", 1_000, JobStatus::default());
        queued.spec = Some(ManagedJobSpec { suspend: Some(true) });
        let mut admitted = staged("finetune-b", 1_000, JobStatus { start_time: Some(Time(Timestamp::from_second(1_900).unwrap())), active: Some(1), ..Default::default() });
        admitted.spec = Some(ManagedJobSpec { suspend: Some(false) });
        let seen = observe_jobs(&[queued, admitted], Timestamp::from_second(2_000).unwrap());
        assert_eq!(seen.observed.jobs["finetune-a"], JobState::Queued);
        assert_eq!(seen.observed.jobs["finetune-b"], JobState::Active);
        assert_eq!(seen.observed.active_for, BTreeMap::from([("finetune-b".to_string(), 100)]), "900 s in the queue do not count");
    }

    #[test]
    fn a_failed_job_says_why() {
        let failed = JobStatus {
            conditions: Some(vec![JobCondition {
                type_: "Failed".into(),
                status: "True".into(),
                reason: Some("DeadlineExceeded".into()),
                message: Some("Job was active longer than specified deadline".into()),
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert_eq!(job_failure(&job(failed)).as_deref(), Some("DeadlineExceeded: Job was active longer than specified deadline"));
        assert_eq!(job_failure(&job(JobStatus { active: Some(1), ..Default::default() })), None);
    }
}
