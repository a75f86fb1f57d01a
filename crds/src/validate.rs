//! Pure validation of a `MergeJobSpec`. Every error names the field at fault, in the same
//! dotted/indexed form `kubectl explain` uses, so a person can find and fix it.

use std::collections::BTreeSet;

use crate::spec::{Architecture, Baseline, MergeJobSpec, RestoreMode, WeightsSource};

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
    !s.is_empty()
        && s.len() <= max
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Checks everything about a spec that can be checked without I/O. Returns every problem found.
pub fn validate(spec: &MergeJobSpec) -> Result<(), Vec<SpecError>> {
    let mut errors = Vec::new();
    let m = &spec.model;
    if m.weights == WeightsSource::Imagenet && m.architecture != Architecture::EfficientnetLite0 {
        errors.push(err(
            "model.weights",
            format!("imagenet weights ship only for efficientnet-lite0; for {} use weights: file with weightsPath, or random", m.architecture.as_str()),
        ));
    }
    if m.weights == WeightsSource::File && m.weights_path.as_deref().unwrap_or("").is_empty() {
        errors.push(err("model.weightsPath", "required when model.weights is file"));
    }
    if !(16..=1024).contains(&m.image_size) {
        errors.push(err("model.imageSize", format!("{} is outside 16..=1024", m.image_size)));
    }
    let mut seen_classes = BTreeSet::new();
    for (i, c) in m.classes.iter().enumerate() {
        if c.is_empty() || !seen_classes.insert(c) {
            errors.push(err(format!("model.classes[{i}]"), format!("class {c:?} is empty or repeated")));
        }
    }
    if m.classes.len() == 1 {
        errors.push(err("model.classes", "a classifier needs at least two classes"));
    }

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
    }

    let t = &spec.training;
    if t.epochs == 0 {
        errors.push(err("training.epochs", "must be at least 1"));
    }
    if t.batch_size == 0 {
        errors.push(err("training.batchSize", "must be at least 1"));
    }
    if !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
        errors.push(err("training.learningRate", format!("{} must be a positive number", t.learning_rate)));
    }
    if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
        errors.push(err("training.weightDecay", "must be zero or positive"));
    }
    if !(0.0..0.5).contains(&t.validation_fraction) {
        errors.push(err("training.validationFraction", format!("{} is outside [0, 0.5)", t.validation_fraction)));
    }
    let a = &t.augment;
    if !(0.0..=1.0).contains(&a.min_scale) || a.min_scale < 0.1 {
        errors.push(err("training.augment.minScale", format!("{} is outside [0.1, 1]", a.min_scale)));
    }
    if !(0.0..=180.0).contains(&a.rotation_degrees) {
        errors.push(err("training.augment.rotationDegrees", "must be within 0..=180"));
    }
    if !(0.0..=1.0).contains(&a.color_jitter) {
        errors.push(err("training.augment.colorJitter", "must be within 0..=1"));
    }

    let mg = &spec.merge;
    if !(mg.lambda.is_finite() && (0.0..=4.0).contains(&mg.lambda)) {
        errors.push(err("merge.lambda", format!("{} is outside [0, 4]", mg.lambda)));
    }
    if !(mg.ties_density > 0.0 && mg.ties_density <= 1.0) {
        errors.push(err("merge.tiesDensity", format!("{} is outside (0, 1]", mg.ties_density)));
    }
    if !(0.0..0.99 + f64::EPSILON).contains(&mg.dare_drop_rate) {
        errors.push(err("merge.dareDropRate", format!("{} is outside [0, 0.99]", mg.dare_drop_rate)));
    }
    let with_data = spec.shards.iter().filter(|s| s.data.is_some()).count();
    if spec.restore.mode != RestoreMode::None && with_data == 0 && !spec.shards.is_empty() {
        errors.push(err("restore.mode", format!("{} needs at least one shard with data; use none", spec.restore.mode.as_str())));
    }
    if let Some(lr) = spec.restore.learning_rate {
        if !(lr.is_finite() && lr > 0.0) {
            errors.push(err("restore.learningRate", "must be a positive number"));
        }
    }
    if mg.baselines.contains(&Baseline::FullTraining) && with_data != spec.shards.len() {
        errors.push(err("merge.baselines", "fullTraining needs the data of every shard; external shards have none here"));
    }
    if let Some(min) = spec.cluster.min_shards {
        if min == 0 || min as usize > spec.shards.len() {
            errors.push(err("cluster.minShards", format!("{min} must be between 1 and the number of shards ({})", spec.shards.len())));
        }
    }
    let positive = [
        ("cluster.activeDeadlineSeconds", spec.cluster.active_deadline_seconds),
        ("cluster.stragglerDeadlineSeconds", spec.cluster.straggler_deadline_seconds),
    ];
    for (field, value) in positive {
        if let Some(v) = value.filter(|v| *v <= 0) {
            errors.push(err(field, format!("{v} must be a positive number of seconds")));
        }
    }
    if let Some(ttl) = spec.cluster.ttl_seconds_after_finished.filter(|t| *t < 0) {
        errors.push(err("cluster.ttlSecondsAfterFinished", format!("{ttl} must not be negative")));
    }
    let quantities = [("cluster.resources.cpu", &spec.cluster.resources.cpu), ("cluster.resources.memory", &spec.cluster.resources.memory)];
    for (field, value) in quantities {
        if let Some(q) = value.as_deref().filter(|q| !is_quantity(q)) {
            errors.push(err(field, format!("{q:?} is not a Kubernetes quantity (e.g. \"4\", \"500m\", \"16Gi\")")));
        }
    }
    if spec.cluster.image.is_empty() {
        errors.push(err("cluster.image", "must not be empty"));
    }
    let ev = &spec.evaluation;
    if !(0.0..=1.0).contains(&ev.operating_point) {
        errors.push(err("evaluation.operatingPoint", format!("{} is outside [0, 1]", ev.operating_point)));
    }
    if ev.explain_images > 10_000 {
        errors.push(err("evaluation.explainImages", format!("{} is above 10000", ev.explain_images)));
    }
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
mod tests {
    use super::*;
    use crate::spec::*;

    fn good() -> MergeJobSpec {
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
    fn a_minimal_spec_is_valid_and_gets_paper_defaults() {
        let s = good();
        assert_eq!(validate(&s), Ok(()));
        assert_eq!(s.merge.lambda, 0.5);
        assert_eq!(s.training.seed, 3315);
        assert_eq!(s.restore.mode, RestoreMode::BnRecalibrate);
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
            ("storage", |s| s.storage.s3 = Some(S3Storage { bucket: "b".into(), endpoint: None, region: "r".into(), path_style: true, credentials_secret: None })),
            ("storage.s3.bucket", |s| {
                s.storage.local = None;
                s.storage.s3 = Some(S3Storage { bucket: String::new(), endpoint: None, region: "r".into(), path_style: true, credentials_secret: None });
            }),
            ("cluster.minShards", |s| s.cluster.min_shards = Some(3)),
            ("cluster.image", |s| s.cluster.image.clear()),
            ("cluster.activeDeadlineSeconds", |s| s.cluster.active_deadline_seconds = Some(0)),
            ("cluster.stragglerDeadlineSeconds", |s| s.cluster.straggler_deadline_seconds = Some(-5)),
            ("cluster.ttlSecondsAfterFinished", |s| s.cluster.ttl_seconds_after_finished = Some(-1)),
            ("cluster.resources.memory", |s| s.cluster.resources.memory = Some("16 GB".into())),
            ("cluster.resources.cpu", |s| s.cluster.resources.cpu = Some("four".into())),
            ("merge.baselines", |s| {
                s.shards[1] = ShardSpec { name: "b".into(), data: None, vector: Some("v".into()), secret_ref: None, node_selector: Default::default(), tolerations: vec![] };
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
}
