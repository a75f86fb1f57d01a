//! A classification head fitted in closed form from statistics each hospital computes alone.
//!
//! Each shard runs the (merged, recalibrated) backbone over its images in eval mode and reports,
//! for its pooled features `x` (dimension `d`): the image count per class, the per-class feature
//! sums `[K, d]` and the feature Gram matrix `Σ x xᵀ` `[d, d]`. Summed over shards these are exactly
//! the statistics of the pooled data, from which the coordinator fits shrinkage linear
//! discriminant analysis: class means `μ_c`, the pooled within-class covariance `Σ`, shrunk towards
//! `tr(Σ)/d · I`, and the head `W_c = Σ⁻¹ μ_c`, `b_c = −½ μ_cᵀ Σ⁻¹ μ_c` (equal class priors, so the
//! head targets balanced accuracy, as class-weighted training does).
//!
//! What leaves a hospital: per-class means of a `d`-dimensional feature vector and one `d × d`
//! second-moment matrix over all its images; no single image's features unless a class has a
//! single image there (then its sum is that image's features).

use std::path::Path;

use safetensors::tensor::Dtype;
use tch::{Device, Kind, Tensor};

use super::RestoreError;
use crate::checkpoint::{ArtifactKind, ArtifactMeta};
use crate::data::{BatchLoader, Dataset};
use crate::model::Network;
use crate::st::{MappedFile, StreamWriter, TensorMeta};

/// Shrinkage of the within-class covariance towards a scaled identity. Fixed rather than tuned:
/// with `d` = 1,280 features (EfficientNet-Lite0) and a few thousand images the unshrunk estimate
/// is badly conditioned, and 0.1 is a conventional middle ground (see bench/results/paper-table.md
/// for the measured effect).
pub const SHRINKAGE: f64 = 0.1;

/// Per-class feature statistics of one shard (or of several, summed).
#[derive(Debug)]
pub struct ClassFeatures {
    /// Images per class `[K]`.
    pub counts: Vec<f64>,
    /// Per-class feature sums `[K, d]`, f64 on the CPU.
    pub sums: Tensor,
    /// Feature Gram matrix `Σ x xᵀ` `[d, d]`, f64 on the CPU.
    pub gram: Tensor,
}

/// Runs `net`'s backbone over `data` and accumulates its per-class feature statistics.
pub fn collect_class_features(net: &Network, data: &Dataset, batch_size: usize, device: Device) -> Result<ClassFeatures, RestoreError> {
    if net.multi_label {
        return Err(RestoreError::Head("multi-label models have no single class per image; use bnRecalibrate or averagedEpoch".into()));
    }
    let k = net.classes.len() as i64;
    let mut counts = vec![0.0; k as usize];
    let mut sums: Option<Tensor> = None;
    let mut gram: Option<Tensor> = None;
    let order: Vec<usize> = (0..data.samples.len()).collect();
    for batch in BatchLoader::new(data, order, batch_size, net.image_size, None, 0, device) {
        let batch = batch?;
        let x = tch::no_grad(|| net.pooled_features(&batch.images)).f_to_kind(Kind::Double)?.f_to_device(Device::Cpu)?;
        let labels = batch.labels.f_to_device(Device::Cpu)?;
        let d = x.size()[1];
        let s = sums.get_or_insert_with(|| Tensor::zeros([k, d], (Kind::Double, Device::Cpu)));
        *s = s.f_index_add(0, &labels, &x)?;
        let g = gram.get_or_insert_with(|| Tensor::zeros([d, d], (Kind::Double, Device::Cpu)));
        *g += x.f_transpose(0, 1)?.f_matmul(&x)?;
        for label in Vec::<i64>::try_from(&labels)? {
            counts[label as usize] += 1.0;
        }
    }
    match (sums, gram) {
        (Some(sums), Some(gram)) => Ok(ClassFeatures { counts, sums, gram }),
        _ => Err(RestoreError::Head(format!("{}: no images", data.source.display()))),
    }
}

/// Adds shards' statistics.
pub fn combine(parts: Vec<ClassFeatures>) -> Result<ClassFeatures, RestoreError> {
    let mut iter = parts.into_iter();
    let mut total = iter.next().ok_or_else(|| RestoreError::Head("no shard reported head statistics".into()))?;
    for p in iter {
        if p.sums.size() != total.sums.size() || p.gram.size() != total.gram.size() {
            return Err(RestoreError::Head(format!("shards disagree on the feature size: {:?} vs {:?}", p.sums.size(), total.sums.size())));
        }
        total.counts.iter_mut().zip(&p.counts).for_each(|(a, b)| *a += b);
        total.sums += p.sums;
        total.gram += p.gram;
    }
    Ok(total)
}

/// Fits the shrinkage-LDA head: `(weight [K, d], bias [K])` as f32, and which classes had images
/// (a class no shard has keeps its current head row).
pub fn fit_lda(stats: &ClassFeatures, shrinkage: f64) -> Result<(Tensor, Tensor, Vec<bool>), RestoreError> {
    let present: Vec<bool> = stats.counts.iter().map(|&c| c > 0.0).collect();
    let n: f64 = stats.counts.iter().sum();
    let k_present = present.iter().filter(|&&p| p).count() as f64;
    if n - k_present < 1.0 {
        return Err(RestoreError::Head(format!("{n} images in {k_present} classes are too few to estimate a covariance")));
    }
    let d = stats.gram.size()[0];
    let safe_counts: Vec<f64> = stats.counts.iter().map(|&c| c.max(1.0)).collect();
    let means = stats.sums.f_div(&Tensor::from_slice(&safe_counts).f_unsqueeze(1)?)?;
    // Within-class scatter: Σ x xᵀ − Σ_c n_c μ_c μ_cᵀ.
    let between = stats.sums.f_transpose(0, 1)?.f_matmul(&means)?;
    let cov = (&stats.gram - between).f_div_scalar(n - k_present)?;
    let cov = (&cov + cov.f_transpose(0, 1)?).f_mul_scalar(0.5)?;
    let scale = cov.f_trace()?.double_value(&[]) / d as f64;
    if !scale.is_finite() || scale <= 0.0 {
        return Err(RestoreError::Head(format!("the features have no variance (trace/d = {scale}); the backbone is broken")));
    }
    let eye = Tensor::f_eye(d, (Kind::Double, Device::Cpu))?;
    let shrunk = cov.f_mul_scalar(1.0 - shrinkage)? + eye.f_mul_scalar(shrinkage * scale)?;
    let w = Tensor::f_linalg_solve(&shrunk, &means.f_transpose(0, 1)?, true)?.f_transpose(0, 1)?;
    let bias = w.f_mul(&means)?.f_sum_dim_intlist([1i64].as_slice(), false, Kind::Double)?.f_mul_scalar(-0.5)?;
    if w.isfinite().all().int64_value(&[]) == 0 || bias.isfinite().all().int64_value(&[]) == 0 {
        return Err(RestoreError::Head("the fitted head is not finite".into()));
    }
    Ok((w.f_to_kind(Kind::Float)?, bias.f_to_kind(Kind::Float)?, present))
}

/// Replaces `net`'s head rows of the present classes with `(weight, bias)`.
pub fn apply_head(net: &Network, weight: &Tensor, bias: &Tensor, present: &[bool]) -> Result<(), RestoreError> {
    let (w, b) = net.head().ok_or_else(|| RestoreError::Head("the model has no linear head".into()))?;
    if w.size() != weight.size() {
        return Err(RestoreError::Head(format!("the model's head is {:?}, the fitted one {:?}", w.size(), weight.size())));
    }
    let dev = w.device();
    tch::no_grad(|| -> Result<(), tch::TchError> {
        for (c, _) in present.iter().enumerate().filter(|(_, p)| **p) {
            let c = c as i64;
            w.f_get(c)?.f_copy_(&weight.f_get(c)?.f_to_device(dev)?)?;
            b.f_get(c)?.f_copy_(&bias.f_get(c)?.f_to_device(dev)?)?;
        }
        Ok(())
    })?;
    Ok(())
}

/// Writes a shard's statistics (F64) with the model's metadata, atomically.
pub fn save(path: &Path, stats: &ClassFeatures, meta: &ArtifactMeta) -> Result<(), RestoreError> {
    let (k, d) = (stats.counts.len(), stats.gram.size()[0] as usize);
    let metas = vec![
        TensorMeta { name: "counts".into(), dtype: Dtype::F64, shape: vec![k] },
        TensorMeta { name: "sums".into(), dtype: Dtype::F64, shape: vec![k, d] },
        TensorMeta { name: "gram".into(), dtype: Dtype::F64, shape: vec![d, d] },
    ];
    let meta = ArtifactMeta { kind: ArtifactKind::HeadStats, ..meta.clone() };
    let mut w = StreamWriter::create(path, metas, &meta.to_map())?;
    let bytes = |v: &[f64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    w.write("counts", &bytes(&stats.counts))?;
    for (name, t) in [("sums", &stats.sums), ("gram", &stats.gram)] {
        let flat = Vec::<f64>::try_from(&t.f_contiguous()?.f_view([-1])?)?;
        w.write(name, &bytes(&flat))?;
    }
    Ok(w.finish()?)
}

/// Reads statistics written by [`save`], checking their shapes against each other.
pub fn load(path: &Path) -> Result<ClassFeatures, RestoreError> {
    let f = MappedFile::open(path)?;
    ArtifactMeta::from_map(path, f.metadata(), ArtifactKind::HeadStats)?;
    let bad = |reason: String| RestoreError::HeadStats { path: path.display().to_string(), reason };
    let counts = f.f64("counts")?;
    let (sums, gram) = (f.f64("sums")?, f.f64("gram")?);
    let k = counts.len();
    let d = sums.len().checked_div(k).unwrap_or(0);
    if k == 0 || d == 0 || sums.len() != k * d || gram.len() != d * d {
        return Err(bad(format!("{} counts, {} sums and {} Gram entries do not make [K], [K, d] and [d, d]", counts.len(), sums.len(), gram.len())));
    }
    if counts.iter().chain(&sums).chain(&gram).any(|v| !v.is_finite()) || counts.iter().any(|&c| c < 0.0) {
        return Err(bad("negative counts or non-finite values".into()));
    }
    Ok(ClassFeatures { counts, sums: Tensor::from_slice(&sums).view([k as i64, d as i64]), gram: Tensor::from_slice(&gram).view([d as i64, d as i64]) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats_of(points: &[(usize, [f64; 2])], k: usize) -> ClassFeatures {
        let mut counts = vec![0.0; k];
        let mut sums = vec![0.0; k * 2];
        let mut gram = [0.0; 4];
        for (c, x) in points {
            counts[*c] += 1.0;
            sums[c * 2] += x[0];
            sums[c * 2 + 1] += x[1];
            for i in 0..2 {
                for j in 0..2 {
                    gram[i * 2 + j] += x[i] * x[j];
                }
            }
        }
        ClassFeatures { counts, sums: Tensor::from_slice(&sums).view([k as i64, 2]), gram: Tensor::from_slice(&gram).view([2, 2]) }
    }

    #[test]
    fn lda_from_summed_shard_statistics_separates_two_gaussian_classes() {
        let a = [(0, [1.0, 0.1]), (0, [1.2, -0.1]), (1, [-1.0, 0.2])];
        let b = [(1, [-1.1, -0.2]), (0, [0.9, 0.0]), (1, [-0.9, 0.05])];
        let total = combine(vec![stats_of(&a, 2), stats_of(&b, 2)]).unwrap();
        let pooled = stats_of(&[a.as_slice(), b.as_slice()].concat(), 2);
        assert!(total.gram.allclose(&pooled.gram, 1e-12, 1e-12, false));
        let (w, bias, present) = fit_lda(&total, SHRINKAGE).unwrap();
        assert_eq!(present, vec![true, true]);
        for (c, x) in a.iter().chain(&b) {
            let logits = w.matmul(&Tensor::from_slice(&x.map(|v| v as f32))) + &bias;
            assert_eq!(logits.argmax(0, false).int64_value(&[]), *c as i64, "{x:?}");
        }
    }

    #[test]
    fn a_class_no_shard_has_is_reported_absent_and_too_few_images_are_refused() {
        let s = stats_of(&[(0, [1.0, 0.0]), (0, [1.5, 0.3]), (2, [-1.0, 0.4]), (2, [-1.2, 0.1])], 3);
        let (_, _, present) = fit_lda(&s, SHRINKAGE).unwrap();
        assert_eq!(present, vec![true, false, true]);
        let err = fit_lda(&stats_of(&[(0, [1.0, 0.0]), (1, [0.0, 1.0])], 2), SHRINKAGE).unwrap_err();
        assert!(err.to_string().contains("too few"), "{err}");
    }
}
