//! A hospital's data vector on its way out: differential privacy first (clip, noise), then the
//! encoding (int8, top-k). Both run where the hospital trains, before the vector is written, so
//! the coordinator only ever sees the released vector; encoding after the noise is
//! post-processing and keeps the guarantee.

pub mod encoding;
pub mod privacy;

use std::collections::BTreeMap;

use medmerge_crds::results::{PrivacyRecord, ReleaseRecord};
use medmerge_crds::{ReleaseSpec, VectorEncoding};
use rand::Rng;

use crate::merge::is_bn_statistic;
use crate::st::TensorMeta;
use encoding::{encodable, encode, EncodedTensor, ENCODED_KEY};

/// Metadata key holding the vector's [`ReleaseRecord`] (without its size).
pub const RELEASE_KEY: &str = "release";

/// One tensor of a data vector.
#[derive(Clone, Debug, PartialEq)]
pub struct VectorTensor {
    /// Name, as in the model.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Values (delta from the base, or the head's own values).
    pub values: Vec<f32>,
}

/// A vector ready to be written: the stored tensors (parts of encoded ones included), metadata
/// to add to the file's, and what was done.
pub struct Released {
    /// Stored tensors with their bytes, in the order to write.
    pub parts: Vec<(TensorMeta, Vec<u8>)>,
    /// `encoded` and `release` metadata entries.
    pub metadata: BTreeMap<String, String>,
    /// What the release did (size not yet known).
    pub record: ReleaseRecord,
}

/// Releases `tensors` as `spec` asks. With privacy, batch-norm statistics are released as zero
/// (the merged model keeps the base's, and restoration re-estimates them), every other tensor
/// (head included) is clipped as one vector to `clipNorm` and gets Gaussian noise calibrated to
/// sensitivity `2 · clipNorm`; `rng` must be unpredictable to anyone but the hospital.
pub fn release(mut tensors: Vec<VectorTensor>, head_prefix: &str, spec: &ReleaseSpec, rng: &mut impl Rng) -> Released {
    let privacy = spec.privacy.map(|p| {
        let noise_stddev = privacy::calibrate_sigma(p.epsilon, p.delta, 2.0 * p.clip_norm);
        for t in tensors.iter_mut().filter(|t| is_bn_statistic(&t.name)) {
            t.values.iter_mut().for_each(|x| *x = 0.0);
        }
        let mut covered: Vec<&mut [f32]> = tensors.iter_mut().filter(|t| !is_bn_statistic(&t.name)).map(|t| t.values.as_mut_slice()).collect();
        privacy::clip(&mut covered, p.clip_norm);
        for values in covered {
            privacy::add_noise(values, noise_stddev, rng);
        }
        PrivacyRecord { epsilon: p.epsilon, delta: p.delta, clip_norm: p.clip_norm, noise_stddev }
    });
    let density = (spec.encoding == VectorEncoding::TopK).then(|| spec.top_k_density());
    let mut parts = Vec::new();
    let mut encoded = BTreeMap::new();
    for t in &tensors {
        let encoding = if encodable(&t.name, &t.shape, head_prefix) { spec.encoding } else { VectorEncoding::Float32 };
        if encoding != VectorEncoding::Float32 {
            encoded.insert(t.name.clone(), EncodedTensor { encoding, shape: t.shape.clone() });
        }
        parts.extend(encode(&t.values, &t.shape, encoding, density.unwrap_or(1.0)).parts(&t.name, &t.shape));
    }
    let record = ReleaseRecord { encoding: spec.encoding, density, bytes: None, privacy };
    let mut metadata = BTreeMap::new();
    if !encoded.is_empty() {
        metadata.insert(ENCODED_KEY.into(), serde_json::to_string(&encoded).expect("names and shapes serialise"));
    }
    metadata.insert(RELEASE_KEY.into(), serde_json::to_string(&record).expect("a record serialises"));
    Released { parts, metadata, record }
}

/// One line saying how a vector was released, e.g. `int8, 1.2 MB, (ε 4, δ 1e-6)-DP, clip 2, σ 0.8`.
pub fn describe_release(r: &ReleaseRecord) -> String {
    let mut parts = vec![r.encoding_label()];
    if r.bytes.is_some() {
        parts.push(r.size_label());
    }
    parts.push(r.privacy_label().unwrap_or_else(|| "no privacy noise".into()));
    parts.join(", ")
}

/// The release record in a vector file's metadata (vectors written before releases existed, or
/// by hand, have none: float32 without privacy).
pub fn recorded_release(metadata: &BTreeMap<String, String>) -> Option<ReleaseRecord> {
    metadata.get(RELEASE_KEY).and_then(|json| serde_json::from_str(json).ok())
}

#[cfg(test)]
mod tests {
    use medmerge_crds::PrivacySpec;
    use rand::SeedableRng;

    use super::*;

    fn vector() -> Vec<VectorTensor> {
        let t = |name: &str, shape: Vec<usize>, v: f32| VectorTensor { name: name.into(), values: vec![v; shape.iter().product()], shape };
        vec![t("conv.weight", vec![64, 16, 3, 3], 0.5), t("bn.running_var", vec![4], 0.25), t("bn.weight", vec![4], 0.5), t("fc.weight", vec![3, 4], 1.0)]
    }

    #[test]
    fn privacy_clips_everything_but_batch_norm_statistics_as_one_vector_then_adds_the_calibrated_noise() {
        let spec = ReleaseSpec { privacy: Some(PrivacySpec { epsilon: 4.0, delta: 1e-6, clip_norm: 0.5 }), ..Default::default() };
        let r = release(vector(), "fc.", &spec, &mut rand::rngs::StdRng::seed_from_u64(1));
        let sigma = r.record.privacy.unwrap().noise_stddev;
        assert_eq!(sigma, privacy::calibrate_sigma(4.0, 1e-6, 1.0), "sensitivity is twice the clip norm");
        let values = |name: &str| crate::st::bytes_to_f32(&r.parts.iter().find(|(m, _)| m.name == name).unwrap().1);
        assert_eq!(values("bn.running_var"), vec![0.0; 4], "statistics are not released");
        // Clipped as one vector, head included: every entry scaled by 0.5 / ||v||.
        let input = vector();
        let factor = 0.5 / privacy::l2_norm(&[&input[0].values, &input[2].values, &input[3].values]);
        let residuals: Vec<f64> = [(&input[0], values("conv.weight")), (&input[2], values("bn.weight")), (&input[3], values("fc.weight"))]
            .iter()
            .flat_map(|(t, released)| t.values.iter().zip(released).map(|(x, y)| *y as f64 - *x as f64 * factor).collect::<Vec<_>>())
            .collect();
        let n = residuals.len() as f64;
        let mean = residuals.iter().sum::<f64>() / n;
        let sd = (residuals.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(mean.abs() < 5.0 * sigma / n.sqrt(), "noise centred on the clipped vector: mean {mean}, sigma {sigma}");
        assert!((sd / sigma - 1.0).abs() < 0.05, "noise of the calibrated sigma: {sd} vs {sigma}");
        assert_eq!(recorded_release(&r.metadata).unwrap().privacy, r.record.privacy);
    }

    #[test]
    fn an_encoding_applies_to_weight_tensors_outside_the_head_only() {
        let spec = ReleaseSpec { encoding: VectorEncoding::TopK, density: Some(0.25), ..Default::default() };
        let r = release(vector(), "fc.", &spec, &mut rand::rngs::StdRng::seed_from_u64(1));
        let names: Vec<&str> = r.parts.iter().map(|(m, _)| m.name.as_str()).collect();
        assert_eq!(names, ["conv.weight#topk_index", "conv.weight#topk_value", "bn.running_var", "bn.weight", "fc.weight"]);
        assert_eq!(r.parts[0].0.shape, vec![2304], "a quarter of 9216 entries");
        assert_eq!(r.record, ReleaseRecord { encoding: VectorEncoding::TopK, density: Some(0.25), bytes: None, privacy: None });
        let encoded: BTreeMap<String, EncodedTensor> = serde_json::from_str(&r.metadata[ENCODED_KEY]).unwrap();
        assert_eq!(encoded.keys().collect::<Vec<_>>(), ["conv.weight"]);
    }
}
