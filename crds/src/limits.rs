//! Every numeric bound of a MergeJob spec, defined once: the CRD schema takes its `minimum`
//! and `maximum` from these constants (`#[schemars(range(..))]` in `spec.rs`) and `validate`
//! checks the same constants, so the API server and the operator accept exactly the same values.
//! A test walks every bounded field of the generated schema and checks both agree at and just
//! past each bound.

use std::fmt::Display;

use crate::validate::SpecError;

/// A number a spec field may hold.
pub trait Number: Copy + PartialOrd + Display {
    /// Whether the value is a real number (not NaN or infinite).
    fn is_real(self) -> bool;
    /// The value as `f64` (exact for every bound used here).
    fn as_f64(self) -> f64;
}

macro_rules! number {
    ($($t:ty),*) => {$(impl Number for $t {
        fn is_real(self) -> bool { (self as f64).is_finite() }
        fn as_f64(self) -> f64 { self as f64 }
    })*};
}
number!(u32, i32, i64, f64);

/// The values a numeric field accepts: from `min` (excluded when `min_exclusive`) up to `max`
/// (excluded when `max_exclusive`), or without an upper bound.
#[derive(Debug, Clone, Copy)]
pub struct Limit<T> {
    /// The field's path as errors name it, e.g. `training.epochs`.
    pub field: &'static str,
    /// The smallest accepted value (or the bound just below it, when `min_exclusive`).
    pub min: T,
    /// The largest accepted value (or the bound just above it, when `max_exclusive`).
    pub max: Option<T>,
    /// Whether `min` itself is refused (a positive learning rate).
    pub min_exclusive: bool,
    /// Whether `max` itself is refused.
    pub max_exclusive: bool,
}

impl<T: Number> Limit<T> {
    const fn closed(field: &'static str, min: T, max: T) -> Self {
        Limit { field, min, max: Some(max), min_exclusive: false, max_exclusive: false }
    }

    const fn at_least(field: &'static str, min: T) -> Self {
        Limit { field, min, max: None, min_exclusive: false, max_exclusive: false }
    }

    const fn above(field: &'static str, min: T) -> Self {
        Limit { field, min, max: None, min_exclusive: true, max_exclusive: false }
    }

    /// Whether `value` is a real number inside the bounds.
    pub fn allows(&self, value: T) -> bool {
        let above_min = if self.min_exclusive { value > self.min } else { value >= self.min };
        let below_max = match self.max {
            Some(max) if self.max_exclusive => value < max,
            Some(max) => value <= max,
            None => true,
        };
        value.is_real() && above_min && below_max
    }

    /// The error for `value`, naming the field and the accepted values, or None if it is allowed.
    pub fn check(&self, value: T) -> Option<SpecError> {
        (!self.allows(value)).then(|| SpecError { field: self.field.to_string(), message: format!("{value} {}", self.describe()) })
    }

    /// Like `check`, for the same field inside `prefix` (e.g. `shards[2].`).
    pub fn check_in(&self, prefix: &str, value: T) -> Option<SpecError> {
        self.check(value).map(|e| SpecError { field: format!("{prefix}{}", e.field), ..e })
    }

    /// Like `check`, for an optional field: an unset field is always allowed.
    pub fn check_optional(&self, value: Option<T>) -> Option<SpecError> {
        value.and_then(|v| self.check(v))
    }

    /// What a value outside the bounds is told, e.g. "is outside [0, 0.5)" or "must be above 0".
    pub fn describe(&self) -> String {
        match self.max {
            Some(max) => {
                let open = if self.min_exclusive { '(' } else { '[' };
                let close = if self.max_exclusive { ')' } else { ']' };
                format!("is outside {open}{}, {max}{close}", self.min)
            }
            None if self.min_exclusive => format!("must be above {}", self.min),
            None => format!("must be at least {}", self.min),
        }
    }
}

/// Declares each limit as a `pub const` and lists them all in [`all`].
macro_rules! limits {
    ($($(#[$doc:meta])* $name:ident: $ty:ty = $value:expr;)*) => {
        $($(#[$doc])* pub const $name: $ty = $value;)*

        /// Every limit of this module.
        pub fn all() -> Vec<Bounds> {
            vec![$($name.bounds()),*]
        }
    };
}

// Every limit, declared once: the constants and `all()` come from this list.
limits! {
    /// `cluster.backoffLimit`: retries of a stage Job.
    BACKOFF_LIMIT: Limit<i32> = Limit::closed("cluster.backoffLimit", 0, 20);
    /// `cluster.gpus`: the trainer uses one device.
    GPUS: Limit<u32> = Limit::closed("cluster.gpus", 0, 1);
    /// `cluster.minShards`; its upper bound, the number of shards, is checked by `validate`.
    MIN_SHARDS: Limit<u32> = Limit::at_least("cluster.minShards", 1);
    /// `cluster.activeDeadlineSeconds`.
    ACTIVE_DEADLINE_SECONDS: Limit<i64> = Limit::at_least("cluster.activeDeadlineSeconds", 1);
    /// `cluster.stragglerDeadlineSeconds`.
    STRAGGLER_DEADLINE_SECONDS: Limit<i64> = Limit::at_least("cluster.stragglerDeadlineSeconds", 1);
    /// `cluster.ttlSecondsAfterFinished`.
    TTL_SECONDS_AFTER_FINISHED: Limit<i32> = Limit::at_least("cluster.ttlSecondsAfterFinished", 0);
    /// `model.imageSize` in pixels.
    IMAGE_SIZE: Limit<u32> = Limit::closed("model.imageSize", 16, 1024);
    /// `training.epochs`.
    EPOCHS: Limit<u32> = Limit::closed("training.epochs", 1, 10_000);
    /// `training.batchSize`.
    BATCH_SIZE: Limit<u32> = Limit::closed("training.batchSize", 1, 4096);
    /// `training.learningRate`.
    LEARNING_RATE: Limit<f64> = Limit::above("training.learningRate", 0.0);
    /// `training.weightDecay`.
    WEIGHT_DECAY: Limit<f64> = Limit::at_least("training.weightDecay", 0.0);
    /// `training.validationFraction`: at most half of a shard held out. Inclusive: Kubernetes 1.20
    /// checks a default of 0.0 (sent as the integer 0) against an exclusive maximum of 0.5 read as
    /// the integer 0, and refuses the whole CRD.
    VALIDATION_FRACTION: Limit<f64> = Limit::closed("training.validationFraction", 0.0, 0.5);
    /// `training.augment.rotationDegrees` (an f32 field; its bounds are f64 so that the schema says
    /// 0.1, not the f32 0.10000000149 that would refuse a spec's 0.1).
    ROTATION_DEGREES: Limit<f64> = Limit::closed("training.augment.rotationDegrees", 0.0, 180.0);
    /// `training.augment.colorJitter`.
    COLOR_JITTER: Limit<f64> = Limit::closed("training.augment.colorJitter", 0.0, 1.0);
    /// `training.augment.minScale`.
    MIN_SCALE: Limit<f64> = Limit::closed("training.augment.minScale", 0.1, 1.0);
    /// `merge.lambda`.
    LAMBDA: Limit<f64> = Limit::closed("merge.lambda", 0.0, 4.0);
    /// `merge.tiesDensity`: TIES keeps at least some entries.
    TIES_DENSITY: Limit<f64> = Limit { field: "merge.tiesDensity", min: 0.0, max: Some(1.0), min_exclusive: true, max_exclusive: false };
    /// `merge.dareDropRate`.
    DARE_DROP_RATE: Limit<f64> = Limit::closed("merge.dareDropRate", 0.0, 0.99);
    /// `restore.learningRate`.
    RESTORE_LEARNING_RATE: Limit<f64> = Limit::above("restore.learningRate", 0.0);
    /// `restore.epochs`: each round is an epoch on every hospital, so a handful at most.
    RESTORE_EPOCHS: Limit<u32> = Limit::closed("restore.epochs", 1, 10);
    /// `release.privacy.epsilon` (and a shard's): a privacy loss; above 100 it promises nothing.
    EPSILON: Limit<f64> = Limit { field: "release.privacy.epsilon", min: 0.0, max: Some(100.0), min_exclusive: true, max_exclusive: false };
    /// `release.privacy.delta`: a failure probability, far below any cohort's 1/n.
    DELTA: Limit<f64> = Limit { field: "release.privacy.delta", min: 0.0, max: Some(0.01), min_exclusive: true, max_exclusive: false };
    /// `release.privacy.clipNorm`.
    CLIP_NORM: Limit<f64> = Limit::above("release.privacy.clipNorm", 0.0);
    /// `release.density`: the fraction of entries `topK` keeps.
    TOP_K_DENSITY: Limit<f64> = Limit { field: "release.density", min: 0.0, max: Some(1.0), min_exclusive: true, max_exclusive: false };
    /// `evaluation.operatingPoint`: a probability.
    OPERATING_POINT: Limit<f64> = Limit::closed("evaluation.operatingPoint", 0.0, 1.0);
    /// `evaluation.explainImages`.
    EXPLAIN_IMAGES: Limit<u32> = Limit::closed("evaluation.explainImages", 0, 10_000);
}

/// One limit with its bounds as `f64`, for tests that compare every limit with the schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Bounds {
    /// The field's path.
    pub field: &'static str,
    /// Lower bound.
    pub min: f64,
    /// Upper bound, if any.
    pub max: Option<f64>,
    /// Whether `min` is refused.
    pub min_exclusive: bool,
    /// Whether `max` is refused.
    pub max_exclusive: bool,
}

impl<T: Number> Limit<T> {
    fn bounds(&self) -> Bounds {
        Bounds { field: self.field, min: self.min.as_f64(), max: self.max.map(Number::as_f64), min_exclusive: self.min_exclusive, max_exclusive: self.max_exclusive }
    }
}

// The CRD schema (what the API server accepts) and `validate` (what the operator and the
// trainer accept) agree on every numeric bound: each bounded field of the generated schema is
// set at and just past its bounds in an otherwise valid spec, and `validate` must accept exactly
// the values the schema accepts. Every limit of `medmerge_crds::limits` must be in the schema.
#[cfg(test)]
mod schema_agreement {
    use kube::CustomResourceExt;
    use serde_json::{json, Value};

    use crate::{limits, validate, MergeJob, MergeJobSpec};

    /// A bounded field found in the schema: its path in the spec (`shards[0].x`) and its bounds.
    #[derive(Debug)]
    struct SchemaBound {
        path: String,
        integer: bool,
        min: Option<f64>,
        max: Option<f64>,
        min_exclusive: bool,
        max_exclusive: bool,
    }

    fn spec_schema() -> Value {
        let crd = serde_json::to_value(MergeJob::crd()).unwrap();
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
    }

    fn walk(schema: &Value, path: &str, out: &mut Vec<SchemaBound>) {
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (name, sub) in props {
                let child = if path.is_empty() { name.clone() } else { format!("{path}.{name}") };
                walk(sub, &child, out);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(items, &format!("{path}[0]"), out);
        }
        let number = |k: &str| schema.get(k).and_then(Value::as_f64);
        if number("minimum").is_some() || number("maximum").is_some() {
            out.push(SchemaBound {
                path: path.to_string(),
                integer: schema["type"] == "integer",
                min: number("minimum"),
                max: number("maximum"),
                min_exclusive: schema.get("exclusiveMinimum") == Some(&json!(true)),
                max_exclusive: schema.get("exclusiveMaximum") == Some(&json!(true)),
            });
        }
    }

    /// The validation tests' valid spec, as JSON, with the optional objects whose fields are
    /// bounded (a vector release with privacy, for the spec and a shard) set to valid values.
    fn good() -> Value {
        let mut spec = serde_json::to_value(crate::validate::tests::good()).unwrap();
        let release = json!({"privacy": {"epsilon": 1.0, "delta": 1e-6, "clipNorm": 1.0}});
        spec["release"] = release.clone();
        spec["shards"][0]["release"] = release;
        spec
    }

    fn set(spec: &mut Value, path: &str, value: Value) {
        let mut at = spec;
        let parts: Vec<&str> = path.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let (name, index) = match part.strip_suffix("[0]") {
                Some(name) => (name, true),
                None => (*part, false),
            };
            let last = i + 1 == parts.len();
            if last && !index {
                at[name] = value;
                return;
            }
            if at.get(name).is_none_or(Value::is_null) {
                at[name] = if index { json!([{}]) } else { json!({}) };
            }
            at = &mut at[name];
            if index {
                at = &mut at[0];
            }
        }
    }

    /// Whether a spec with `path` set to `value` gets through deserialization and `validate`
    /// without an error naming that field.
    fn accepted(path: &str, value: f64, integer: bool) -> bool {
        let mut spec = good();
        set(&mut spec, path, if integer { json!(value as i64) } else { json!(value) });
        let Ok(spec) = serde_json::from_value::<MergeJobSpec>(spec) else { return false };
        match validate(&spec) {
            Ok(()) => true,
            Err(errors) => !errors.iter().any(|e| e.field == path),
        }
    }

    fn schema_bounds() -> Vec<SchemaBound> {
        let mut bounds = Vec::new();
        walk(&spec_schema(), "", &mut bounds);
        bounds
    }

    #[test]
    fn validate_accepts_exactly_what_the_crd_schema_accepts_at_and_past_every_bound() {
        let bounds = schema_bounds();
        assert!(bounds.len() >= 15, "the walk found too few bounded fields: {bounds:?}");
        let mut disagreements = Vec::new();
        for b in &bounds {
            let step = |v: f64| if b.integer { 1.0 } else { 1e-6 * v.abs().max(1.0) };
            let mut cases = Vec::new();
            if let Some(min) = b.min {
                cases.push((min, !b.min_exclusive));
                cases.push((min - step(min), false));
                if b.min_exclusive {
                    cases.push((min + step(min), true));
                }
            }
            if let Some(max) = b.max {
                cases.push((max, !b.max_exclusive));
                cases.push((max + step(max), false));
                if b.max_exclusive {
                    cases.push((max - step(max), true));
                }
            }
            for (value, schema_accepts) in cases {
                if accepted(&b.path, value, b.integer) != schema_accepts {
                    disagreements.push(format!("{} = {value}: schema {}, validate the opposite", b.path, if schema_accepts { "accepts" } else { "refuses" }));
                }
            }
        }
        assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
    }

    #[test]
    fn every_limit_is_a_bound_of_the_crd_schema() {
        let bounds = schema_bounds();
        for limit in limits::all() {
            let Some(b) = bounds.iter().find(|b| b.path == limit.field) else { panic!("{} has a limit but no bound in the CRD schema", limit.field) };
            assert_eq!(b.min, Some(limit.min), "{}: minimum", limit.field);
            assert_eq!(b.max, limit.max, "{}: maximum", limit.field);
            assert_eq!((b.min_exclusive, b.max_exclusive), (limit.min_exclusive, limit.max_exclusive), "{}: exclusive bounds", limit.field);
        }
    }
}
