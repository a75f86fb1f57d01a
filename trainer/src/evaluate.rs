//! Running a network over a labelled set and scoring it.

use tch::Device;

use crate::data::{BatchLoader, DataError, Dataset};
use crate::metrics::{classification_metrics, multilabel_metrics, Metrics};
use crate::model::{tensor_to_vec, Network};

/// Why a network could not be run over a set.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Reading images failed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A libtorch operation failed.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Class probabilities for every image of `data`, in order.
pub fn predict(net: &Network, data: &Dataset, batch_size: usize, device: Device) -> Result<Vec<Vec<f32>>, EvalError> {
    let order: Vec<usize> = (0..data.samples.len()).collect();
    let k = net.classes.len();
    let mut out = Vec::with_capacity(data.samples.len());
    for b in BatchLoader::new(data, order, batch_size, net.image_size, None, 0, device) {
        let b = b?;
        let logits = tch::no_grad(|| net.forward_t(&b.images, false));
        let probs = net.probabilities(&logits);
        out.extend(tensor_to_vec(&probs)?.chunks(k).map(<[f32]>::to_vec));
    }
    Ok(out)
}

/// Metrics of `net` on `data`.
pub fn evaluate(net: &Network, data: &Dataset, batch_size: usize, device: Device) -> Result<Metrics, EvalError> {
    Ok(score(&predict(net, data, batch_size, device)?, data, net.classes.len()))
}

/// Whether each image of `data` is a case of class `class` (its label, or one of its targets).
pub fn is_case(data: &Dataset, class: usize) -> Vec<bool> {
    data.samples.iter().map(|s| if data.multi_label { s.targets.get(class) == Some(&1) } else { s.label == class }).collect()
}

/// Metrics of predicted probabilities `probs` against `data`'s labels.
pub fn score(probs: &[Vec<f32>], data: &Dataset, classes: usize) -> Metrics {
    if data.multi_label {
        let targets: Vec<Vec<u8>> = data.samples.iter().map(|s| s.targets.clone()).collect();
        return multilabel_metrics(probs, &targets, classes);
    }
    let labels: Vec<usize> = data.samples.iter().map(|s| s.label).collect();
    classification_metrics(probs, &labels, classes)
}
