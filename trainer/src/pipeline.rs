//! A whole MergeJob (or one stage of it), in process, against its artifact store: a local
//! directory (the embedded default) or an S3 bucket.
//!
//! The loop asks the stage plan which stages are ready given the artifacts that exist, runs the
//! first, and repeats. A stage writes into a private staging directory and its results are then
//! published without replacing anything (see [`crate::publish`]), so an interrupted run resumes
//! where it stopped, never reads half a file, and two runners on one MergeJob end with one
//! consistent run or a clear refusal. With S3, stages read from a local cache: a stage's inputs
//! are downloaded (SHA-256 verified) before it runs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use medmerge_crds::plan::{Candidate, CandidateKind, PlannedStage};
use medmerge_crds::{validate_for_local, ArtifactLayout, MergeJob, MergeJobSpec, ModelSpec, Stage, StagePlan, WeightsSource};
use tch::Device;
use tracing::info;

use crate::checkpoint::file_digest;
use crate::checkpoint::{ArtifactKind, ArtifactMeta};
use crate::clinical::{explain_sample, heat_study, roc_and_operating_point};
use crate::data::Dataset;
use crate::evaluate::{predict, score};
use crate::merge::{merge_checked, shard_model, MergeOptions, ShardVector};
use crate::metrics::cosine;
use crate::model::{builtin_weights_path, ModelError, Network, BUILTIN_WEIGHTS_HINT};
use crate::publish::{run_provenance, verify_run, Provenance, StageLease, StageLock, Staging};
use crate::release::encoding::VectorReader;
use crate::report::{CandidateResult, EvalReport, LayerSimilarity};
use crate::restore::rounds::{combine, epoch_settings, shard_part};
use crate::st::{write_atomic, MappedFile};
use crate::train::train;
use medmerge_store::{BlockingStore, S3Config};

/// A loaded MergeJob and the directory its relative paths are relative to.
pub struct Job {
    /// The resource.
    pub job: MergeJob,
    /// Directory of the YAML file.
    pub dir: PathBuf,
}

impl Job {
    /// Reads and validates a MergeJob YAML file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read MergeJob {}: {e}", path.display()))?;
        let job = parse_strict(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        // Both name directories of the store, as the API server would insist they be names.
        for (field, value) in [("metadata.name", &job.metadata.name), ("metadata.namespace", &job.metadata.namespace)] {
            if let Some(v) = value.as_deref().filter(|v| !medmerge_crds::is_dns_subdomain(v)) {
                anyhow::bail!("{}: {field} {v:?} must be a DNS subdomain (lowercase letters, digits, '-' and '.', at most 253 characters), as Kubernetes requires", path.display());
            }
        }
        if let Err(errors) = validate_for_local(&job.spec) {
            let lines: Vec<String> = errors.iter().map(|e| format!("  - {e}")).collect();
            anyhow::bail!("{}: invalid MergeJob:\n{}", path.display(), lines.join("\n"));
        }
        Ok(Job { job, dir: path.parent().map(Path::to_path_buf).unwrap_or_default() })
    }

    fn spec(&self) -> &MergeJobSpec {
        &self.job.spec
    }

    /// Leaves out shards the operator dropped (failed, or past the straggler deadline) after
    /// the run started: later stages plan, merge, restore and evaluate without them.
    pub fn exclude_shards(&mut self, names: &[String]) -> anyhow::Result<()> {
        for name in names {
            if !self.job.spec.shards.iter().any(|s| &s.name == name) {
                anyhow::bail!("--exclude-shard {name}: no such shard in this MergeJob");
            }
        }
        self.job.spec.shards.retain(|s| !names.contains(&s.name));
        if self.job.spec.shards.is_empty() {
            anyhow::bail!("--exclude-shard: every shard would be excluded");
        }
        Ok(())
    }

    /// A path from the spec, relative to the YAML file's directory.
    pub fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.into()
        } else {
            self.dir.join(p)
        }
    }

    /// The artifact layout of this run.
    pub fn layout(&self) -> ArtifactLayout {
        let name = self.job.metadata.name.clone().unwrap_or_else(|| "mergejob".into());
        let ns = self.job.metadata.namespace.clone().unwrap_or_else(|| "local".into());
        ArtifactLayout::new(&self.spec().storage.prefix, &ns, &name, self.job.metadata.generation.unwrap_or(1))
    }

    /// The local artifact directory: the store itself, or the local cache of an S3 store
    /// (`$MEDMERGE_ARTIFACT_CACHE`, default `<tmp>/medmerge-artifact-cache/<bucket>`).
    pub fn store_root(&self) -> PathBuf {
        if let Some(s3) = &self.spec().storage.s3 {
            let cache = std::env::var_os("MEDMERGE_ARTIFACT_CACHE").map(PathBuf::from).unwrap_or_else(|| std::env::temp_dir().join("medmerge-artifact-cache"));
            return cache.join(&s3.bucket);
        }
        self.resolve(&self.spec().storage.local.as_ref().map(|l| l.path.clone()).unwrap_or_else(|| "medmerge-artifacts".into()))
    }

    /// Where to read a data source: a local path (relative to the YAML), or for `s3://` URLs
    /// the local copy in `$MEDMERGE_DATA_CACHE` (default `<tmp>/medmerge-data-cache`).
    pub fn data_path(&self, path: &str, credentials: Option<(String, String)>) -> anyhow::Result<PathBuf> {
        if crate::remote_data::parse_s3_url(path).is_none() {
            return Ok(self.resolve(path));
        }
        let cache = std::env::var_os("MEDMERGE_DATA_CACHE").map(PathBuf::from).unwrap_or_else(|| std::env::temp_dir().join("medmerge-data-cache"));
        crate::remote_data::materialise(path, self.spec(), credentials, &cache)
    }

    /// The S3 store of the job, if it uses one (credentials from the standard AWS chain).
    pub fn remote_store(&self) -> anyhow::Result<Option<BlockingStore>> {
        let Some(s3) = &self.spec().storage.s3 else { return Ok(None) };
        Ok(Some(BlockingStore::s3(S3Config::from_spec(s3))?))
    }
}

/// The resource type a MergeJob file must declare.
const API_VERSION: &str = "medmerge.io/v1alpha1";

/// Parses a MergeJob as strictly as the API server would store it: a wrong or missing
/// `apiVersion`/`kind` and any field the schema does not know (which the API server would
/// silently prune, e.g. a misspelt `lamda`) are refused, naming the field's path.
pub fn parse_strict(text: &str) -> anyhow::Result<MergeJob> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct TypeMeta {
        api_version: Option<String>,
        kind: Option<String>,
    }
    let head: TypeMeta = serde_yaml::from_str(text).map_err(|e| anyhow::anyhow!("not a valid MergeJob: {e}"))?;
    anyhow::ensure!(head.api_version.as_deref() == Some(API_VERSION), "apiVersion {:?} is not {API_VERSION}", head.api_version.unwrap_or_default());
    anyhow::ensure!(head.kind.as_deref() == Some("MergeJob"), "kind {:?} is not MergeJob", head.kind.unwrap_or_default());
    let mut unknown = Vec::new();
    let job: MergeJob = serde_ignored::deserialize(serde_yaml::Deserializer::from_str(text), |path| {
        let path = kubectl_path(&path.to_string());
        if path != "apiVersion" && path != "kind" {
            unknown.push(path);
        }
    })
    .map_err(|e| anyhow::anyhow!("not a valid MergeJob: {e}"))?;
    anyhow::ensure!(
        unknown.is_empty(),
        "unknown field{} {} (not in the MergeJob schema: `kubectl explain mergejob.spec` lists the fields)",
        if unknown.len() > 1 { "s" } else { "" },
        unknown.join(", ")
    );
    Ok(job)
}

/// `spec.shards.0.colour` as `kubectl explain` and `validate` write it: `spec.shards[0].colour`.
fn kubectl_path(dotted: &str) -> String {
    let mut out = String::new();
    for segment in dotted.split('.') {
        if !out.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(segment);
        }
    }
    out
}

/// Runs stages of one job until the plan is complete.
pub struct Runner {
    job: Job,
    layout: ArtifactLayout,
    plan: StagePlan,
    root: PathBuf,
    classes: Vec<String>,
    device: Device,
    /// The S3 store when the job uses one (stages then read from the local cache at `root`).
    remote: Option<BlockingStore>,
    /// Where results are published: `remote`'s bucket, or the local store at `root`.
    local: BlockingStore,
}

/// How often `wait_for_vector` looks for an external vector.
const VECTOR_POLL: std::time::Duration = std::time::Duration::from_secs(10);

impl Runner {
    /// Prepares a run of `job` on `device`.
    pub fn new(job: Job, device: Device) -> anyhow::Result<Self> {
        let layout = job.layout();
        let plan = StagePlan::new(job.spec(), &layout);
        let root = job.store_root();
        let remote = job.remote_store()?;
        let local = BlockingStore::local(&root)?;
        let classes = if job.spec().model.classes.is_empty() { classes_in_data(&job)? } else { job.spec().model.classes.clone() };
        Ok(Runner { job, layout, plan, root, classes, device, remote, local })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn existing(&self) -> anyhow::Result<BTreeSet<String>> {
        let keys = self.plan.keys().into_iter();
        Ok(match &self.remote {
            Some(remote) => {
                let published: BTreeSet<String> = remote.list(self.layout.root())?.into_iter().collect();
                keys.filter(|k| published.contains(k)).collect()
            }
            None => keys.filter(|k| self.path(k).exists()).collect(),
        })
    }

    /// Makes `key` available in the local directory (downloading it from S3 if needed).
    fn fetch(&self, key: &str) -> anyhow::Result<()> {
        if let Some(remote) = &self.remote {
            if !self.path(key).exists() {
                remote.get_file(key, &self.path(key))?;
            }
        }
        Ok(())
    }

    /// Everything a stage opens: its declared reads, the base model (every stage after init
    /// reads its metadata), and for evaluation every artifact of the run (it compares them all).
    fn inputs_of(&self, planned: &PlannedStage) -> anyhow::Result<BTreeSet<String>> {
        let mut keys: BTreeSet<String> = planned.reads.iter().cloned().collect();
        match planned.stage {
            Stage::Init => {}
            Stage::Evaluate => keys.extend(self.existing()?),
            _ => {
                keys.insert(self.layout.base());
            }
        }
        Ok(keys)
    }

    /// Runs a stage under its lock, and with S3 its lease (another runner that finished it first
    /// leaves nothing to do), after sweeping killed processes' temporary files: inputs fetched and their digests taken, the stage run into a staging directory,
    /// then everything it wrote published without replacing anything, its provenance record
    /// before the declared outputs.
    fn execute_published(&self, planned: &PlannedStage) -> anyhow::Result<()> {
        let name = planned.stage.name();
        let _lock = StageLock::acquire(&self.root, self.layout.root(), &name)?;
        let _lease = self.remote.as_ref().map(|remote| StageLease::acquire(remote, &self.layout.lease(&planned.stage), &name)).transpose()?;
        medmerge_store::scratch::sweep_temporaries(&self.path(self.layout.root()));
        let exists = self.existing()?;
        if planned.writes.iter().all(|w| exists.contains(w)) {
            info!(stage = %name, "another runner finished this stage");
            return Ok(());
        }
        let mut inputs = std::collections::BTreeMap::new();
        for key in self.inputs_of(planned)? {
            self.fetch(&key)?;
            inputs.insert(key.clone(), file_digest(&self.path(&key))?);
        }
        let staging = Staging::new(&self.root, &name)?;
        self.execute(planned, &staging)?;
        let outputs = staging.keys()?.into_iter().map(|k| Ok((k.clone(), file_digest(&staging.path(&k))?))).collect::<anyhow::Result<_>>()?;
        let provenance = Provenance { stage: name.clone(), inputs, outputs };
        let record = self.layout.provenance(&planned.stage);
        let publish_to = self.remote.as_ref().unwrap_or(&self.local);
        write_atomic(&staging.path(&record), &serde_json::to_vec_pretty(&provenance)?)?;
        let published = staging.publish(publish_to, &planned.writes)?;
        if self.remote.is_some() {
            // Later stages in this process read the cache: keep what was just uploaded (staging
            // lies inside the cache directory, so this is a rename).
            for key in published.keys() {
                if let Some(dir) = self.path(key).parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::rename(staging.path(key), self.path(key))?;
            }
        }
        Ok(())
    }

    /// Checks that every stage's inputs are still the artifacts published now.
    fn verify_consistent(&self) -> anyhow::Result<()> {
        let store = self.remote.as_ref().unwrap_or(&self.local);
        verify_run(&run_provenance(store, &self.layout)?, |key| Ok(store.digest(key)?))
    }

    /// Runs every remaining stage; returns the evaluation report.
    pub fn run(&self) -> anyhow::Result<EvalReport> {
        loop {
            let exists = self.existing()?;
            if self.plan.is_complete(&exists) {
                break;
            }
            let ready = self.plan.ready(&exists);
            let Some(stage) = ready.first() else {
                anyhow::bail!("run {} stalled: no stage is ready but the plan is incomplete", self.layout.root());
            };
            let started = Instant::now();
            info!(stage = %stage.stage.name(), "stage started");
            self.execute_published(stage).map_err(|e| e.context(format!("stage {} failed", stage.stage.name())))?;
            info!(stage = %stage.stage.name(), seconds = started.elapsed().as_secs_f64(), "stage done");
        }
        self.fetch(&self.layout.eval_metrics())?;
        let text = std::fs::read_to_string(self.path(&self.layout.eval_metrics()))?;
        Ok(serde_json::from_str(&text)?)
    }

    /// Runs one stage by name (as `StagePlan` names them, e.g. `finetune-hospital-a`): what a
    /// cluster Job or a hospital's own machine runs. A stage already done is not redone; a stage
    /// whose inputs are missing is refused, naming them.
    pub fn run_stage(&self, name: &str) -> anyhow::Result<()> {
        let planned = self.plan.stages.iter().find(|p| p.stage.name() == name).ok_or_else(|| {
            let names: Vec<String> = self.plan.stages.iter().map(|p| p.stage.name()).collect();
            anyhow::anyhow!("no stage {name:?} in this MergeJob; its stages are: {}", names.join(", "))
        })?;
        let exists = self.existing()?;
        if planned.writes.iter().all(|w| exists.contains(w)) {
            info!(stage = name, "stage already done");
            return Ok(());
        }
        let missing: Vec<&String> = planned.reads.iter().filter(|r| !exists.contains(*r)).collect();
        if !missing.is_empty() {
            anyhow::bail!("stage {name} cannot run yet: missing {}", missing.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", "));
        }
        self.execute_published(planned).map_err(|e| e.context(format!("stage {name} failed")))
    }

    /// For a `collect-<shard>` stage, waits up to `timeout` for the hospital's vector to appear
    /// (it is uploaded whenever the hospital finishes training); for a secure-sum merge stage,
    /// for the survivors' dropout shares about hospitals that dropped out; other stages return
    /// at once. Hospitals should write files under a temporary name and rename them, so they
    /// appear whole.
    pub fn wait_for_vector(&self, stage: &str, timeout: std::time::Duration) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        let pause = || std::thread::sleep(VECTOR_POLL.min(deadline.saturating_duration_since(std::time::Instant::now())));
        if stage.starts_with("merge-") && self.job.spec().merge.secure_sum.is_some() {
            while let Err(missing) = self.dropout_shares() {
                if std::time::Instant::now() >= deadline {
                    return Ok(());
                }
                info!(stage, why = %missing, "waiting for dropout shares");
                pause();
            }
            return Ok(());
        }
        let Some(src) = self.job.spec().shards.iter().find(|s| format!("collect-{}", s.name) == stage).and_then(|s| s.vector.as_ref()) else {
            return Ok(());
        };
        loop {
            let (arrived, location) = match &self.remote {
                Some(remote) => (remote.exists(src)?, remote.location(src)),
                None => (self.job.resolve(src).exists(), self.job.resolve(src).display().to_string()),
            };
            if arrived || std::time::Instant::now() >= deadline {
                return Ok(());
            }
            info!(stage, vector = %location, "waiting for the hospital's vector");
            pause();
        }
    }

    /// Each stage with its state: `done`, `ready` or `waiting`.
    pub fn status(&self) -> anyhow::Result<Vec<(String, &'static str)>> {
        let exists = self.existing()?;
        Ok(self
            .plan
            .stages
            .iter()
            .map(|p| {
                let state = if p.writes.iter().all(|w| exists.contains(w)) {
                    "done"
                } else if p.reads.iter().all(|r| exists.contains(r)) {
                    "ready"
                } else {
                    "waiting"
                };
                (p.stage.name(), state)
            })
            .collect())
    }

    fn shard_data(&self, shard: &str) -> anyhow::Result<Dataset> {
        let s = self.job.spec().shards.iter().find(|s| s.name == shard).ok_or_else(|| anyhow::anyhow!("unknown shard {shard}"))?;
        let d = s.data.as_ref().ok_or_else(|| anyhow::anyhow!("shard {shard} has no data"))?;
        let path = self.job.data_path(&d.path, crate::remote_data::shard_credentials()?).map_err(|e| e.context(format!("shard {shard}")))?;
        Dataset::open(&path, Some(&self.classes)).map_err(|e| anyhow::anyhow!("shard {shard}: {e}"))
    }

    fn base_meta(&self) -> anyhow::Result<ArtifactMeta> {
        let p = self.path(&self.layout.base());
        Ok(ArtifactMeta::from_map(&p, MappedFile::open(&p)?.metadata(), ArtifactKind::Model)?)
    }

    /// Runs one stage, writing its outputs into `staging` (published by the caller).
    fn execute(&self, planned: &PlannedStage, staging: &Staging) -> anyhow::Result<()> {
        let out = |key: &str| staging.path(key);
        match &planned.stage {
            Stage::Init => self.init(&out(&self.layout.base())),
            Stage::Finetune { shard } => self.finetune(shard, &out(&self.layout.shard_vector(shard)), &out(&self.layout.shard_metrics(shard))),
            Stage::Collect { shard } => self.collect(shard, &out(&self.layout.shard_vector(shard))),
            Stage::FullTraining => self.full_training(&out(&self.layout.full_training())),
            Stage::Merge { candidate } => self.merge(candidate, &out(&self.layout.merged(candidate))),
            Stage::Restore { round, shard, .. } => {
                let (model, output) = restore_io(planned)?;
                let data = self.shard_data(shard)?;
                let training = epoch_settings(&self.job.spec().training, &self.job.spec().restore);
                Ok(shard_part(*round, &self.path(model), &data, shard, &training, self.device, &out(output))?)
            }
            Stage::RestoreCombine { round: Some(round), .. } => {
                let (model, output) = restore_io(planned)?;
                let parts: Vec<PathBuf> = planned.shard_parts().iter().map(|k| self.path(k)).collect();
                Ok(combine(*round, &self.path(model), &parts, self.device, &out(output))?)
            }
            Stage::RestoreCombine { round: None, .. } => {
                // No restoration: the merged model is published as the restored one.
                let (model, output) = restore_io(planned)?;
                Ok(write_atomic(&out(output), &std::fs::read(self.path(model))?)?)
            }
            Stage::Evaluate => self.evaluate(&out(&self.layout.eval_metrics()), &out(&self.layout.eval_report()), &out(&self.layout.eval_html())),
        }
    }

    /// `init`: the base model (pretrained weights and a new seeded head).
    fn init(&self, base: &Path) -> anyhow::Result<()> {
        let spec = self.job.spec();
        let net = init_base(&spec.model, &self.classes, self.device, spec.model.weights_path.as_deref().map(|p| self.job.resolve(p)))?;
        let meta = ArtifactMeta {
            kind: ArtifactKind::Model,
            arch: spec.model.architecture,
            classes: self.classes.clone(),
            image_size: spec.model.image_size,
            base_digest: String::new(),
            shard: None,
            class_counts: vec![],
            multi_label: spec.model.multi_label,
        };
        net.save(base, &meta)?;
        Ok(())
    }

    /// `finetune-<shard>`: the shard's data vector and its training summary (read back as
    /// [`medmerge_crds::results::ShardTraining`]).
    fn finetune(&self, shard: &str, vector: &Path, metrics: &Path) -> anyhow::Result<()> {
        let data = self.shard_data(shard)?;
        let base = self.path(&self.layout.base());
        let mut net = Network::load(&base, self.device)?;
        let report = train(&mut net, &data, &self.job.spec().training, self.device, shard)?;
        net.check_valid()?;
        let spec = self.job.spec();
        let release = spec.shards.iter().find(|s| s.name == shard).map_or(&spec.release, |s| spec.release_of(s));
        let released = crate::merge::write_vector(&net, &base, shard, report.class_counts.clone(), release, vector)?;
        info!(shard, release = %crate::release::describe_release(&released), "data vector released");
        write_atomic(metrics, &serde_json::to_vec_pretty(&ShardSummary { report: &report, release: &released })?)?;
        Ok(())
    }

    /// `collect-<shard>`: an external hospital's vector, checked before it joins the run.
    fn collect(&self, shard: &str, staged: &Path) -> anyhow::Result<()> {
        let spec = self.job.spec();
        let src = spec.shards.iter().find(|s| s.name == shard).and_then(|s| s.vector.as_ref()).expect("collect stages exist for vector shards");
        // Local store: a path relative to the MergeJob; S3: a key in the bucket.
        let bytes = match &self.remote {
            Some(remote) => remote.get(src)?.ok_or_else(|| anyhow::anyhow!("shard {shard}: vector {} is not available yet", remote.location(src)))?,
            None => {
                let src = self.job.resolve(src);
                std::fs::read(&src).map_err(|e| anyhow::anyhow!("shard {shard}: vector {} is not available: {e}", src.display()))?
            }
        };
        // A bad upload is refused here, naming the shard, and (nothing published) a corrected
        // upload is collected on the retry.
        write_atomic(staged, &bytes)?;
        let upload = ShardVector { shard: shard.into(), path: staged.into() };
        let base = self.path(&self.layout.base());
        let checked = match &spec.merge.secure_sum {
            Some(secure) => crate::secure::merge::check_masked(&base, &upload, &secure.session).map(|_| ()),
            None => crate::merge::check_vector(&base, &upload),
        };
        checked.map_err(|e| anyhow::anyhow!("external vector {src} refused: {e}"))?;
        Ok(())
    }

    /// `full-training`: the pooled-data baseline (needs every shard's data in one place).
    fn full_training(&self, model: &Path) -> anyhow::Result<()> {
        let spec = self.job.spec();
        let mut all = self.shard_data(&spec.shards[0].name)?;
        for s in &spec.shards[1..] {
            all.samples.extend(self.shard_data(&s.name)?.samples);
        }
        let mut net = Network::load(&self.path(&self.layout.base()), self.device)?;
        let report = train(&mut net, &all, &spec.training, self.device, "full-training")?;
        let meta = ArtifactMeta { class_counts: report.class_counts, ..self.base_meta()? };
        net.check_valid()?;
        net.save(model, &meta)?;
        Ok(())
    }

    /// `merge-<candidate>`: the vectors merged onto the base by the candidate's method.
    fn merge(&self, candidate: &str, target: &Path) -> anyhow::Result<()> {
        let spec = self.job.spec();
        let c = self.candidate(candidate);
        let opts = MergeOptions {
            method: match c.kind {
                CandidateKind::Merged(m) => m,
                _ => spec.merge.method,
            },
            lambda: spec.merge.lambda,
            heads: spec.merge.heads,
            ties_density: spec.merge.ties_density,
            dare_drop_rate: spec.merge.dare_drop_rate,
            seed: spec.merge.seed,
            pretrained_only: c.kind == CandidateKind::PretrainedRestored,
        };
        let base = self.path(&self.layout.base());
        if spec.merge.secure_sum.is_some() {
            crate::secure::merge::secure_merge(&base, &self.vectors(), &self.dropout_shares()?, &opts, target, self.device)?;
        } else {
            merge_checked(&base, &self.vectors(), &opts, target, self.device)?;
        }
        Ok(())
    }

    /// With secure sum, the shares that remove the masks of hospitals of the roster that did
    /// not upload: each survivor's share about each dropped hospital, which the survivor
    /// uploads beside its vector as `<vector>.dropout-<dropped>.json`. Missing shares are
    /// named; the merge runs once they are there.
    fn dropout_shares(&self) -> anyhow::Result<Vec<crate::secure::DropoutShare>> {
        let vectors = self.vectors();
        let Some(first) = vectors.first() else { return Ok(vec![]) };
        self.fetch(&self.layout.shard_vector(&first.shard))?;
        let file = MappedFile::open(&first.path)?;
        let masked = crate::secure::merge::MaskedFor::from_metadata(file.metadata()).ok_or_else(|| anyhow::anyhow!("shard {}: the collected vector is not masked", first.shard))?;
        let present: Vec<&str> = vectors.iter().map(|v| v.shard.as_str()).collect();
        let dropped: Vec<&String> = masked.roster.iter().filter(|n| !present.contains(&n.as_str())).collect();
        // Roster names come from a hospital's upload and become parts of keys: shard names only.
        if let Some(bad) = dropped.iter().find(|d| !medmerge_crds::validate::is_dns_label(d, 40)) {
            anyhow::bail!("shard {}: its masked vector's roster names {bad:?}, which is not a shard name", first.shard);
        }
        let (mut shares, mut missing) = (Vec::new(), Vec::new());
        for s in self.job.spec().shards.iter() {
            let Some(src) = &s.vector else { continue };
            for d in &dropped {
                let key = format!("{src}.dropout-{d}.json");
                let bytes = match &self.remote {
                    Some(remote) => remote.get(&key)?,
                    None => std::fs::read(self.job.resolve(&key)).ok(),
                };
                match bytes {
                    Some(b) => shares.push(serde_json::from_slice(&b).map_err(|e| anyhow::anyhow!("{key}: not a dropout share: {e}"))?),
                    None => missing.push(key),
                }
            }
        }
        if !missing.is_empty() {
            anyhow::bail!("secure sum: {} dropped out; waiting for the survivors' dropout shares ({})", dropped.iter().map(|d| d.as_str()).collect::<Vec<_>>().join(", "), missing.join(", "));
        }
        Ok(shares)
    }

    /// `evaluate`: every candidate scored on the held-out set, after checking the run is
    /// consistent; writes the metrics, the Markdown and HTML reports and the plots.
    fn evaluate(&self, metrics: &Path, markdown: &Path, html: &Path) -> anyhow::Result<()> {
        self.verify_consistent()?;
        let eval_dir = metrics.parent().map(Path::to_path_buf).unwrap_or_default();
        let report = self.evaluate_all(&eval_dir)?;
        // Plots are a convenience: a machine without fonts still gets its numbers.
        if let Err(e) = crate::plots::write_all(&report, &eval_dir) {
            tracing::warn!(error = %e, "plots not written");
        }
        write_atomic(markdown, report.to_markdown().as_bytes())?;
        write_atomic(html, crate::html::to_html(&report, &eval_dir).as_bytes())?;
        write_atomic(metrics, &serde_json::to_vec_pretty(&report)?)?;
        Ok(())
    }

    fn candidate(&self, id: &str) -> &Candidate {
        self.plan.candidates.iter().find(|c| c.id == id).expect("plan stages name plan candidates")
    }

    fn vectors(&self) -> Vec<ShardVector> {
        self.job.spec().shards.iter().map(|s| ShardVector { shard: s.name.clone(), path: self.path(&self.layout.shard_vector(&s.name)) }).collect()
    }

    /// Evaluates every candidate; plots and the Grad-CAM gallery go to `eval_dir`.
    fn evaluate_all(&self, eval_dir: &Path) -> anyhow::Result<EvalReport> {
        let spec = self.job.spec();
        let l = &self.layout;
        let path = self.job.data_path(&spec.evaluation.data.path, None).map_err(|e| e.context("evaluation data"))?;
        let test = Dataset::open(&path, Some(&self.classes)).map_err(|e| anyhow::anyhow!("evaluation data: {e}"))?;
        let base = self.path(&l.base());
        std::fs::create_dir_all(eval_dir)?;
        let sample = explain_sample(&test, spec.evaluation.explain_images as usize);
        let mut candidates = Vec::new();
        let mut clinical = None;
        let mut export = None;
        for c in &self.plan.candidates {
            let (net, description) = match &c.kind {
                CandidateKind::Merged(m) => {
                    let lambda = if *m == medmerge_crds::MergeMethod::ParamsMean { String::new() } else { format!(" λ={}", spec.merge.lambda) };
                    let secure = if spec.merge.secure_sum.is_some() { " (secure sum)" } else { "" };
                    (Network::load(&self.path(&l.restored(&c.id)), self.device)?, format!("{}{lambda}{secure} + {}", m.as_str(), spec.restore.label()))
                }
                CandidateKind::PretrainedRestored => (Network::load(&self.path(&l.restored(&c.id)), self.device)?, format!("pretrained + averaged heads + {} (no vectors)", spec.restore.label())),
                CandidateKind::ShardModel(s) => {
                    let v = ShardVector { shard: s.clone(), path: self.path(&l.shard_vector(s)) };
                    (shard_model(&base, &v, self.device)?, format!("shard {s} alone"))
                }
                CandidateKind::FullTraining => (Network::load(&self.path(&l.full_training()), self.device)?, "full training (all shards pooled)".into()),
            };
            let probs = predict(&net, &test, spec.training.batch_size as usize, self.device)?;
            let metrics = score(&probs, &test, self.classes.len());
            // The primary model (first) gets the clinical view: ROC, operating point, gallery.
            let primary = clinical.is_none();
            let heat = heat_study(&net, &sample, primary.then_some(eval_dir), self.device)?;
            if primary {
                let mut view = roc_and_operating_point(&probs, &test, spec.evaluation.operating_point);
                view.explain_layer = crate::explain::resolve_layer(&net, None).ok().filter(|_| !sample.is_empty());
                view.gallery = heat.gallery;
                clinical = Some(view);
                export = Some(self.edge_export(net, &test, eval_dir)?);
            }
            info!(candidate = %c.id, accuracy = metrics.accuracy, macro_f1 = metrics.macro_f1, foreground_heat = ?heat.measures.foreground_fraction, deletion_auc = ?heat.measures.deletion_auc, "evaluated");
            candidates.push(CandidateResult { id: c.id.clone(), description, metrics, heat: heat.measures });
        }
        Ok(EvalReport {
            job: self.job.job.metadata.name.clone().unwrap_or_default(),
            run: l.root().into(),
            classes: self.classes.clone(),
            test_images: test.samples.len(),
            candidates,
            similarity: self.similarity()?,
            releases: self.releases()?,
            spec: serde_json::to_value(spec)?,
            clinical: clinical.unwrap_or_default(),
            export,
        })
    }

    /// The primary model as ONNX beside the report, float32 and with int8 weights, and the int8
    /// variant scored on the held-out set (what an edge device running that file would get).
    fn edge_export(&self, mut net: Network, test: &Dataset, eval_dir: &Path) -> anyhow::Result<crate::report::EdgeExport> {
        use crate::export::{quantise_weights, write_onnx, Precision, OPSET};
        let (float_file, int8_file) = ("model.onnx", "model-int8.onnx");
        let float_bytes = write_onnx(&net, &eval_dir.join(float_file), Precision::Float32)?;
        quantise_weights(&mut net)?;
        let int8_bytes = write_onnx(&net, &eval_dir.join(int8_file), Precision::Int8Weights)?;
        let probs = predict(&net, test, self.job.spec().training.batch_size as usize, self.device)?;
        let metrics = score(&probs, test, self.classes.len());
        info!(accuracy = metrics.accuracy, bytes = int8_bytes, "evaluated the int8 edge model");
        Ok(crate::report::EdgeExport {
            opset: OPSET,
            float_file: float_file.into(),
            float_bytes,
            int8_file: int8_file.into(),
            int8_bytes,
            int8_accuracy: metrics.accuracy,
            int8_macro_f1: metrics.macro_f1,
        })
    }

    /// How each shard's vector was released, from its file (collected vectors included).
    fn releases(&self) -> anyhow::Result<Vec<crate::report::ShardRelease>> {
        let mut out = Vec::new();
        if self.job.spec().merge.secure_sum.is_some() {
            // Masked uploads carry no release record; the coordinator knows only their sum.
            return Ok(out);
        }
        for v in self.vectors().into_iter().filter(|v| v.path.exists()) {
            let file = MappedFile::open(&v.path)?;
            let recorded = crate::release::recorded_release(file.metadata());
            let release = recorded.unwrap_or_default();
            out.push(crate::report::ShardRelease { shard: v.shard, release: medmerge_crds::results::ReleaseRecord { bytes: Some(std::fs::metadata(&v.path)?.len()), ..release } });
        }
        Ok(out)
    }

    /// Per-layer cosine similarity between shard vectors and with the full-training vector.
    fn similarity(&self) -> anyhow::Result<Vec<LayerSimilarity>> {
        if self.job.spec().merge.secure_sum.is_some() {
            // One hospital's vector is exactly what secure sum hides.
            return Ok(vec![]);
        }
        let l = &self.layout;
        let vectors: Vec<VectorReader> = self.vectors().iter().map(|v| VectorReader::open(&v.path)).collect::<Result<_, _>>()?;
        let base = MappedFile::open(&self.path(&l.base()))?;
        let full = self.path(&l.full_training());
        let full = full.exists().then(|| MappedFile::open(&full)).transpose()?;
        let head = crate::model::head_prefix(self.job.spec().model.architecture);
        let mut out = Vec::new();
        let mut weights: Vec<_> = base.tensors().filter(|t| t.shape.len() >= 2 && !t.name.starts_with(head)).collect();
        weights.sort_by_key(|t| forward_order_key(&t.name));
        for t in weights {
            let taus: Vec<Vec<f32>> = vectors.iter().map(|v| v.values(&t.name).map(|c| c.into_owned())).collect::<Result<_, _>>()?;
            let mut pairs = Vec::new();
            for i in 0..taus.len() {
                for j in i + 1..taus.len() {
                    pairs.push(cosine(&taus[i], &taus[j]));
                }
            }
            let with_full = match &full {
                Some(f) => {
                    let pre = base.f32(&t.name)?;
                    let delta: Vec<f32> = f.f32(&t.name)?.iter().zip(&pre).map(|(a, b)| a - b).collect();
                    Some(taus.iter().map(|tau| cosine(tau, &delta)).sum::<f64>() / taus.len() as f64)
                }
                None => None,
            };
            let between = if pairs.is_empty() { 1.0 } else { pairs.iter().sum::<f64>() / pairs.len() as f64 };
            out.push(LayerSimilarity { tensor: t.name.clone(), between_shards: between, with_full_training: with_full });
        }
        Ok(out)
    }
}

/// Without `model.classes`: every class name found in any shard's images or the evaluation set
/// (sorted; multi-label columns keep their first-seen order). Hospitals with label-skewed data
/// may lack a class the others have; the first shard alone would silently drop it. A class that
/// some shard has but the evaluation set lacks is refused: most often a mistyped label, which
/// would otherwise become a class of the model.
fn classes_in_data(job: &Job) -> anyhow::Result<Vec<String>> {
    let spec = job.spec();
    let open = |what: &str, path: &str| -> anyhow::Result<Dataset> {
        let path = job.data_path(path, crate::remote_data::shard_credentials()?).map_err(|e| e.context(what.to_string()))?;
        Dataset::open(&path, None).map_err(|e| anyhow::anyhow!("{what}: {e}"))
    };
    let evaluation = open("evaluation data", &spec.evaluation.data.path)?;
    let mut names: Vec<String> = Vec::new();
    let mut any_shard = false;
    for s in &spec.shards {
        let Some(d) = &s.data else { continue };
        any_shard = true;
        let shard = open(&format!("shard {}", s.name), &d.path)?;
        for (label, class) in shard.classes.iter().enumerate() {
            if !evaluation.classes.contains(class) {
                let example = shard.samples.iter().find(|x| x.label == label).map(|x| x.path.display().to_string()).unwrap_or_default();
                anyhow::bail!(
                    "shard {}: class {class:?} (e.g. {example}, in {}) is not in the evaluation data: a mistyped label? If it is a real class, list every class in spec.model.classes",
                    s.name,
                    shard.source.display()
                );
            }
            if !names.contains(class) {
                names.push(class.clone());
            }
        }
    }
    anyhow::ensure!(any_shard, "spec.model.classes: required when no shard has data to read class names from");
    for class in evaluation.classes {
        if !names.contains(&class) {
            names.push(class);
        }
    }
    if !spec.model.multi_label {
        names.sort();
    }
    Ok(names)
}

/// Builds the base network (`theta_pre`) for `m`: pretrained weights plus a new seeded head.
/// `weights_path` is `m.weightsPath` resolved against the job's directory.
pub fn init_base(m: &ModelSpec, classes: &[String], device: Device, weights_path: Option<PathBuf>) -> Result<Network, ModelError> {
    let mut net = Network::new(m.architecture, classes, m.image_size, device, m.seed);
    match m.weights {
        WeightsSource::Random => {}
        WeightsSource::Imagenet => {
            let p = builtin_weights_path();
            if !p.exists() {
                return Err(ModelError::NoWeights { path: p, hint: BUILTIN_WEIGHTS_HINT });
            }
            net.import_pretrained(&p)?;
        }
        WeightsSource::File => net.import_pretrained(&weights_path.unwrap_or_default())?,
    }
    Ok(net)
}

/// Sort key that puts tensor names in (approximate) forward order: numbers compare as numbers
/// (`_blocks.10` after `_blocks.9`), stems first and final convolutions last.
pub fn forward_order_key(name: &str) -> (u8, Vec<(u64, String)>) {
    let rank = if name.contains("stem") {
        0
    } else if name.starts_with("_conv_head") || name.starts_with("_bn1") {
        2
    } else {
        1
    };
    let parts = name.split('.').map(|p| p.parse::<u64>().map_or((u64::MAX, p.to_string()), |n| (n, String::new()))).collect();
    (rank, parts)
}

/// A restoration stage's starting model and output, as the plan names them.
fn restore_io(planned: &PlannedStage) -> anyhow::Result<(&str, &str)> {
    planned.model_input().zip(planned.restore_output()).ok_or_else(|| anyhow::anyhow!("stage {} has no model to restore or no output", planned.stage.name()))
}

#[cfg(test)]
mod tests {
    use super::forward_order_key;

    #[test]
    fn tensors_sort_in_forward_order() {
        let mut names = vec!["_conv_head.weight", "_blocks.10._project_conv.weight", "_blocks.9._project_conv.weight", "_conv_stem.weight", "features.18.0.weight", "features.2.conv.0.0.weight"];
        names.sort_by_key(|n| forward_order_key(n));
        assert_eq!(names, vec!["_conv_stem.weight", "_blocks.9._project_conv.weight", "_blocks.10._project_conv.weight", "features.2.conv.0.0.weight", "features.18.0.weight", "_conv_head.weight"]);
    }
}

/// What a training stage writes beside its vector: the training report and how the vector was
/// released.
#[derive(serde::Serialize)]
struct ShardSummary<'a> {
    #[serde(flatten)]
    report: &'a crate::train::TrainReport,
    release: &'a medmerge_crds::results::ReleaseRecord,
}
