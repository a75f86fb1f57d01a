//! Averaging the models the shards trained in parallel from the same start (one round of
//! federated averaging), weighted by how many images each trained on.

use std::path::PathBuf;

use tch::{Device, Kind, Tensor};

use super::RestoreError;
use crate::checkpoint::{ArtifactKind, ArtifactMeta};
use crate::model::Network;
use crate::st::MappedFile;

/// The image-weighted mean of `models` (same architecture, classes and size); shards that report
/// no images count as one. Returns the mean model on `device`.
pub fn average_models(models: &[PathBuf], device: Device) -> Result<Network, RestoreError> {
    let first = models.first().ok_or(RestoreError::NoParts { round: medmerge_crds::RestoreRound::Epoch(1).kind() })?;
    let net = Network::load(first, device)?;
    let mut files = Vec::new();
    let mut weights = Vec::new();
    for path in models {
        let f = MappedFile::open(path)?;
        let meta = ArtifactMeta::from_map(path, f.metadata(), ArtifactKind::Model)?;
        weights.push(meta.samples().max(1) as f64);
        files.push(f);
    }
    let total: f64 = weights.iter().sum();
    for (name, mut var) in net.named_tensors() {
        let mut acc = Tensor::zeros(var.size(), (Kind::Double, Device::Cpu));
        for (f, w) in files.iter().zip(&weights) {
            let meta = f.meta(&name).ok_or_else(|| crate::model::ModelError::MissingTensor { path: f.path().into(), name: name.clone(), arch: net.arch.as_str() })?;
            let shape: Vec<i64> = meta.shape.iter().map(|&d| d as i64).collect();
            if shape != var.size() {
                return Err(crate::model::ModelError::Shape { path: f.path().into(), name, found: shape, expected: var.size(), arch: net.arch.as_str() }.into());
            }
            acc += Tensor::from_slice(&f.f32(&name)?).view(shape.as_slice()).to_kind(Kind::Double) * (w / total);
        }
        tch::no_grad(|| var.f_copy_(&acc.to_kind(Kind::Float)))?;
    }
    Ok(net)
}
