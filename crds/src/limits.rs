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

/// `cluster.backoffLimit`: retries of a stage Job.
pub const BACKOFF_LIMIT: Limit<i32> = Limit::closed("cluster.backoffLimit", 0, 20);
/// `cluster.gpus`: the trainer uses one device.
pub const GPUS: Limit<u32> = Limit::closed("cluster.gpus", 0, 1);
/// `cluster.minShards`; its upper bound, the number of shards, is checked by `validate`.
pub const MIN_SHARDS: Limit<u32> = Limit::at_least("cluster.minShards", 1);
/// `cluster.activeDeadlineSeconds`.
pub const ACTIVE_DEADLINE_SECONDS: Limit<i64> = Limit::at_least("cluster.activeDeadlineSeconds", 1);
/// `cluster.stragglerDeadlineSeconds`.
pub const STRAGGLER_DEADLINE_SECONDS: Limit<i64> = Limit::at_least("cluster.stragglerDeadlineSeconds", 1);
/// `cluster.ttlSecondsAfterFinished`.
pub const TTL_SECONDS_AFTER_FINISHED: Limit<i32> = Limit::at_least("cluster.ttlSecondsAfterFinished", 0);
/// `model.imageSize` in pixels.
pub const IMAGE_SIZE: Limit<u32> = Limit::closed("model.imageSize", 16, 1024);
/// `training.epochs`.
pub const EPOCHS: Limit<u32> = Limit::closed("training.epochs", 1, 10_000);
/// `training.batchSize`.
pub const BATCH_SIZE: Limit<u32> = Limit::closed("training.batchSize", 1, 4096);
/// `training.learningRate`.
pub const LEARNING_RATE: Limit<f64> = Limit::above("training.learningRate", 0.0);
/// `training.weightDecay`.
pub const WEIGHT_DECAY: Limit<f64> = Limit::at_least("training.weightDecay", 0.0);
/// `training.validationFraction`: at most half of a shard held out, never all of it.
pub const VALIDATION_FRACTION: Limit<f64> = Limit { field: "training.validationFraction", min: 0.0, max: Some(0.5), min_exclusive: false, max_exclusive: true };
/// `training.augment.rotationDegrees` (an f32 field; its bounds are f64 so that the schema says
/// 0.1, not the f32 0.10000000149 that would refuse a spec's 0.1).
pub const ROTATION_DEGREES: Limit<f64> = Limit::closed("training.augment.rotationDegrees", 0.0, 180.0);
/// `training.augment.colorJitter`.
pub const COLOR_JITTER: Limit<f64> = Limit::closed("training.augment.colorJitter", 0.0, 1.0);
/// `training.augment.minScale`.
pub const MIN_SCALE: Limit<f64> = Limit::closed("training.augment.minScale", 0.1, 1.0);
/// `merge.lambda`.
pub const LAMBDA: Limit<f64> = Limit::closed("merge.lambda", 0.0, 4.0);
/// `merge.tiesDensity`: TIES keeps at least some entries.
pub const TIES_DENSITY: Limit<f64> = Limit { field: "merge.tiesDensity", min: 0.0, max: Some(1.0), min_exclusive: true, max_exclusive: false };
/// `merge.dareDropRate`.
pub const DARE_DROP_RATE: Limit<f64> = Limit::closed("merge.dareDropRate", 0.0, 0.99);
/// `restore.learningRate`.
pub const RESTORE_LEARNING_RATE: Limit<f64> = Limit::above("restore.learningRate", 0.0);
/// `evaluation.operatingPoint`: a probability.
pub const OPERATING_POINT: Limit<f64> = Limit::closed("evaluation.operatingPoint", 0.0, 1.0);
/// `evaluation.explainImages`.
pub const EXPLAIN_IMAGES: Limit<u32> = Limit::closed("evaluation.explainImages", 0, 10_000);

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

/// Every limit above.
pub fn all() -> Vec<Bounds> {
    vec![
        BACKOFF_LIMIT.bounds(),
        GPUS.bounds(),
        MIN_SHARDS.bounds(),
        ACTIVE_DEADLINE_SECONDS.bounds(),
        STRAGGLER_DEADLINE_SECONDS.bounds(),
        TTL_SECONDS_AFTER_FINISHED.bounds(),
        IMAGE_SIZE.bounds(),
        EPOCHS.bounds(),
        BATCH_SIZE.bounds(),
        LEARNING_RATE.bounds(),
        WEIGHT_DECAY.bounds(),
        VALIDATION_FRACTION.bounds(),
        ROTATION_DEGREES.bounds(),
        COLOR_JITTER.bounds(),
        MIN_SCALE.bounds(),
        LAMBDA.bounds(),
        TIES_DENSITY.bounds(),
        DARE_DROP_RATE.bounds(),
        RESTORE_LEARNING_RATE.bounds(),
        OPERATING_POINT.bounds(),
        EXPLAIN_IMAGES.bounds(),
    ]
}
