//! Pure validation of a `MergeJobSpec`. Every error names the field at fault, in the same
//! dotted/indexed form `kubectl explain` uses, so a person can find and fix it.

use std::collections::BTreeSet;

use crate::limits;
use crate::spec::{Architecture, Baseline, HeadStrategy, MergeJobSpec, MergeMethod, MergeSpec, ModelSpec, ReleaseSpec, RestoreMode, StageKind, TrainingSpec, VectorEncoding, WeightsSource};

/// One problem with a spec.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("spec.{field}: {message}")]
pub struct SpecError {
    /// Path of the offending field, e.g. `shards[1].name`.
    pub field: String,
    /// What is wrong and what would be accepted.
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError { field: field.into(), message: message.into() }
}

/// Whether `s` is a DNS label of at most `max` characters.
pub fn is_dns_label(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') && !s.starts_with('-') && !s.ends_with('-')
}

/// Whether `s` is a DNS subdomain (what Kubernetes requires of most object names): dot-separated
/// DNS labels, at most 253 characters. Never `.`, `..` or a path.
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(|label| is_dns_label(label, 63))
}

/// Checks everything about a spec that can be checked without I/O. Returns every problem found.
pub fn validate(spec: &MergeJobSpec) -> Result<(), Vec<SpecError>> {
    let mut errors = Vec::new();
    errors.extend(validate_model(&spec.model));

    if spec.shards.is_empty() {
        errors.push(err("shards", "at least one shard is required"));
    }
    let mut names = BTreeSet::new();
    for (i, s) in spec.shards.iter().enumerate() {
        if !is_dns_label(&s.name, 40) {
            errors.push(err(format!("shards[{i}].name"), format!("{:?} must be a DNS label (a-z, 0-9, '-') of at most 40 characters", s.name)));
        }
        if !names.insert(s.name.as_str()) {
            errors.push(err(format!("shards[{i}].name"), format!("{:?} is used by another shard", s.name)));
        }
        match (&s.data, &s.vector) {
            (None, None) => errors.push(err(format!("shards[{i}]"), "needs data (to fine-tune here) or vector (computed elsewhere)")),
            (Some(d), _) if d.path.is_empty() => errors.push(err(format!("shards[{i}].data.path"), "must not be empty")),
            (_, Some(v)) if v.is_empty() => errors.push(err(format!("shards[{i}].vector"), "must not be empty")),
            _ => {}
        }
        if let Some(release) = &s.release {
            errors.extend(validate_release(release, &format!("shards[{i}].")));
        }
        if s.storage_secret.is_some() && spec.storage.s3.is_none() {
            errors.push(err(format!("shards[{i}].storageSecret"), "is a bucket identity and needs storage.s3 (a local store has no credentials)"));
        }
    }

    errors.extend(validate_release(&spec.release, ""));
    errors.extend(validate_training(&spec.training));
    errors.extend(validate_merge(&spec.merge));
    errors.extend(validate_secure_sum(spec));
    let mg = &spec.merge;
    let with_data = spec.shards.iter().filter(|s| s.data.is_some()).count();
    if spec.restore.mode != RestoreMode::None && with_data == 0 && !spec.shards.is_empty() {
        errors.push(err("restore.mode", format!("{} needs at least one shard with data; use none", spec.restore.mode.as_str())));
    }
    errors.extend(limits::RESTORE_LEARNING_RATE.check_optional(spec.restore.learning_rate));
    errors.extend(limits::RESTORE_EPOCHS.check(spec.restore.epochs));
    if spec.restore.epochs > 1 && !spec.restore.mode.trains() {
        errors.push(err("restore.epochs", format!("{} trains no epoch; epochs > 1 needs averagedEpoch, averagedEpochHead or finetuneEpoch", spec.restore.mode.as_str())));
    }
    if mg.baselines.contains(&Baseline::FullTraining) && with_data != spec.shards.len() {
        errors.push(err("merge.baselines", "fullTraining needs the data of every shard; external shards have none here"));
    }
    if let Some(min) = spec.cluster.min_shards {
        if !limits::MIN_SHARDS.allows(min) || min as usize > spec.shards.len() {
            errors.push(err("cluster.minShards", format!("{min} must be between 1 and the number of shards ({})", spec.shards.len())));
        }
    }
    errors.extend(limits::ACTIVE_DEADLINE_SECONDS.check_optional(spec.cluster.active_deadline_seconds));
    errors.extend(limits::STRAGGLER_DEADLINE_SECONDS.check_optional(spec.cluster.straggler_deadline_seconds));
    errors.extend(limits::TTL_SECONDS_AFTER_FINISHED.check_optional(spec.cluster.ttl_seconds_after_finished));
    errors.extend(limits::BACKOFF_LIMIT.check(spec.cluster.backoff_limit));
    let quantities = [("cluster.resources.cpu", &spec.cluster.resources.cpu), ("cluster.resources.memory", &spec.cluster.resources.memory)];
    for (field, value) in quantities {
        if let Some(q) = value.as_deref().filter(|q| !is_quantity(q)) {
            errors.push(err(field, format!("{q:?} is not a Kubernetes quantity (e.g. \"4\", \"500m\", \"16Gi\")")));
        }
    }
    if spec.cluster.image.is_empty() {
        errors.push(err("cluster.image", "must not be empty"));
    }
    errors.extend(validate_placement(spec));
    let ev = &spec.evaluation;
    errors.extend(limits::OPERATING_POINT.check(ev.operating_point));
    errors.extend(limits::EXPLAIN_IMAGES.check(ev.explain_images));
    if spec.evaluation.data.path.is_empty() {
        errors.push(err("evaluation.data.path", "must not be empty"));
    }
    match (&spec.storage.local, &spec.storage.s3) {
        (Some(l), None) if l.path.is_empty() => errors.push(err("storage.local.path", "must not be empty")),
        (None, Some(s3)) if s3.bucket.is_empty() => errors.push(err("storage.s3.bucket", "must not be empty")),
        (None, None) => errors.push(err("storage", "no backend configured; set storage.local or storage.s3")),
        (Some(_), Some(_)) => errors.push(err("storage", "set one of storage.local and storage.s3, not both")),
        _ => {}
    }
    // The prefix names directories and keys the operator's cleanup deletes: it must stay inside
    // the store.
    if spec.storage.prefix.split('/').any(|part| part == ".." || part == ".") || spec.storage.prefix.contains('\\') {
        errors.push(err("storage.prefix", format!("{:?} must stay inside the store: no '.' or '..' segments, no backslashes", spec.storage.prefix)));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// A vector release's bounds (`release`, or a shard's at `prefix`, and `finetune`'s flags).
pub fn validate_release(release: &ReleaseSpec, prefix: &str) -> Vec<SpecError> {
    let mut errors = Vec::new();
    if let Some(p) = &release.privacy {
        errors.extend(limits::EPSILON.check_in(prefix, p.epsilon));
        errors.extend(limits::DELTA.check_in(prefix, p.delta));
        errors.extend(limits::CLIP_NORM.check_in(prefix, p.clip_norm));
    }
    if let Some(density) = release.density {
        if release.encoding != VectorEncoding::TopK {
            errors.push(err(format!("{prefix}release.encoding"), format!("is {} but density {density} is set: density is for topK", release.encoding.as_str())));
        }
        errors.extend(limits::TOP_K_DENSITY.check_in(prefix, density));
    }
    errors
}

/// The model's bounds (`spec.model`, and the `init` command's flags).
pub fn validate_model(m: &ModelSpec) -> Vec<SpecError> {
    let mut errors = Vec::new();
    if m.weights == WeightsSource::Imagenet && m.architecture != Architecture::EfficientnetLite0 {
        errors.push(err("model.weights", format!("imagenet weights ship only for efficientnet-lite0; for {} use weights: file with weightsPath, or random", m.architecture.as_str())));
    }
    if m.weights == WeightsSource::File && m.weights_path.as_deref().unwrap_or("").is_empty() {
        errors.push(err("model.weightsPath", "required when model.weights is file"));
    }
    errors.extend(limits::IMAGE_SIZE.check(m.image_size));
    let mut seen_classes = BTreeSet::new();
    for (i, c) in m.classes.iter().enumerate() {
        if c.is_empty() || !seen_classes.insert(c) {
            errors.push(err(format!("model.classes[{i}]"), format!("class {c:?} is empty or repeated")));
        }
    }
    if m.classes.len() == 1 {
        errors.push(err("model.classes", "a classifier needs at least two classes"));
    }
    errors
}

/// The training settings' bounds (`spec.training`, and the trainer's CLI flags, which map onto
/// the same fields).
pub fn validate_training(t: &TrainingSpec) -> Vec<SpecError> {
    let a = &t.augment;
    [
        limits::EPOCHS.check(t.epochs),
        limits::BATCH_SIZE.check(t.batch_size),
        limits::LEARNING_RATE.check(t.learning_rate),
        limits::WEIGHT_DECAY.check(t.weight_decay),
        limits::VALIDATION_FRACTION.check(t.validation_fraction),
        limits::MIN_SCALE.check(f64::from(a.min_scale)),
        limits::ROTATION_DEGREES.check(f64::from(a.rotation_degrees)),
        limits::COLOR_JITTER.check(f64::from(a.color_jitter)),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// The merge settings' bounds (`spec.merge`, and the `merge` command's flags).
pub fn validate_merge(mg: &MergeSpec) -> Vec<SpecError> {
    [limits::LAMBDA.check(mg.lambda), limits::TIES_DENSITY.check(mg.ties_density), limits::DARE_DROP_RATE.check(mg.dare_drop_rate)].into_iter().flatten().collect()
}

/// With `merge.secureSum`, everything that would need one hospital's own vector or data is
/// refused, naming the field: the coordinator sees only masked uploads and their sum.
pub fn validate_secure_sum(spec: &MergeJobSpec) -> Vec<SpecError> {
    let mg = &spec.merge;
    let Some(secure) = &mg.secure_sum else { return vec![] };
    let mut errors = Vec::new();
    if secure.session.is_empty() || secure.session.len() > 253 {
        errors.push(err("merge.secureSum.session", "must name the hospitals' masking session (1 to 253 characters)"));
    }
    for (i, s) in spec.shards.iter().enumerate() {
        if s.data.is_some() || s.vector.is_none() {
            errors.push(err(
                format!("shards[{i}]"),
                "with merge.secureSum each hospital fine-tunes and masks its own vector: give vector only (a shard fine-tuned here would hand the coordinator its vector)",
            ));
        }
    }
    if !matches!(mg.method, MergeMethod::DataVector | MergeMethod::ParamsMean) {
        errors.push(err("merge.method", format!("{} needs each hospital's vector; secure sum reveals only their sum (use dataVector or paramsMean)", mg.method.as_str())));
    }
    if mg.heads != HeadStrategy::Mean {
        errors.push(err("merge.heads", "secure sum reveals only the sum of the heads: use mean"));
    }
    for (i, b) in mg.baselines.iter().enumerate().filter(|(_, b)| !matches!(b, Baseline::ParamsMean | Baseline::PretrainedRestored)) {
        let name = serde_json::to_value(b).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        errors.push(err(
            format!("merge.baselines[{i}]"),
            format!("{name} needs a hospital's own vector or data, which secure sum never shows the coordinator (paramsMean and pretrainedRestored are possible)"),
        ));
    }
    if spec.restore.mode != RestoreMode::None {
        errors.push(err("restore.mode", "restoration runs on each hospital's data and publishes per-hospital results; with merge.secureSum use none"));
    }
    errors
}

/// Cluster settings that local runs ignore but must still be well-formed: GPUs, scratch size,
/// override keys, data volumes.
fn validate_placement(spec: &MergeJobSpec) -> Vec<SpecError> {
    let mut errors = Vec::new();
    let c = &spec.cluster;
    if !limits::GPUS.allows(c.gpus) {
        errors.push(err("cluster.gpus", format!("{} GPUs per pod: the trainer uses one device; multi-GPU training is not supported yet (use 0 or 1)", c.gpus)));
    }
    if c.gpu_resource.is_empty() || !c.gpu_resource.contains('/') {
        errors.push(err("cluster.gpuResource", format!("{:?} is not an extended resource name (e.g. nvidia.com/gpu, amd.com/gpu)", c.gpu_resource)));
    }
    if let Some(q) = c.scratch_size_limit.as_deref().filter(|q| !is_quantity(q)) {
        errors.push(err("cluster.scratchSizeLimit", format!("{q:?} is not a Kubernetes quantity (e.g. \"20Gi\")")));
    }
    for key in c.stage_overrides.keys() {
        if !StageKind::ALL.iter().any(|k| k.as_str() == key) {
            let kinds: Vec<&str> = StageKind::ALL.iter().map(|k| k.as_str()).collect();
            errors.push(err(format!("cluster.stageOverrides.{key}"), format!("unknown stage kind; one of {}", kinds.join(", "))));
        }
    }
    for (field, data) in data_sources(spec) {
        if let Some(volume) = &data.volume {
            if volume.sources() != 1 {
                errors.push(err(format!("{field}.volume"), "set exactly one of persistentVolumeClaim, hostPath, nfs, csi"));
            }
            if !is_relative_inside(&data.path) {
                errors.push(err(format!("{field}.path"), format!("{:?} must be a relative path inside the volume, without '..'", data.path)));
            }
        }
    }
    if let Some(local) = &spec.storage.local {
        if local.persistent_volume_claim.is_some() && !is_relative_inside(&local.path) {
            errors.push(err("storage.local.path", format!("{:?} must be a relative path inside persistentVolumeClaim, without '..'", local.path)));
        }
    }
    errors
}

/// Every image set of a spec with its field path: each shard's `data`, then `evaluation.data`.
fn data_sources(spec: &MergeJobSpec) -> impl Iterator<Item = (String, &crate::spec::DataSource)> {
    let shards = spec.shards.iter().enumerate().filter_map(|(i, s)| s.data.as_ref().map(|d| (format!("shards[{i}].data"), d)));
    shards.chain([("evaluation.data".to_string(), &spec.evaluation.data)])
}

/// Whether `path` is relative and stays inside its root (no `..`, not absolute).
fn is_relative_inside(path: &str) -> bool {
    let p = std::path::Path::new(path);
    !path.is_empty() && p.is_relative() && p.components().all(|c| matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir))
}

/// What a MergeJob needs to run on a cluster, on top of [`validate`]: every image set reachable
/// from a pod (a data volume or `s3://`), local storage on a shared claim, and class names given
/// (the coordinator's pods never see a hospital's images to read them from).
pub fn validate_for_cluster(spec: &MergeJobSpec) -> Result<(), Vec<SpecError>> {
    let mut errors = validate(spec).err().unwrap_or_default();
    let reachable = |d: &crate::spec::DataSource| d.volume.is_some() || d.path.starts_with("s3://");
    for (i, s) in spec.shards.iter().enumerate() {
        if let Some(d) = s.data.as_ref().filter(|d| !reachable(d)) {
            errors.push(err(
                format!("shards[{i}].data"),
                format!("{:?} is a path on no volume: on a cluster give data.volume (a PVC, hostPath, NFS or CSI source, path inside it) or an s3:// path", d.path),
            ));
        }
    }
    if !reachable(&spec.evaluation.data) {
        errors.push(err("evaluation.data", format!("{:?} is a path on no volume: on a cluster give data.volume or an s3:// path", spec.evaluation.data.path)));
    }
    if spec.storage.local.as_ref().is_some_and(|l| l.persistent_volume_claim.is_none()) {
        errors.push(err("storage.local.persistentVolumeClaim", "required on a cluster: a ReadWriteMany claim every stage pod mounts (or use storage.s3)"));
    }
    if spec.model.classes.is_empty() {
        errors.push(err("model.classes", "required on a cluster: coordinator pods never see a hospital's images to read class names from"));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// What a MergeJob needs to run on one machine, on top of [`validate`]: no cluster volumes,
/// which only the operator can mount (a path would otherwise be read from the wrong place).
pub fn validate_for_local(spec: &MergeJobSpec) -> Result<(), Vec<SpecError>> {
    let mut errors = validate(spec).err().unwrap_or_default();
    for (field, data) in data_sources(spec) {
        if data.volume.is_some() {
            errors.push(err(format!("{field}.volume"), "a cluster volume, mounted by the operator; on one machine remove it and give data.path on this machine"));
        }
    }
    if spec.storage.local.as_ref().is_some_and(|l| l.persistent_volume_claim.is_some()) {
        errors.push(err("storage.local.persistentVolumeClaim", "a cluster claim, mounted by the operator; on one machine remove it"));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// A Kubernetes resource quantity: a decimal number with an optional SI or binary suffix.
fn is_quantity(q: &str) -> bool {
    let digits = q.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &q[digits.len()..];
    let number_ok = !digits.is_empty() && digits.parse::<f64>().is_ok_and(|v| v >= 0.0);
    number_ok && ["", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"].contains(&suffix)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::spec::*;

    /// A small valid spec every validation test starts from.
    pub(crate) fn good() -> MergeJobSpec {
        serde_yaml::from_str(
            r#"
model: {architecture: efficientnet-lite0}
shards:
  - {name: a, data: {path: a}}
  - {name: b, data: {path: b}}
evaluation: {data: {path: test}}
"#,
        )
        .unwrap()
    }

    fn fields(spec: &MergeJobSpec) -> Vec<String> {
        validate(spec).err().unwrap_or_default().into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn a_release_is_checked_where_it_is_set_and_a_shards_own_replaces_the_specs() {
        let mut s = good();
        s.release = serde_yaml::from_str("{privacy: {epsilon: 4, delta: 1.0e-6, clipNorm: 2}, encoding: int8}").unwrap();
        s.shards[1].release = Some(serde_yaml::from_str("{encoding: topK, density: 0.05}").unwrap());
        assert_eq!(validate(&s), Ok(()));
        assert_eq!(s.release_of(&s.shards[0]).encoding, VectorEncoding::Int8);
        assert_eq!(s.release_of(&s.shards[1]).top_k_density(), 0.05);
        assert!(s.release_of(&s.shards[1]).privacy.is_none(), "a shard's release replaces the spec's whole");

        s.release.privacy.as_mut().unwrap().epsilon = 0.0;
        s.shards[1].release = Some(serde_yaml::from_str("{encoding: int8, density: 0.05, privacy: {epsilon: 1, delta: 0.5, clipNorm: -1}}").unwrap());
        assert_eq!(fields(&s), ["shards[1].release.privacy.delta", "shards[1].release.privacy.clipNorm", "shards[1].release.encoding", "release.privacy.epsilon"]);
    }

    #[test]
    fn secure_sum_refuses_everything_that_would_show_the_coordinator_one_hospitals_vector() {
        let mut s: MergeJobSpec = serde_yaml::from_str(
            r#"
model: {architecture: resnet18, weights: random}
shards:
  - {name: a, vector: in/a.safetensors}
  - {name: b, vector: in/b.safetensors}
evaluation: {data: {path: test}}
restore: {mode: none}
merge: {secureSum: {session: run-7}, baselines: [paramsMean, pretrainedRestored]}
"#,
        )
        .unwrap();
        assert_eq!(validate(&s), Ok(()));
        s.shards[1].data = Some(serde_yaml::from_str("{path: b}").unwrap());
        s.merge.method = MergeMethod::Ties;
        s.merge.heads = HeadStrategy::SampleWeighted;
        s.merge.baselines = vec![Baseline::ParamsMean, Baseline::ShardModels];
        s.restore.mode = RestoreMode::BnRecalibrate;
        s.merge.secure_sum.as_mut().unwrap().session.clear();
        assert_eq!(fields(&s), ["merge.secureSum.session", "shards[1]", "merge.method", "merge.heads", "merge.baselines[1]", "restore.mode"]);
        let text = validate(&s).unwrap_err().iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
        assert!(text.contains("shardModels needs a hospital's own vector"), "{text}");
    }

    #[test]
    fn a_minimal_spec_is_valid_and_gets_paper_defaults() {
        let s = good();
        assert_eq!(validate(&s), Ok(()));
        assert_eq!(s.merge.lambda, 2.0);
        assert_eq!(s.training.seed, 3315);
        assert_eq!(s.restore.mode, RestoreMode::AveragedEpochHead);
    }

    #[test]
    fn kubernetes_quantities_are_recognised() {
        for q in ["4", "500m", "0.5", "16Gi", "1G"] {
            assert!(is_quantity(q), "{q}");
        }
        for q in ["", "Gi", "16 GB", "16GB", "-1", "four"] {
            assert!(!is_quantity(q), "{q}");
        }
    }

    #[test]
    fn each_bad_field_is_named() {
        type Case = (&'static str, fn(&mut MergeJobSpec));
        let cases: Vec<Case> = vec![
            ("shards", |s| s.shards.clear()),
            ("shards[1].name", |s| s.shards[1].name = "a".into()),
            ("shards[0].name", |s| s.shards[0].name = "Hospital_A".into()),
            ("shards[1]", |s| s.shards[1].data = None),
            ("merge.lambda", |s| s.merge.lambda = f64::NAN),
            ("merge.lambda", |s| s.merge.lambda = -1.0),
            ("merge.tiesDensity", |s| s.merge.ties_density = 0.0),
            ("merge.dareDropRate", |s| s.merge.dare_drop_rate = 1.0),
            ("restore.epochs", |s| s.restore.epochs = 0),
            ("restore.epochs", |s| {
                s.restore.mode = RestoreMode::BnRecalibrate;
                s.restore.epochs = 2
            }),
            ("model.weights", |s| s.model.architecture = Architecture::Resnet50),
            ("model.weightsPath", |s| s.model.weights = WeightsSource::File),
            ("model.imageSize", |s| s.model.image_size = 8),
            ("model.classes[1]", |s| s.model.classes = vec!["x".into(), "x".into()]),
            ("training.epochs", |s| s.training.epochs = 0),
            ("training.learningRate", |s| s.training.learning_rate = 0.0),
            ("training.validationFraction", |s| s.training.validation_fraction = 0.7),
            ("evaluation.data.path", |s| s.evaluation.data.path.clear()),
            ("evaluation.operatingPoint", |s| s.evaluation.operating_point = 1.5),
            ("evaluation.operatingPoint", |s| s.evaluation.operating_point = f64::NAN),
            ("evaluation.explainImages", |s| s.evaluation.explain_images = 20_000),
            ("storage", |s| s.storage.local = None),
            ("storage.prefix", |s| s.storage.prefix = "runs/../../etc".into()),
            ("storage.prefix", |s| s.storage.prefix = "..".into()),
            ("storage", |s| s.storage.s3 = Some(S3Storage { bucket: "b".into(), endpoint: None, region: "r".into(), path_style: true, credentials_secret: None })),
            ("storage.s3.bucket", |s| {
                s.storage.local = None;
                s.storage.s3 = Some(S3Storage { bucket: String::new(), endpoint: None, region: "r".into(), path_style: true, credentials_secret: None });
            }),
            ("shards[1].storageSecret", |s| s.shards[1].storage_secret = Some("hospital-b-bucket".into())),
            ("cluster.minShards", |s| s.cluster.min_shards = Some(3)),
            ("cluster.image", |s| s.cluster.image.clear()),
            ("cluster.activeDeadlineSeconds", |s| s.cluster.active_deadline_seconds = Some(0)),
            ("cluster.stragglerDeadlineSeconds", |s| s.cluster.straggler_deadline_seconds = Some(-5)),
            ("cluster.ttlSecondsAfterFinished", |s| s.cluster.ttl_seconds_after_finished = Some(-1)),
            ("cluster.resources.memory", |s| s.cluster.resources.memory = Some("16 GB".into())),
            ("cluster.resources.cpu", |s| s.cluster.resources.cpu = Some("four".into())),
            ("merge.baselines", |s| {
                s.shards[1] = ShardSpec {
                    name: "b".into(),
                    data: None,
                    vector: Some("v".into()),
                    secret_ref: None,
                    storage_secret: None,
                    node_selector: Default::default(),
                    release: None,
                    tolerations: vec![],
                    pod_overrides: Default::default(),
                };
                s.merge.baselines = vec![Baseline::FullTraining];
            }),
        ];
        for (field, mutate) in cases {
            let mut s = good();
            mutate(&mut s);
            assert_eq!(fields(&s), vec![field.to_string()], "expected only {field} to be reported");
        }
    }

    #[test]
    fn error_messages_lead_with_the_field_path() {
        let mut s = good();
        s.merge.lambda = 9.0;
        let e = validate(&s).unwrap_err();
        assert_eq!(e[0].to_string(), "spec.merge.lambda: 9 is outside [0, 4]");
    }

    #[test]
    fn unknown_fields_and_enum_values_are_refused_by_serde() {
        let r: Result<MergeJobSpec, _> = serde_yaml::from_str("model: {architecture: vgg16}\nshards: []\nevaluation: {data: {path: t}}\n");
        assert!(r.unwrap_err().to_string().contains("vgg16"));
    }

    #[test]
    fn more_than_one_gpu_and_unknown_stage_kinds_are_refused_by_name() {
        let mut spec = good();
        spec.cluster.gpus = 2;
        spec.cluster.stage_overrides.insert("evaluation".into(), Default::default());
        spec.cluster.scratch_size_limit = Some("lots".into());
        spec.cluster.gpu_resource = "gpu".into();
        let errors = validate(&spec).unwrap_err();
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(text.iter().any(|e| e.starts_with("spec.cluster.gpus: 2 GPUs") && e.contains("multi-GPU training is not supported")), "{text:?}");
        assert!(text.iter().any(|e| e.starts_with("spec.cluster.stageOverrides.evaluation: unknown stage kind")), "{text:?}");
        assert_eq!(fields(&spec), vec!["cluster.gpus", "cluster.gpuResource", "cluster.scratchSizeLimit", "cluster.stageOverrides.evaluation"]);
    }

    #[test]
    fn a_data_volume_needs_one_source_and_a_path_that_stays_inside_it() {
        let mut spec: MergeJobSpec = serde_yaml::from_str(
            r#"
model: {classes: [x, y]}
shards:
  - {name: a, data: {path: ../b, volume: {hostPath: {path: /srv/a}}}}
  - {name: b, data: {path: b, volume: {}}}
evaluation: {data: {path: /abs, volume: {nfs: {server: nfs.example, path: /test}}}}
"#,
        )
        .unwrap();
        assert_eq!(fields(&spec), vec!["shards[0].data.path", "shards[1].data.volume", "evaluation.data.path"]);
        spec.shards[0].data.as_mut().unwrap().path = "a/train.csv".into();
        spec.shards[1].data.as_mut().unwrap().volume = Some(serde_yaml::from_str("{persistentVolumeClaim: {claimName: b-data}}").unwrap());
        spec.evaluation.data.path = ".".into();
        assert!(validate(&spec).is_ok(), "{:?}", validate(&spec));
    }

    #[test]
    fn a_cluster_run_needs_reachable_data_shared_storage_and_class_names() {
        let spec = good();
        let errors = validate_for_cluster(&spec).unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, vec!["shards[0].data", "shards[1].data", "evaluation.data", "storage.local.persistentVolumeClaim", "model.classes"]);
        let cluster: MergeJobSpec = serde_yaml::from_str(
            r#"
model: {classes: [x, y]}
shards:
  - {name: a, data: {path: a, volume: {persistentVolumeClaim: {claimName: hospital-a}}}}
  - {name: b, data: {path: "s3://bucket/b/"}}
  - {name: c, vector: incoming/c.safetensors}
evaluation: {data: {path: test, volume: {persistentVolumeClaim: {claimName: coordinator}}}}
storage: {local: {path: runs, persistentVolumeClaim: artifacts}}
"#,
        )
        .unwrap();
        assert!(validate_for_cluster(&cluster).is_ok(), "{:?}", validate_for_cluster(&cluster));
    }

    #[test]
    fn a_local_run_refuses_cluster_volumes_by_field() {
        let spec: MergeJobSpec = serde_yaml::from_str(
            "model: {classes: [x, y]}\nshards: [{name: a, data: {path: ., volume: {hostPath: {path: /srv/a}}}}]\nevaluation: {data: {path: t}}\nstorage: {local: {path: runs, persistentVolumeClaim: share}}\n",
        )
        .unwrap();
        let fields: Vec<String> = validate_for_local(&spec).unwrap_err().into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["shards[0].data.volume", "storage.local.persistentVolumeClaim"]);
        assert!(validate_for_local(&good()).is_ok());
    }
}
