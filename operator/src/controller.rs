//! The reconcile loop: observe (the MergeJob's Jobs of its current run and what the artifact
//! store holds) -> decide (pure) -> apply (server-side apply of the spec ConfigMap and new stage
//! Jobs, the status, then stopping, pausing or resuming Jobs already there), with an Event for
//! every stage transition and every Job stopped.
//!
//! A run is keyed by the spec fields that change results ([`RunDecision`]): an edit that changes
//! none continues the current run, its Jobs and artifacts; its number (the generation that
//! started it) names the Jobs and the artifact keys.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use medmerge_crds::{mergejob_root, ArtifactLayout, CleanupPolicy, MergeJob, MergeJobStatus, RunDecision};
use tokio::sync::SemaphorePermit;
use tracing::{info, info_span, instrument, warn, Instrument};

use crate::artifacts::{results_from_report, shard_summary, ArtifactError, ArtifactStore};
use crate::decide::{decide, Decision, JobState, Phase, ShardState};
use crate::image_policy::ImagePolicy;
use crate::interventions::{interventions, Intervention, PAUSED};
use crate::job_cache::{trim_for_cache, trim_mergejob_for_cache, JobCache, JobCacheWriter, ManagedJob};
use crate::job_work::{Begun, Decided, JobWork};
use crate::jobs::{spec_configmap, stage_job_excluding, LABEL_GENERATION};
use crate::lanes::Lanes;
use crate::observe::{observe_jobs, GenerationJobs};
use crate::retry::Backoff;
use crate::status::{build_status, ShardFact, ShardFacts, StatusInputs};
use crate::telemetry::Metrics;

/// The field manager of every object the operator writes.
pub const MANAGER: &str = "medmerge-operator";
/// Held on MergeJobs with `storage.cleanup: Delete` until their artifacts are deleted.
pub const FINALIZER: &str = "medmerge.io/artifact-cleanup";
/// How often a running MergeJob is looked at even when nothing changed.
const RESYNC: Duration = Duration::from_secs(300);
/// MergeJobs reconciled at once unless told otherwise (see bench/results/operator-scale.md).
pub const DEFAULT_CONCURRENCY: u16 = 8;
/// Selects every Job the operator manages (and caches).
const MANAGED_JOBS: &str = "app.kubernetes.io/managed-by=medmerge";

/// Why a reconcile failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// A call to the Kubernetes API failed.
    #[error("{action}: {source}")]
    Kube {
        /// What the operator was doing.
        action: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The MergeJob could not be serialised into its spec ConfigMap.
    #[error("serialising the MergeJob for its spec ConfigMap: {0}")]
    Yaml(#[from] serde_yaml::Error),
    /// Results or shard summaries could not be read back.
    #[error(transparent)]
    Artifacts(#[from] ArtifactError),
    /// The reconcile's task was cancelled (the operator is shutting down).
    #[error("the reconcile was cancelled: the operator is shutting down")]
    Cancelled,
    /// The Job cache stopped before it first filled (the operator is shutting down).
    #[error("the Job watch stopped before the Job cache first filled")]
    JobCacheStopped,
}

fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> ReconcileError {
    let action = action.into();
    move |source| ReconcileError::Kube { action, source }
}

/// What every reconcile shares.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Where results are read back from.
    pub artifacts: ArtifactStore,
    /// Every Job the operator manages, kept current by the watch [`run`] feeds it from.
    pub jobs: JobCache,
    /// Which trainer images MergeJobs may run.
    pub images: ImagePolicy,
    /// Consecutive failed reconciles per MergeJob, for the retry delay.
    pub backoff: Backoff,
    /// The status lane and the Job lane to the API server ([`Lanes`]). Job changes run off the
    /// reconcile ([`JobWork`]), so that a backlog of Job creations (a burst of new MergeJobs)
    /// does not hold back the status of MergeJobs whose Jobs finished.
    lanes: Lanes,
    /// The MergeJobs whose Job changes are queued or under way.
    job_work: JobWork,
    /// The controller's MergeJob cache (set by [`run`]), for the newest copy of a MergeJob once
    /// its reconcile is admitted.
    mergejobs: OnceLock<Store<MergeJob>>,
}

impl Context {
    /// A context whose Events are reported as `instance` of the operator.
    pub fn new(client: Client, instance: &str, metrics: Arc<Metrics>, artifacts: ArtifactStore, jobs: JobCache) -> Self {
        let reporter = Reporter { controller: MANAGER.into(), instance: Some(instance.into()) };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            artifacts,
            jobs,
            images: ImagePolicy::default(),
            backoff: Backoff::default(),
            lanes: Lanes::new(DEFAULT_CONCURRENCY),
            job_work: JobWork::new(DEFAULT_CONCURRENCY),
            mergejobs: OnceLock::new(),
        }
    }

    /// This context writing at most `concurrency` statuses and changing the Jobs of at most
    /// `concurrency` MergeJobs at once (at least one each).
    pub fn with_concurrency(self, concurrency: u16) -> Self {
        Context { lanes: Lanes::new(concurrency), job_work: JobWork::new(concurrency), ..self }
    }

    /// This context reading the newest MergeJobs from `store` (the controller's own cache, which
    /// [`run`] sets otherwise): Job changes are made for the MergeJobs found there.
    pub fn with_mergejobs(self, store: Store<MergeJob>) -> Self {
        Context { mergejobs: OnceLock::from(store), ..self }
    }

    /// This context with `images` as the trainer image allowlist.
    pub fn with_image_policy(self, images: ImagePolicy) -> Self {
        Context { images, ..self }
    }
}

/// An empty Job cache: the [`JobCache`] goes into the [`Context`], the [`JobCacheWriter`] to [`run`].
pub fn job_cache() -> (JobCache, JobCacheWriter) {
    JobCache::new()
}

fn labelled(job: &ManagedJob, key: &str, value: &str) -> bool {
    job.metadata.labels.as_ref().and_then(|l| l.get(key)).is_some_and(|v| v == value)
}

/// Reconciles one MergeJob.
#[instrument(skip_all, fields(mergejob = %mj.name_any(), namespace = mj.namespace().unwrap_or_default(), generation = mj.metadata.generation))]
pub async fn reconcile(mj: Arc<MergeJob>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    // Every reconcile kube-runtime starts runs inside the controller's own task, which also reads
    // the Job watch that fills the cache: on a task of its own, a burst of reconciles (their JSON
    // and API calls) no longer delays the watch. The span goes along for the log lines.
    let span = tracing::Span::current();
    match tokio::spawn(async move { admitted_reconcile(mj, ctx).await }.instrument(span)).await {
        Ok(result) => result,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(_) => Err(ReconcileError::Cancelled),
    }
}

async fn admitted_reconcile(mj: Arc<MergeJob>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    // kube-runtime keeps the MergeJobs waiting for one of its reconcile slots in a hash set and
    // takes them in hash order, so under a sustained burst a few waited until the burst was over
    // (90 s at 1,000 MergeJobs x 8 shards: bench/results/operator-scale.md). Its slots are
    // unbounded instead (see `run`) and a reconcile that calls out waits for a turn in the
    // status lane ([`Lanes`]), first come first served.
    let newest = |mj: Arc<MergeJob>| ctx.mergejobs.get().and_then(|store| store.get(&ObjectRef::from_obj(&*mj))).unwrap_or(mj);
    let mj = newest(mj);
    let started = Instant::now();
    // A first pass without a turn: most reconciles in a burst (a Job created, a status this
    // operator wrote) change nothing and need no API call. One that does waits for its turn and
    // then looks again from the newest MergeJob and Jobs, so that what it writes is as fresh as
    // the wait allows (and the triggers held meanwhile find nothing left to write).
    let (mj, result) = match reconcile_inner(&mj, &ctx, &mut StatusTurn::Without).await {
        Err(Stop::NeedsTurn) => {
            let permit = ctx.lanes.status_turn().await;
            let mj = newest(mj);
            let result = reconcile_inner(&mj, &ctx, &mut StatusTurn::With(permit)).await;
            (mj, result)
        }
        result => (mj, result),
    };
    let result = result.map_err(|stop| match stop {
        Stop::Failed(error) => error,
        Stop::NeedsTurn => unreachable!("a reconcile holding the turn never asks for it"),
    });
    ctx.metrics.reconciled(started.elapsed(), result.is_err());
    if result.is_ok() {
        ctx.backoff.succeeded(&backoff_key(&mj));
    }
    result
}

/// Whether a reconcile pass holds a turn in the status lane, which it needs before any call to
/// the API server or the artifact store.
enum StatusTurn<'a> {
    Without,
    With(#[allow(dead_code)] SemaphorePermit<'a>),
    /// Given back once the status is written (Job changes have their own lane).
    Released,
}

impl StatusTurn<'_> {
    /// Ok when this pass may call out; a pass without the turn stops here.
    fn check(&self) -> Result<(), Stop> {
        match self {
            StatusTurn::Without => Err(Stop::NeedsTurn),
            StatusTurn::With(_) | StatusTurn::Released => Ok(()),
        }
    }
}

/// Why a reconcile pass ended without an action.
enum Stop {
    /// It needs a turn in the status lane, which it does not hold.
    NeedsTurn,
    /// The reconcile failed.
    Failed(ReconcileError),
}

impl<E: Into<ReconcileError>> From<E> for Stop {
    fn from(error: E) -> Self {
        Stop::Failed(error.into())
    }
}

async fn reconcile_inner(mj: &MergeJob, ctx: &Arc<Context>, status_turn: &mut StatusTurn<'_>) -> Result<Action, Stop> {
    let ns = mj.namespace().unwrap_or_else(|| "default".into());
    let name = mj.name_any();
    let key = format!("{ns}/{name}");
    let generation = mj.metadata.generation.unwrap_or(1);
    if let Some(action) = handle_cleanup(mj, ctx, &ns, &*status_turn).await? {
        return Ok(action);
    }
    // One watch keeps every managed Job in memory, and the same watch triggers this reconcile, so
    // the cache already holds the change that caused it. Listing Jobs per reconcile instead was
    // most of the API server's work at hundreds of MergeJobs.
    if !ctx.jobs.ready().await {
        return Err(ReconcileError::JobCacheStopped.into());
    }
    let previous = mj.status.clone().unwrap_or_default();
    let now = Timestamp::now();
    let Some(Plan { run, mut seen, decision, changes }) = plan(mj, ctx, now) else {
        // A finished run never re-runs by itself; a result-changing edit starts the next one.
        ctx.metrics.set_phase(&key, previous.phase);
        return Ok(Action::await_change());
    };
    // A dropped straggler's stage is remembered as stopped before its Job goes, so that it is not
    // started again once the Job has left the cache.
    for change in &changes {
        if let Intervention::Delete { stage, reason: "StragglerStopped", .. } = change {
            seen.observed.jobs.insert(stage.clone(), JobState::Stopped);
        }
    }

    let layout = ArtifactLayout::new(&mj.spec.storage.prefix, &ns, &name, run.run);
    let shard_facts = read_shard_facts(mj, ctx, &previous, &run, &decision, &layout, status_turn).await?;
    let results = if decision.phase == Phase::Succeeded {
        status_turn.check()?;
        read_results(mj, ctx, &layout).await
    } else {
        None
    };
    let status = build_status(&StatusInputs { previous: &previous, generation, run: &run, spec: &mj.spec, layout: &layout, decision: &decision, jobs: &seen, shard_facts: &shard_facts, results, now });
    // An unchanged status is not written: it is the costliest call an idle reconcile would
    // make, and at hundreds of MergeJobs the API server is the bottleneck.
    // The status goes first: it is built from the Jobs observed, not from what this reconcile
    // is about to create, and it should not wait behind the Job creations of other MergeJobs.
    if mj.status.as_ref() != Some(&status) {
        status_turn.check()?;
        write_status(mj, ctx, &ns, &status).await?;
    }
    if is_transition(&previous, &run, &decision) {
        status_turn.check()?;
        publish_transition(mj, ctx, &run, &decision).await;
    }
    *status_turn = StatusTurn::Released;
    if (!decision.create.is_empty() || !changes.is_empty()) && ctx.job_work.begin(&ObjectRef::from_obj(mj), Decided::of(mj)) == Begun::StartWorker {
        tokio::spawn(job_worker(ctx.clone()));
    }
    ctx.metrics.set_phase(&key, Some(decision.phase));
    info!(run = run.run, phase = decision.phase.as_str(), reason = decision.reason, detail = %decision.message, "reconciled");

    Ok(if decision.phase.is_terminal() {
        Action::await_change()
    } else if let Some(seconds) = decision.recheck_in {
        Action::requeue(Duration::from_secs(seconds.max(1) as u64).min(RESYNC))
    } else {
        Action::requeue(RESYNC)
    })
}

/// Keeps the cleanup finalizer in step with `storage.cleanup` and, once the MergeJob is being
/// deleted, deletes its artifacts (every generation) and lets it go. `Some` ends the reconcile.
async fn handle_cleanup(mj: &MergeJob, ctx: &Context, ns: &str, status_turn: &StatusTurn<'_>) -> Result<Option<Action>, Stop> {
    let name = mj.name_any();
    let held = mj.finalizers().iter().any(|f| f == FINALIZER);
    let wanted = mj.spec.storage.cleanup == CleanupPolicy::Delete;
    if mj.metadata.deletion_timestamp.is_some() {
        if held {
            status_turn.check()?;
            let prefix = mergejob_root(&mj.spec.storage.prefix, ns, &name);
            match ctx.artifacts.remove_all(&mj.spec, &prefix).await {
                Ok(true) => publish(ctx, mj, EventType::Normal, "ArtifactsDeleted", "Cleanup", format!("deleted artifacts under {prefix}")).await,
                Ok(false) => {
                    let note = format!("the operator cannot reach this MergeJob's store; artifacts under {prefix} were left in place");
                    publish(ctx, mj, EventType::Warning, "ArtifactsLeft", "Cleanup", note).await;
                }
                Err(error) => {
                    publish(ctx, mj, EventType::Warning, "CleanupFailed", "Cleanup", error.to_string()).await;
                    return Err(ReconcileError::from(error).into());
                }
            }
            set_finalizer(mj, ctx, ns, false).await?;
        }
        return Ok(Some(Action::await_change()));
    }
    if held != wanted {
        status_turn.check()?;
        set_finalizer(mj, ctx, ns, wanted).await?;
    }
    Ok(None)
}

async fn set_finalizer(mj: &MergeJob, ctx: &Context, ns: &str, present: bool) -> Result<(), ReconcileError> {
    let name = mj.name_any();
    let mut finalizers: Vec<String> = mj.finalizers().iter().filter(|f| *f != FINALIZER).cloned().collect();
    if present {
        finalizers.push(FINALIZER.into());
    }
    // The resourceVersion makes this a compare-and-swap: other controllers' finalizers survive.
    let patch = serde_json::json!({ "metadata": { "finalizers": finalizers, "resourceVersion": mj.resource_version() } });
    let mjs: Api<MergeJob> = Api::namespaced(ctx.client.clone(), ns);
    mjs.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await.map_err(kube_err(format!("updating the finalizers of MergeJob {ns}/{name}")))?;
    Ok(())
}

/// What to do about a MergeJob, decided from it and its Jobs in the cache (no API call).
struct Plan {
    run: RunDecision,
    seen: GenerationJobs,
    decision: Decision,
    changes: Vec<Intervention>,
}

/// The plan for `mj` now; None when its run has finished (it then waits for an edit).
fn plan(mj: &MergeJob, ctx: &Context, now: Timestamp) -> Option<Plan> {
    let ns = mj.namespace().unwrap_or_else(|| "default".into());
    let name = mj.name_any();
    let generation = mj.metadata.generation.unwrap_or(1);
    let previous = mj.status.clone().unwrap_or_default();
    let run = RunDecision::of(generation, &mj.spec, &previous);
    let terminal = previous.phase.is_some_and(Phase::is_terminal);
    if run.continues && previous.observed_generation == Some(generation) && terminal {
        return None;
    }
    // Every Job of this MergeJob (all runs), shared with the cache rather than copied.
    let all_jobs = ctx.jobs.of_mergejob(&ns, &name);
    let run_label = run.run.to_string();
    let jobs: Vec<&ManagedJob> = all_jobs.iter().map(|job| &**job).filter(|job| labelled(job, LABEL_GENERATION, &run_label)).collect();
    let mut seen = observe_jobs(&jobs, now);
    if run.continues {
        seen.remember(&previous);
    }
    let decision = match ctx.images.refusal(&mj.spec.cluster.image) {
        Some(message) => Decision { create: vec![], phase: Phase::Failed, reason: "InvalidSpec", message, shards: vec![], recheck_in: None },
        None => decide(&name, &ns, run.run, &mj.spec, &seen.observed),
    };
    let changes = interventions(&all_jobs, run.run, &mj.spec, &decision);
    Some(Plan { run, seen, decision, changes })
}

/// Takes queued batches of Job changes ([`JobWork`]) until none is left.
async fn job_worker(ctx: Arc<Context>) {
    while let Some((target, decided)) = ctx.job_work.next() {
        let span = info_span!("jobs", mergejob = %target.name, namespace = target.namespace.as_deref().unwrap_or_default());
        change_jobs(&ctx, target, decided).instrument(span).await;
    }
}

/// Creates, stops, pauses and resumes a MergeJob's Jobs once no status waits for its turn, as a
/// reconcile would decide from the newest MergeJob and Jobs. A failure is retried by reconciling
/// the MergeJob again after a growing delay, and so is a batch whose MergeJob was edited or
/// deleted since its reconcile asked for it (its next reconcile decides afresh).
async fn change_jobs(ctx: &Arc<Context>, target: ObjectRef<MergeJob>, decided: Decided) {
    ctx.lanes.wait_for_statuses().await;
    let Some(mj) = ctx.mergejobs.get().and_then(|store| store.get(&target)).filter(|mj| decided.still(mj)) else {
        ctx.job_work.finish(&target, true);
        return;
    };
    let Some(Plan { run, decision, changes, .. }) = plan(&mj, ctx, Timestamp::now()) else {
        ctx.job_work.finish(&target, false);
        return;
    };
    let ns = mj.namespace().unwrap_or_else(|| "default".into());
    let result = match create_stage_jobs(&mj, ctx, &ns, run.run, &decision).await {
        Ok(()) => apply_interventions(&mj, ctx, &ns, &changes).await,
        Err(error) => Err(error),
    };
    let key = format!("jobs of {}", backoff_key(&mj));
    match result {
        Ok(()) => {
            ctx.backoff.succeeded(&key);
            ctx.job_work.finish(&target, false);
        }
        Err(error) => {
            let delay = ctx.backoff.failed(&key);
            ctx.metrics.job_changes_failed();
            warn!(%error, retry_in_ms = delay.as_millis() as u64, "changing Jobs failed; retrying");
            // The batch stays marked while it waits, so that no other starts meanwhile; the
            // worker goes on with the next.
            let ctx = ctx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                ctx.job_work.finish(&target, true);
            });
        }
    }
}

async fn create_stage_jobs(mj: &MergeJob, ctx: &Context, ns: &str, run: i64, decision: &Decision) -> Result<(), ReconcileError> {
    if decision.create.is_empty() {
        return Ok(());
    }
    let apply = PatchParams::apply(MANAGER).force();
    let cm = spec_configmap(mj, run)?;
    let cm_name = cm.metadata.name.clone().unwrap_or_default();
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    cms.patch(&cm_name, &apply, &Patch::Apply(&cm)).await.map_err(kube_err(format!("applying ConfigMap {ns}/{cm_name}")))?;
    let jobs_api: Api<Job> = Api::namespaced(ctx.client.clone(), ns);
    let excluded = decision.excluded_shards();
    // One after another: at most one creation per Job lane is in flight, so a burst of new
    // MergeJobs cannot swamp the API server (creating a MergeJob's Jobs at once made the Job
    // watch that the statuses depend on lag by tens of seconds: bench/results/operator-scale.md).
    let creations = decision.create.iter().map(|stage| {
        let job = stage_job_excluding(mj, run, stage, &excluded);
        let jobs_api = &jobs_api;
        async move {
            let job_name = job.metadata.name.clone().unwrap_or_default();
            // Create, never apply: the Job cache can lag behind a reconcile, and a Job that
            // exists (409) must not be touched or reported as started again.
            match jobs_api.create(&PostParams { field_manager: Some(MANAGER.into()), ..Default::default() }, &job).await {
                Ok(_) => Ok(Some(format!("{} as Job {job_name}", stage.name()))),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(None),
                Err(error) => Err(kube_err(format!("creating Job {ns}/{job_name}"))(error)),
            }
        }
    });
    let mut outcomes = Vec::with_capacity(decision.create.len());
    for creation in creations {
        outcomes.push(creation.await);
    }
    let started: Vec<String> = outcomes.iter().filter_map(|o| o.as_ref().ok().cloned().flatten()).collect();
    let created = started.len();
    if !started.is_empty() {
        info!(stages = %started.join(", "), "stage Jobs created");
        // One Event per reconcile, not per Job: at a burst of MergeJobs the Events were as many
        // API calls as the Jobs themselves.
        let note = format!("started {} {}", if created == 1 { "stage" } else { "stages" }, started.join(", "));
        publish(ctx, mj, EventType::Normal, "StageStarted", "CreateJob", note).await;
    }
    ctx.metrics.jobs_created(created);
    outcomes.into_iter().find_map(Result::err).map_or(Ok(()), Err)
}

/// Shard training summaries for shards whose vector is ready; values already in the status
/// are reused so the store is read once per shard.
async fn read_shard_facts(
    mj: &MergeJob,
    ctx: &Context,
    previous: &MergeJobStatus,
    run: &RunDecision,
    decision: &Decision,
    layout: &ArtifactLayout,
    status_turn: &StatusTurn<'_>,
) -> Result<ShardFacts, Stop> {
    let mut facts = ShardFacts::new();
    for (shard, state) in &decision.shards {
        let known = previous.shards.iter().find(|s| &s.name == shard && run.continues && s.samples.is_some());
        if let Some(s) = known {
            facts.insert(shard.clone(), ShardFact { samples: s.samples, validation_accuracy: s.validation_accuracy, release: s.release.clone() });
        } else if *state == ShardState::Ready && ctx.artifacts.reaches(&mj.spec) {
            status_turn.check()?;
            match ctx.artifacts.get(&mj.spec, &layout.shard_metrics(shard)).await {
                Ok(Some(bytes)) => {
                    facts.insert(shard.clone(), shard_summary(&bytes));
                }
                Ok(None) => {}
                Err(error) => warn!(%error, shard = %shard, "could not read the shard's training summary"),
            }
        }
    }
    Ok(facts)
}

async fn read_results(mj: &MergeJob, ctx: &Context, layout: &ArtifactLayout) -> Option<medmerge_crds::ResultsStatus> {
    let key = layout.eval_metrics();
    match ctx.artifacts.get(&mj.spec, &key).await {
        Ok(Some(bytes)) => match results_from_report(&bytes, &mj.spec, layout) {
            Ok(results) => Some(results),
            Err(error) => {
                warn!(%error, "the evaluation report is unreadable; results stay in the store only");
                None
            }
        },
        Ok(None) => {
            warn!(%key, "no evaluation report reachable from the operator; results stay in the store only");
            None
        }
        Err(error) => {
            warn!(%error, "reading the evaluation report failed");
            None
        }
    }
}

async fn write_status(mj: &MergeJob, ctx: &Context, ns: &str, status: &MergeJobStatus) -> Result<(), ReconcileError> {
    let name = mj.name_any();
    // The operator is the status's only writer and writes all of it: one JSON patch that replaces
    // it costs the API server a fraction of a server-side apply, which merges and records
    // ownership field by field (the status writes of a burst of MergeJobs queue behind it).
    let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([{ "op": "add", "path": "/status", "value": status }])).expect("one add operation is a JSON patch");
    let mjs: Api<MergeJob> = Api::namespaced(ctx.client.clone(), ns);
    mjs.patch_status(&name, &PatchParams { field_manager: Some(MANAGER.into()), ..Default::default() }, &Patch::Json::<()>(patch))
        .await
        .map_err(kube_err(format!("writing the status of MergeJob {ns}/{name}")))?;
    Ok(())
}

/// Stops, pauses and resumes Jobs as [`interventions`] said, with an Event for each Job stopped.
/// A Job already gone is no error. Where the API server drops `spec.suspend` (Kubernetes before
/// 1.21), a Job that cannot be paused is deleted instead, and its stage starts again on resume.
async fn apply_interventions(mj: &MergeJob, ctx: &Context, ns: &str, changes: &[Intervention]) -> Result<(), ReconcileError> {
    let jobs_api: Api<Job> = Api::namespaced(ctx.client.clone(), ns);
    let gone = |e: &kube::Error| matches!(e, kube::Error::Api(status) if status.code == 404);
    for change in changes {
        let (job, pause) = match change {
            Intervention::Delete { job, reason, note, .. } => {
                match jobs_api.delete(job, &DeleteParams::background()).await {
                    Ok(_) => publish(ctx, mj, EventType::Normal, reason, "StopJob", note.clone()).await,
                    Err(e) if gone(&e) => {}
                    Err(e) => return Err(kube_err(format!("deleting Job {ns}/{job}"))(e)),
                }
                continue;
            }
            Intervention::Pause { job } => (job, true),
            Intervention::Resume { job } => (job, false),
        };
        let patch = serde_json::json!({ "metadata": { "annotations": { PAUSED: pause.then_some("true") } }, "spec": { "suspend": pause } });
        let patched = match jobs_api.patch(job, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(patched) => patched,
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(kube_err(format!("{} Job {ns}/{job}", if pause { "suspending" } else { "resuming" }))(e)),
        };
        let held = patched.spec.as_ref().and_then(|s| s.suspend) == Some(true);
        if pause && !held {
            match jobs_api.delete(job, &DeleteParams::background()).await {
                Err(e) if !gone(&e) => return Err(kube_err(format!("deleting Job {ns}/{job}"))(e)),
                _ => {}
            }
            let note = format!("stopped Job {job} while the MergeJob is suspended: this API server keeps no Job spec.suspend (Kubernetes < 1.21); its stage starts again on resume");
            publish(ctx, mj, EventType::Normal, "SuspendedJobStopped", "StopJob", note).await;
        } else {
            let (reason, note) = if pause { ("JobPaused", format!("suspended Job {job}: its pods stop, it resumes with the MergeJob")) } else { ("JobResumed", format!("resumed Job {job}")) };
            publish(ctx, mj, EventType::Normal, reason, if pause { "SuspendJob" } else { "ResumeJob" }, note).await;
        }
    }
    Ok(())
}

/// Whether this reconcile moves the MergeJob's run to another phase (or starts a run).
fn is_transition(previous: &MergeJobStatus, run: &RunDecision, decision: &Decision) -> bool {
    !run.continues || previous.phase != Some(decision.phase)
}

async fn publish_transition(mj: &MergeJob, ctx: &Context, run: &RunDecision, decision: &Decision) {
    let (kind, reason) = match decision.phase {
        Phase::Failed => (EventType::Warning, decision.reason),
        Phase::Succeeded => (EventType::Normal, "Succeeded"),
        _ => (EventType::Normal, decision.phase.as_str()),
    };
    let note = format!("run {}: {} ({})", run.run, decision.phase.as_str(), decision.message);
    publish(ctx, mj, kind, reason, "Reconcile", note).await;
}

async fn publish(ctx: &Context, mj: &MergeJob, type_: EventType, reason: &str, action: &str, note: String) {
    let event = Event { type_, reason: reason.into(), note: Some(note.chars().take(1000).collect()), action: action.into(), secondary: None };
    if let Err(error) = ctx.recorder.publish(&event, &mj.object_ref(&())).await {
        warn!(%error, reason, "publishing an Event failed");
    }
}

/// Retries a failed reconcile: soon after a first failure, backing off while it keeps failing.
/// (A fixed 15 s pause here made MergeJobs whose reconcile hit an overloaded API server hear of
/// their finished Jobs 13-15 s late: bench/results/operator-scale.md.)
pub fn error_policy(mj: Arc<MergeJob>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    let delay = ctx.backoff.failed(&backoff_key(&mj));
    warn!(mergejob = %mj.name_any(), %error, retry_in_ms = delay.as_millis() as u64, "reconcile failed; retrying");
    Action::requeue(delay)
}

fn backoff_key(mj: &MergeJob) -> String {
    format!("{}/{}", mj.namespace().unwrap_or_default(), mj.name_any())
}

/// Runs the controller until a shutdown signal arrives or `stop` completes, feeding `cache`
/// (whose [`Store`] is `ctx.jobs`) from the watch on managed Jobs and reconciling at most
/// `ctx`'s concurrency of MergeJobs at once ([`Context::with_concurrency`]), in the order their
/// changes arrived.
pub async fn run(mjs: Api<MergeJob>, jobs: Api<ManagedJob>, mut cache: JobCacheWriter, ctx: Arc<Context>, stop: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let job_changes = watcher(jobs, watcher::Config::default().labels(MANAGED_JOBS))
        .default_backoff()
        .modify(trim_for_cache)
        .map_ok(move |event| {
            cache.apply_watcher_event(&event);
            event
        })
        .touched_objects();
    let (mergejob_store, mergejob_cache) = reflector::store();
    let mergejob_changes = watcher(mjs, watcher::Config::default()).default_backoff().modify(trim_mergejob_for_cache).reflect(mergejob_cache).applied_objects();
    let mut controller = Controller::for_stream(mergejob_changes, mergejob_store);
    if let Some(again) = ctx.job_work.take_requests() {
        controller = controller.reconcile_on(again);
    }
    let _ = ctx.mergejobs.set(controller.store());
    controller
        .owns_stream(job_changes)
        // Unbounded: the limits are the lanes in `reconcile`, which are fair.
        .with_config(controller::Config::default().concurrency(0))
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}
