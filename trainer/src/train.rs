//! Fine-tuning a network on one labelled set.

use std::io::IsTerminal;
use std::time::Instant;

use medmerge_crds::{Optimizer, Schedule, TrainingSpec};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tch::nn::OptimizerConfig;
use tch::{nn, Device, Kind, Reduction, Tensor};
use tracing::{info, info_span};

use crate::data::{BatchLoader, DataError, Dataset};
use crate::model::precision::bfloat16_autocast;
use crate::model::Network;

/// Errors while training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Reading images failed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A libtorch operation failed.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// Scoring the validation split failed.
    #[error(transparent)]
    Validation(#[from] crate::evaluate::EvalError),
    /// The loss diverged.
    #[error("{label}: loss became {loss} in epoch {epoch}; lower the learning rate")]
    Diverged { label: String, epoch: u32, loss: f64 },
    /// Too few images to train (batch normalisation needs two per batch).
    #[error("{label}: {images} image(s) is too few to fine-tune (batch normalisation needs at least 2); give this shard more images or leave it out")]
    TooFewImages { label: String, images: usize },
}

/// One epoch's numbers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochLog {
    /// 1-based epoch.
    pub epoch: u32,
    /// Mean training loss.
    pub loss: f64,
    /// Training accuracy (with augmentation, in train mode).
    pub train_accuracy: f64,
    /// Accuracy on the held-out validation part, when there is one.
    pub validation_accuracy: Option<f64>,
    /// Balanced accuracy (mean recall over the classes present) on the validation part: what
    /// picks the best epoch, so that a majority class cannot carry it.
    #[serde(default)]
    pub validation_balanced_accuracy: Option<f64>,
    /// Training images per second.
    pub images_per_second: f64,
}

/// What a training run did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainReport {
    /// Per-epoch numbers.
    pub epochs: Vec<EpochLog>,
    /// The epoch whose weights were kept.
    pub best_epoch: u32,
    /// Training images per class.
    pub class_counts: Vec<u64>,
}

/// Inverse-frequency class weights `n / (k * n_c)` (0 for absent classes).
pub fn class_weights(counts: &[u64]) -> Vec<f32> {
    let n: u64 = counts.iter().sum();
    let k = counts.iter().filter(|&&c| c > 0).count().max(1) as f64;
    counts.iter().map(|&c| if c == 0 { 0.0 } else { (n as f64 / (k * c as f64)) as f32 }).collect()
}

/// Multi-label positive weights `negatives / positives` per class (1 for absent classes).
pub fn positive_weights(positives: &[u64], n: u64) -> Vec<f32> {
    positives.iter().map(|&p| if p == 0 { 1.0 } else { (n - p) as f32 / p as f32 }).collect()
}

/// Learning rate at `step` of `total`.
pub fn learning_rate(schedule: Schedule, peak: f64, step: usize, total: usize) -> f64 {
    match schedule {
        Schedule::Constant => peak,
        Schedule::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total.max(1) as f64).cos()),
    }
}

/// Fine-tunes `net` on `data` with `spec`; keeps the best epoch by validation balanced accuracy
/// when `spec.validationFraction > 0`, else the last.
pub fn train(net: &mut Network, data: &Dataset, spec: &TrainingSpec, device: Device, label: &str) -> Result<TrainReport, TrainError> {
    if data.samples.len() < 2 {
        return Err(TrainError::TooFewImages { label: label.into(), images: data.samples.len() });
    }
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut all: Vec<usize> = (0..data.samples.len()).collect();
    all.shuffle(&mut rng);
    // Two images: nothing to hold out that would leave a batch to train on.
    let n_val = if spec.validation_fraction > 0.0 && all.len() >= 3 { ((all.len() as f64 * spec.validation_fraction).round() as usize).clamp(1, all.len() - 1) } else { 0 };
    let val = data.subset(&all[..n_val]);
    let train_idx: Vec<usize> = all[n_val..].to_vec();
    let train_set = data.subset(&train_idx);
    let counts = train_set.class_counts();
    let weights = spec.class_weighting.then(|| {
        let w = if data.multi_label { positive_weights(&counts, train_set.samples.len() as u64) } else { class_weights(&counts) };
        Tensor::from_slice(&w).to_device(device)
    });

    let mut opt = match spec.optimizer {
        Optimizer::Adam => nn::Adam { wd: spec.weight_decay, ..Default::default() }.build(&net.vs, spec.learning_rate)?,
        Optimizer::AdamW => nn::AdamW { wd: spec.weight_decay, ..Default::default() }.build(&net.vs, spec.learning_rate)?,
        Optimizer::Sgd => nn::Sgd { momentum: 0.9, nesterov: true, wd: spec.weight_decay, ..Default::default() }.build(&net.vs, spec.learning_rate)?,
    };
    let batch = spec.batch_size as usize;
    let steps_per_epoch = train_set.samples.len().div_ceil(batch);
    let total_steps = steps_per_epoch * spec.epochs as usize;
    let bar = progress_bar(total_steps as u64, label);
    let mut epochs = Vec::new();
    let mut best: Option<(f64, u32, Vec<Tensor>)> = None;
    let mut step = 0;
    let mixed_precision = spec.mixed_precision && device.is_cuda();
    for epoch in 1..=spec.epochs {
        let _span = info_span!("epoch", shard = %label, epoch).entered();
        let started = Instant::now();
        let mut order: Vec<usize> = (0..train_set.samples.len()).collect();
        order.shuffle(&mut rng);
        // Summed on the device and read once per epoch: a read-back each step would make the CPU
        // wait for the GPU before it queues the next step.
        let mut loss_sum = Tensor::zeros([], (Kind::Double, device));
        let mut correct = Tensor::zeros([], (Kind::Int64, device));
        let mut seen = 0usize;
        let aug_seed = spec.seed.wrapping_add(epoch as u64 * 7919);
        for b in BatchLoader::new(&train_set, order, batch, net.image_size, Some(spec.augment.clone()), aug_seed, device) {
            let b = b?;
            opt.set_lr(learning_rate(spec.schedule, spec.learning_rate, step, total_steps));
            let logits = if mixed_precision { bfloat16_autocast(|| net.forward_t(&b.images, true)) } else { net.forward_t(&b.images, true) };
            let n = b.indices.len();
            let loss = match &b.targets {
                Some(t) => logits.f_binary_cross_entropy_with_logits(t, None::<&Tensor>, weights.as_ref(), Reduction::Mean)?,
                None => logits.f_cross_entropy_loss(&b.labels, weights.as_ref(), Reduction::Mean, -100, 0.0)?,
            };
            opt.backward_step(&loss);
            tch::no_grad(|| {
                let _ = loss_sum.f_add_(&(loss.to_kind(Kind::Double) * n as f64))?;
                let right = match &b.targets {
                    // Multi-label: count images whose every label is right at threshold 0.5.
                    Some(t) => logits.ge(0.0).to_kind(Kind::Float).eq_tensor(t).all_dim(-1, false),
                    None => logits.argmax(-1, false).eq_tensor(&b.labels),
                };
                correct.f_add_(&right.sum(Kind::Int64)).map(drop)
            })?;
            seen += n;
            step += 1;
            if let Some(bar) = &bar {
                bar.inc(1);
            }
        }
        let (loss_sum, correct) = (loss_sum.double_value(&[]), correct.int64_value(&[]) as usize);
        let loss = loss_sum / seen.max(1) as f64;
        if !loss.is_finite() {
            return Err(TrainError::Diverged { label: label.into(), epoch, loss });
        }
        let validation = if val.samples.is_empty() { None } else { Some(crate::evaluate::evaluate(net, &val, batch, device)?) };
        let log = EpochLog {
            epoch,
            loss,
            train_accuracy: correct as f64 / seen.max(1) as f64,
            validation_accuracy: validation.as_ref().map(|m| m.accuracy),
            validation_balanced_accuracy: validation.as_ref().map(|m| m.balanced_accuracy),
            images_per_second: seen as f64 / started.elapsed().as_secs_f64(),
        };
        info!(shard = %label, epoch, loss = log.loss, train_accuracy = log.train_accuracy, validation_accuracy = ?log.validation_accuracy, validation_balanced_accuracy = ?log.validation_balanced_accuracy, images_per_second = log.images_per_second, "epoch done");
        if let Some(acc) = log.validation_balanced_accuracy {
            if best.as_ref().is_none_or(|(b, _, _)| acc > *b) {
                best = Some((acc, epoch, net.named_tensors().iter().map(|(_, t)| t.copy()).collect()));
            }
        }
        epochs.push(log);
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let best_epoch = match best {
        Some((_, epoch, snapshot)) => {
            for ((_, mut var), saved) in net.named_tensors().into_iter().zip(snapshot) {
                tch::no_grad(|| var.f_copy_(&saved))?;
            }
            epoch
        }
        None => spec.epochs,
    };
    Ok(TrainReport { epochs, best_epoch, class_counts: counts })
}

fn progress_bar(total: u64, label: &str) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps {elapsed}<{eta}").ok()?.progress_chars("=> "));
    bar.set_prefix(label.to_string());
    Some(bar)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_weights_balance_the_classes() {
        assert_eq!(class_weights(&[30, 10, 0]), vec![40.0 / 60.0, 40.0 / 20.0, 0.0]);
    }

    #[test]
    fn cosine_schedule_starts_at_peak_and_ends_at_zero() {
        assert_eq!(learning_rate(Schedule::Cosine, 1.0, 0, 10), 1.0);
        assert!(learning_rate(Schedule::Cosine, 1.0, 10, 10).abs() < 1e-12);
        assert_eq!(learning_rate(Schedule::Constant, 0.3, 5, 10), 0.3);
    }
}
