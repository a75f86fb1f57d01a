//! Batch-norm recalibration: each shard runs the merged model over its images (batch statistics,
//! as in training) and records, per batch-norm layer and channel, the count, sum and sum of
//! squares of the layer's inputs. Only these moments leave the shard. Added over shards they give
//! exactly the mean and variance a single pass over all shards' batches would have seen.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::Dtype;
use tch::{Device, Kind, Tensor};

use super::RestoreError;
use crate::checkpoint::{ArtifactKind, ArtifactMeta};
use crate::data::{BatchLoader, Dataset};
use crate::model::Network;
use crate::st::{MappedFile, StreamWriter, TensorMeta};

/// Per-layer moments: `(count, sum per channel, sum of squares per channel)`.
pub type LayerMoments = BTreeMap<String, (f64, Vec<f64>, Vec<f64>)>;

/// Runs `net` over `data` and returns every batch-norm layer's input moments.
pub fn collect_moments(net: &Network, data: &Dataset, batch_size: usize, device: Device) -> Result<LayerMoments, RestoreError> {
    for bn in net.bns() {
        bn.start_collecting();
    }
    let order: Vec<usize> = (0..data.samples.len()).collect();
    let result = (|| {
        for batch in BatchLoader::new(data, order, batch_size, net.image_size, None, 0, device) {
            let batch = batch?;
            let _ = tch::no_grad(|| net.forward_t(&batch.images, false));
        }
        Ok::<_, RestoreError>(())
    })();
    let mut out = LayerMoments::new();
    for bn in net.bns() {
        if let Some(m) = bn.take_moments() {
            out.insert(bn.name.clone(), (m.count, to_f64(&m.sum)?, to_f64(&m.sum_sq)?));
        }
    }
    result.map(|_| out)
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>, tch::TchError> {
    Vec::<f64>::try_from(&t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Double)?)
}

/// Adds shards' moments layer by layer.
pub fn combine_moments(parts: &[LayerMoments]) -> LayerMoments {
    let mut total = LayerMoments::new();
    for part in parts {
        for (layer, (n, s, q)) in part {
            let e = total.entry(layer.clone()).or_insert_with(|| (0.0, vec![0.0; s.len()], vec![0.0; q.len()]));
            e.0 += n;
            e.1.iter_mut().zip(s).for_each(|(a, b)| *a += b);
            e.2.iter_mut().zip(q).for_each(|(a, b)| *a += b);
        }
    }
    total
}

/// Mean and unbiased variance per channel from moments.
pub fn mean_var(count: f64, sum: &[f64], sum_sq: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let mean: Vec<f64> = sum.iter().map(|s| s / count).collect();
    let correction = if count > 1.0 { count / (count - 1.0) } else { 1.0 };
    let var = sum_sq.iter().zip(&mean).map(|(q, m)| ((q / count - m * m).max(0.0)) * correction).collect();
    (mean, var)
}

/// Sets every batch-norm layer's running statistics from combined moments.
pub fn apply_moments(net: &Network, moments: &LayerMoments, source: &str) -> Result<(), RestoreError> {
    for bn in net.bns() {
        let channels = bn.inner.running_mean.size()[0] as usize;
        let (n, s, q) = moments.get(&bn.name).filter(|(_, s, _)| s.len() == channels).ok_or_else(|| RestoreError::Stats { path: source.into(), layer: bn.name.clone() })?;
        let (mean, var) = mean_var(*n, s, q);
        let dev = bn.inner.running_mean.device();
        let to_t = |v: &[f64]| Tensor::from_slice(v).to_kind(Kind::Float).to_device(dev);
        let (mut rm, mut rv) = (bn.inner.running_mean.shallow_clone(), bn.inner.running_var.shallow_clone());
        tch::no_grad(|| -> Result<(), tch::TchError> {
            rm.f_copy_(&to_t(&mean))?;
            rv.f_copy_(&to_t(&var))?;
            Ok(())
        })?;
    }
    Ok(())
}

/// Writes a shard's moments (F64) with the model's metadata, atomically.
pub fn save_moments(path: &Path, moments: &LayerMoments, meta: &ArtifactMeta) -> Result<(), RestoreError> {
    let mut metas = Vec::new();
    for (layer, (_, s, _)) in moments {
        metas.push(TensorMeta { name: format!("{layer}.count"), dtype: Dtype::F64, shape: vec![1] });
        metas.push(TensorMeta { name: format!("{layer}.sum"), dtype: Dtype::F64, shape: vec![s.len()] });
        metas.push(TensorMeta { name: format!("{layer}.sum_sq"), dtype: Dtype::F64, shape: vec![s.len()] });
    }
    let meta = ArtifactMeta { kind: ArtifactKind::BnStats, ..meta.clone() };
    let mut w = StreamWriter::create(path, metas, &meta.to_map())?;
    let bytes = |v: &[f64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    for (layer, (n, s, q)) in moments {
        w.write(&format!("{layer}.count"), &bytes(&[*n]))?;
        w.write(&format!("{layer}.sum"), &bytes(s))?;
        w.write(&format!("{layer}.sum_sq"), &bytes(q))?;
    }
    Ok(w.finish()?)
}

/// Reads moments written by [`save_moments`].
pub fn load_moments(path: &Path) -> Result<LayerMoments, RestoreError> {
    let f = MappedFile::open(path)?;
    ArtifactMeta::from_map(path, f.metadata(), ArtifactKind::BnStats)?;
    let mut out = LayerMoments::new();
    for t in f.tensors() {
        if let Some(layer) = t.name.strip_suffix(".count") {
            let bad = || RestoreError::Stats { path: path.display().to_string(), layer: layer.into() };
            let (count, sum, sum_sq) = (f.f64(&t.name)?, f.f64(&format!("{layer}.sum"))?, f.f64(&format!("{layer}.sum_sq"))?);
            // One positive count and finite sums of equal length, or the file is refused: an
            // empty count would index nothing, a zero one would divide by it.
            let n = match count.as_slice() {
                [n] if n.is_finite() && *n > 0.0 => *n,
                _ => return Err(bad()),
            };
            if sum.len() != sum_sq.len() || !sum.iter().chain(&sum_sq).all(|x| x.is_finite()) {
                return Err(bad());
            }
            out.insert(layer.into(), (n, sum, sum_sq));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combined_shard_moments_equal_the_moments_of_the_pooled_data() {
        let a = [1.0, 2.0, 4.0];
        let b = [10.0, -3.0];
        let moments = |xs: &[f64]| (xs.len() as f64, vec![xs.iter().sum()], vec![xs.iter().map(|x| x * x).sum()]);
        let shard = |xs: &[f64]| LayerMoments::from([("bn".to_string(), moments(xs))]);
        let combined = combine_moments(&[shard(&a), shard(&b)]);
        let (n, s, q) = &combined["bn"];
        let (mean, var) = mean_var(*n, s, q);
        let pooled = [1.0, 2.0, 4.0, 10.0, -3.0];
        let pm = pooled.iter().sum::<f64>() / 5.0;
        let pv = pooled.iter().map(|x| (x - pm).powi(2)).sum::<f64>() / 4.0;
        assert!((mean[0] - pm).abs() < 1e-12 && (var[0] - pv).abs() < 1e-12, "{mean:?} {var:?} vs {pm} {pv}");
    }
}
