//! The reconcile loop: observe (the MergeJob's Jobs of its current generation and what the
//! artifact store holds) -> decide (pure) -> apply (server-side apply of the spec ConfigMap and
//! new stage Jobs, then the status), with an Event for every stage transition.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::store::{Writer, WriterDropped};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use medmerge_crds::{mergejob_root, ArtifactLayout, CleanupPolicy, MergeJob, MergeJobStatus};
use tracing::{info, instrument, warn};

use crate::artifacts::{results_from_report, shard_summary, ArtifactError, ArtifactStore};
use crate::decide::{decide, Decision, Phase, ShardState};
use crate::jobs::{exclude_shards, spec_configmap, stage_job, LABEL_GENERATION, LABEL_MERGEJOB};
use crate::observe::observe_jobs;
use crate::status::{build_status, ShardFacts, StatusInputs};
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
    /// The Job cache stopped before it first filled (the operator is shutting down).
    #[error("waiting for the Job cache: {0}")]
    JobCache(#[from] WriterDropped),
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
    pub jobs: Store<Job>,
}

impl Context {
    /// A context whose Events are reported as `instance` of the operator.
    pub fn new(client: Client, instance: &str, metrics: Arc<Metrics>, artifacts: ArtifactStore, jobs: Store<Job>) -> Self {
        let reporter = Reporter { controller: MANAGER.into(), instance: Some(instance.into()) };
        Context { recorder: Recorder::new(client.clone(), reporter), client, metrics, artifacts, jobs }
    }
}

/// An empty Job cache: the [`Store`] goes into the [`Context`], the [`Writer`] to [`run`].
pub fn job_cache() -> (Store<Job>, Writer<Job>) {
    reflector::store()
}

/// The Jobs of one MergeJob generation, from the cache.
fn generation_jobs(cache: &Store<Job>, ns: &str, name: &str, generation: i64) -> Vec<Job> {
    let generation = generation.to_string();
    let labelled = |job: &Job, key: &str, value: &str| job.metadata.labels.as_ref().and_then(|l| l.get(key)).is_some_and(|v| v == value);
    cache
        .state()
        .iter()
        .filter(|job| job.metadata.namespace.as_deref() == Some(ns) && labelled(job, LABEL_MERGEJOB, name) && labelled(job, LABEL_GENERATION, &generation))
        .map(|job| Job::clone(job))
        .collect()
}

/// Reconciles one MergeJob.
#[instrument(skip_all, fields(mergejob = %mj.name_any(), namespace = mj.namespace().unwrap_or_default(), generation = mj.metadata.generation))]
pub async fn reconcile(mj: Arc<MergeJob>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let started = Instant::now();
    let result = reconcile_inner(&mj, &ctx).await;
    ctx.metrics.reconciled(started.elapsed(), result.is_err());
    result
}

async fn reconcile_inner(mj: &MergeJob, ctx: &Context) -> Result<Action, ReconcileError> {
    let ns = mj.namespace().unwrap_or_else(|| "default".into());
    let name = mj.name_any();
    let key = format!("{ns}/{name}");
    let generation = mj.metadata.generation.unwrap_or(1);
    if let Some(action) = handle_cleanup(mj, ctx, &ns).await? {
        return Ok(action);
    }
    let previous = mj.status.clone().unwrap_or_default();
    let terminal = matches!(previous.phase.as_deref(), Some("Succeeded") | Some("Failed"));
    if previous.observed_generation == Some(generation) && terminal {
        // A finished generation never re-runs by itself; a spec edit starts the next one.
        ctx.metrics.set_phase(&key, previous.phase.as_deref());
        return Ok(Action::await_change());
    }

    // One watch keeps every managed Job in memory, and the same watch triggers this reconcile, so
    // the cache already holds the change that caused it. Listing Jobs per reconcile instead was
    // most of the API server's work at hundreds of MergeJobs.
    ctx.jobs.wait_until_ready().await?;
    let jobs = generation_jobs(&ctx.jobs, &ns, &name, generation);
    let now = Timestamp::now();
    let mut seen = observe_jobs(&jobs, now);
    if previous.observed_generation == Some(generation) {
        seen.remember(&previous);
    }
    let decision = decide(&name, &ns, generation, &mj.spec, &seen.observed);

    create_stage_jobs(mj, ctx, &ns, generation, &decision).await?;

    let layout = ArtifactLayout::new(&mj.spec.storage.prefix, &ns, &name, generation);
    let shard_facts = read_shard_facts(mj, ctx, &previous, generation, &decision, &layout).await;
    let results = if decision.phase == Phase::Succeeded { read_results(mj, ctx, &layout).await } else { None };
    let status = build_status(&StatusInputs { previous: &previous, generation, spec: &mj.spec, layout: &layout, decision: &decision, jobs: &seen, shard_facts: &shard_facts, results, now });
    // An unchanged status is not written: server-side apply is the costliest call an idle
    // reconcile would make, and at hundreds of MergeJobs the API server is the bottleneck.
    if mj.status.as_ref() != Some(&status) {
        write_status(mj, ctx, &ns, &status).await?;
    }
    publish_transition(mj, ctx, &previous, generation, &decision).await;
    ctx.metrics.set_phase(&key, Some(decision.phase.as_str()));
    info!(phase = decision.phase.as_str(), reason = decision.reason, message = %decision.message, "reconciled");

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
async fn handle_cleanup(mj: &MergeJob, ctx: &Context, ns: &str) -> Result<Option<Action>, ReconcileError> {
    let name = mj.name_any();
    let held = mj.finalizers().iter().any(|f| f == FINALIZER);
    let wanted = mj.spec.storage.cleanup == CleanupPolicy::Delete;
    if mj.metadata.deletion_timestamp.is_some() {
        if held {
            let prefix = mergejob_root(&mj.spec.storage.prefix, ns, &name);
            match ctx.artifacts.remove_all(&mj.spec, &prefix).await {
                Ok(true) => publish(ctx, mj, EventType::Normal, "ArtifactsDeleted", "Cleanup", format!("deleted artifacts under {prefix}")).await,
                Ok(false) => {
                    let note = format!("the operator cannot reach this MergeJob's store; artifacts under {prefix} were left in place");
                    publish(ctx, mj, EventType::Warning, "ArtifactsLeft", "Cleanup", note).await;
                }
                Err(error) => {
                    publish(ctx, mj, EventType::Warning, "CleanupFailed", "Cleanup", error.to_string()).await;
                    return Err(error.into());
                }
            }
            set_finalizer(mj, ctx, ns, false).await?;
        }
        return Ok(Some(Action::await_change()));
    }
    if held != wanted {
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

async fn create_stage_jobs(mj: &MergeJob, ctx: &Context, ns: &str, generation: i64, decision: &Decision) -> Result<(), ReconcileError> {
    if decision.create.is_empty() {
        return Ok(());
    }
    let apply = PatchParams::apply(MANAGER).force();
    let cm = spec_configmap(mj, generation)?;
    let cm_name = cm.metadata.name.clone().unwrap_or_default();
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    cms.patch(&cm_name, &apply, &Patch::Apply(&cm)).await.map_err(kube_err(format!("applying ConfigMap {ns}/{cm_name}")))?;
    let jobs_api: Api<Job> = Api::namespaced(ctx.client.clone(), ns);
    let mut created = 0;
    for stage in &decision.create {
        let mut job = stage_job(mj, generation, stage);
        exclude_shards(&mut job, &decision.excluded_shards());
        let job_name = job.metadata.name.clone().unwrap_or_default();
        // Create, never apply: the Job cache can lag behind a reconcile, and a Job that exists
        // (409) must not be touched or reported as started again.
        match jobs_api.create(&PostParams { field_manager: Some(MANAGER.into()), ..Default::default() }, &job).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(error) => return Err(kube_err(format!("creating Job {ns}/{job_name}"))(error)),
        }
        created += 1;
        info!(stage = %stage.name(), job = %job_name, "stage Job created");
        publish(ctx, mj, EventType::Normal, "StageStarted", "CreateJob", format!("started stage {} as Job {job_name}", stage.name())).await;
    }
    ctx.metrics.jobs_created(created);
    Ok(())
}

/// Shard training summaries for shards whose vector is ready; values already in the status
/// are reused so the store is read once per shard.
async fn read_shard_facts(mj: &MergeJob, ctx: &Context, previous: &MergeJobStatus, generation: i64, decision: &Decision, layout: &ArtifactLayout) -> ShardFacts {
    let mut facts = ShardFacts::new();
    for (shard, state) in &decision.shards {
        let known = previous.shards.iter().find(|s| &s.name == shard && previous.observed_generation == Some(generation) && s.samples.is_some());
        if let Some(s) = known {
            facts.insert(shard.clone(), (s.samples, s.validation_accuracy));
        } else if *state == ShardState::Ready {
            match ctx.artifacts.get(&mj.spec, &layout.shard_metrics(shard)).await {
                Ok(Some(bytes)) => {
                    facts.insert(shard.clone(), shard_summary(&bytes));
                }
                Ok(None) => {}
                Err(error) => warn!(%error, shard = %shard, "could not read the shard's training summary"),
            }
        }
    }
    facts
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
    let patch = serde_json::json!({ "apiVersion": "medmerge.io/v1alpha1", "kind": "MergeJob", "status": status });
    let mjs: Api<MergeJob> = Api::namespaced(ctx.client.clone(), ns);
    mjs.patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await.map_err(kube_err(format!("writing the status of MergeJob {ns}/{name}")))?;
    Ok(())
}

async fn publish_transition(mj: &MergeJob, ctx: &Context, previous: &MergeJobStatus, generation: i64, decision: &Decision) {
    let new_generation = previous.observed_generation != Some(generation);
    if !new_generation && previous.phase.as_deref() == Some(decision.phase.as_str()) {
        return;
    }
    let (kind, reason) = match decision.phase {
        Phase::Failed => (EventType::Warning, decision.reason),
        Phase::Succeeded => (EventType::Normal, "Succeeded"),
        _ => (EventType::Normal, decision.phase.as_str()),
    };
    let note = format!("generation {generation}: {} ({})", decision.phase.as_str(), decision.message);
    publish(ctx, mj, kind, reason, "Reconcile", note).await;
}

async fn publish(ctx: &Context, mj: &MergeJob, type_: EventType, reason: &str, action: &str, note: String) {
    let event = Event { type_, reason: reason.into(), note: Some(note.chars().take(1000).collect()), action: action.into(), secondary: None };
    if let Err(error) = ctx.recorder.publish(&event, &mj.object_ref(&())).await {
        warn!(%error, reason, "publishing an Event failed");
    }
}

/// Retries a failed reconcile after a pause, so API hiccups do not spin.
pub fn error_policy(mj: Arc<MergeJob>, error: &ReconcileError, _ctx: Arc<Context>) -> Action {
    warn!(mergejob = %mj.name_any(), %error, "reconcile failed; retrying in 15 s");
    Action::requeue(Duration::from_secs(15))
}

/// Runs the controller until a shutdown signal arrives or `stop` completes, feeding `cache`
/// (whose [`Store`] is `ctx.jobs`) from the watch on managed Jobs and reconciling at most
/// `concurrency` MergeJobs at once.
pub async fn run(mjs: Api<MergeJob>, jobs: Api<Job>, cache: Writer<Job>, ctx: Arc<Context>, concurrency: u16, stop: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let job_changes = watcher(jobs, watcher::Config::default().labels(MANAGED_JOBS))
        .default_backoff()
        // Field-manager bookkeeping is most of a Job's size and none of what the operator reads.
        .modify(|job| job.metadata.managed_fields = None)
        .reflect(cache)
        .touched_objects();
    Controller::new(mjs, watcher::Config::default())
        .owns_stream(job_changes)
        .with_config(controller::Config::default().concurrency(concurrency))
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}
