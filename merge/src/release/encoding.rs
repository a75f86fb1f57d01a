//! Compact encodings of a vector's weight tensors, and the reader that decodes them one tensor at
//! a time for the streaming merge.
//!
//! In the safetensors file an encoded tensor `w` is stored as parts beside the plain ones:
//! `int8`: `w` as I8 (same shape) and `w#int8_scale` (F32, one per output channel);
//! `topK`: `w#topk_index` (U32, flat positions, ascending) and `w#topk_value` (F32). The file's
//! metadata key `encoded` maps each encoded tensor to its encoding and logical shape, so a reader
//! knows every tensor's shape before decoding any.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use medmerge_crds::VectorEncoding;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::st::{f32_to_bytes, MappedFile, StError, TensorMeta};

/// Metadata key listing the encoded tensors.
pub const ENCODED_KEY: &str = "encoded";
const SCALE: &str = "#int8_scale";
const INDEX: &str = "#topk_index";
const VALUE: &str = "#topk_value";

/// How one tensor of a file is encoded, as its metadata records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EncodedTensor {
    /// `int8` or `topK`.
    pub encoding: VectorEncoding,
    /// The decoded tensor's shape.
    pub shape: Vec<usize>,
}

/// One tensor's values in an encoding.
#[derive(Clone, Debug, PartialEq)]
pub enum Encoded {
    /// Exact values.
    Float32(Vec<f32>),
    /// `value ≈ q · scale[channel]`, `channel = index / (numel / scales.len())`.
    Int8 { q: Vec<i8>, scales: Vec<f32> },
    /// The kept entries (flat positions, ascending); every other entry is zero.
    TopK { indices: Vec<u32>, values: Vec<f32> },
}

/// Whether tensor `name` of shape `shape` is worth encoding: weight matrices and kernels outside
/// the head. Heads, biases and batch-norm tensors are a small part of the bytes and the part the
/// merge is most sensitive to.
pub fn encodable(name: &str, shape: &[usize], head_prefix: &str) -> bool {
    shape.len() >= 2 && !name.starts_with(head_prefix)
}

/// Encodes `values` (of `shape`) as `encoding`; `density` is the fraction `topK` keeps (at least
/// one entry).
pub fn encode(values: &[f32], shape: &[usize], encoding: VectorEncoding, density: f64) -> Encoded {
    match encoding {
        VectorEncoding::Float32 => Encoded::Float32(values.to_vec()),
        VectorEncoding::Int8 => {
            let channels = shape.first().copied().unwrap_or(1).max(1);
            let per = values.len() / channels;
            let mut q = Vec::with_capacity(values.len());
            let mut scales = Vec::with_capacity(channels);
            for chunk in values.chunks(per.max(1)) {
                let max = chunk.iter().fold(0f32, |m, x| m.max(x.abs()));
                let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
                scales.push(scale);
                q.extend(chunk.iter().map(|x| (x / scale).round().clamp(-127.0, 127.0) as i8));
            }
            Encoded::Int8 { q, scales }
        }
        VectorEncoding::TopK => {
            let k = ((values.len() as f64 * density).ceil() as usize).clamp(1, values.len().max(1));
            let mut order: Vec<u32> = (0..values.len() as u32).collect();
            if k < values.len() {
                order.select_nth_unstable_by(k - 1, |a, b| values[*b as usize].abs().total_cmp(&values[*a as usize].abs()));
                order.truncate(k);
            }
            order.sort_unstable();
            let kept = order.iter().map(|&i| values[i as usize]).collect();
            Encoded::TopK { indices: order, values: kept }
        }
    }
}

impl Encoded {
    /// The decoded values of a tensor with `numel` entries.
    pub fn decode(&self, numel: usize) -> Vec<f32> {
        match self {
            Encoded::Float32(v) => v.clone(),
            Encoded::Int8 { q, scales } => {
                let per = (numel / scales.len().max(1)).max(1);
                q.iter().enumerate().map(|(i, &x)| x as f32 * scales[i / per]).collect()
            }
            Encoded::TopK { indices, values } => {
                let mut out = vec![0f32; numel];
                for (&i, &v) in indices.iter().zip(values) {
                    out[i as usize] = v;
                }
                out
            }
        }
    }

    /// The encoding.
    pub fn encoding(&self) -> VectorEncoding {
        match self {
            Encoded::Float32(_) => VectorEncoding::Float32,
            Encoded::Int8 { .. } => VectorEncoding::Int8,
            Encoded::TopK { .. } => VectorEncoding::TopK,
        }
    }

    /// The stored parts of tensor `name` (of `shape`): their descriptions and bytes.
    pub fn parts(&self, name: &str, shape: &[usize]) -> Vec<(TensorMeta, Vec<u8>)> {
        let meta = |suffix: &str, dtype, shape: Vec<usize>| TensorMeta { name: format!("{name}{suffix}"), dtype, shape };
        match self {
            Encoded::Float32(v) => vec![(meta("", Dtype::F32, shape.to_vec()), f32_to_bytes(v))],
            Encoded::Int8 { q, scales } => vec![(meta("", Dtype::I8, shape.to_vec()), q.iter().map(|&x| x as u8).collect()), (meta(SCALE, Dtype::F32, vec![scales.len()]), f32_to_bytes(scales))],
            Encoded::TopK { indices, values } => {
                vec![(meta(INDEX, Dtype::U32, vec![indices.len()]), indices.iter().flat_map(|i| i.to_le_bytes()).collect()), (meta(VALUE, Dtype::F32, vec![values.len()]), f32_to_bytes(values))]
            }
        }
    }
}

/// A vector file read through its encodings: every tensor by its logical name and shape, as the
/// base has them, decoded on demand.
pub struct VectorReader {
    file: MappedFile,
    encoded: BTreeMap<String, EncodedTensor>,
}

impl VectorReader {
    /// Opens `path` and reads its list of encoded tensors.
    pub fn open(path: &Path) -> Result<Self, StError> {
        let file = MappedFile::open(path)?;
        let encoded = match file.metadata().get(ENCODED_KEY) {
            Some(json) => serde_json::from_str(json).map_err(|e| StError::Format { path: path.into(), message: format!("metadata {ENCODED_KEY}: {e}") })?,
            None => BTreeMap::new(),
        };
        Ok(VectorReader { file, encoded })
    }

    /// The underlying file (metadata, path).
    pub fn file(&self) -> &MappedFile {
        &self.file
    }

    /// Every logical tensor: name, dtype (F32 for encoded ones) and decoded shape, sorted by name.
    pub fn tensors(&self) -> Vec<TensorMeta> {
        let plain = self.file.tensors().filter(|t| !self.is_part(&t.name)).cloned();
        let encoded = self.encoded.iter().map(|(name, e)| TensorMeta { name: name.clone(), dtype: Dtype::F32, shape: e.shape.clone() });
        let mut all: Vec<TensorMeta> = plain.chain(encoded).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Whether stored tensor `name` is a part of an encoded tensor rather than a tensor.
    fn is_part(&self, name: &str) -> bool {
        self.encoded.contains_key(name) || [SCALE, INDEX, VALUE].iter().any(|s| name.strip_suffix(s).is_some_and(|base| self.encoded.contains_key(base)))
    }

    /// How tensor `name` is stored.
    pub fn encoding_of(&self, name: &str) -> VectorEncoding {
        self.encoded.get(name).map_or(VectorEncoding::Float32, |e| e.encoding)
    }

    /// Tensor `name`'s f32 values: borrowed from the mapping when stored plain, decoded when
    /// encoded. Parts whose sizes disagree with the recorded shape are refused by name.
    pub fn values(&self, name: &str) -> Result<Cow<'_, [f32]>, StError> {
        let Some(e) = self.encoded.get(name) else { return self.file.f32_view(name) };
        let numel: usize = e.shape.iter().product();
        let bad = |message: String| StError::Format { path: self.file.path().into(), message: format!("tensor {name:?}: {message}") };
        let encoded = match e.encoding {
            VectorEncoding::Float32 => Encoded::Float32(self.file.f32(name)?),
            VectorEncoding::Int8 => {
                let q: Vec<i8> = self.file.bytes(name)?.iter().map(|&b| b as i8).collect();
                let scales = self.file.f32(&format!("{name}{SCALE}"))?;
                if q.len() != numel || scales.is_empty() || !numel.is_multiple_of(scales.len()) {
                    return Err(bad(format!("{} int8 values and {} scales for {numel} entries", q.len(), scales.len())));
                }
                Encoded::Int8 { q, scales }
            }
            VectorEncoding::TopK => {
                let indices: Vec<u32> = self.file.bytes(&format!("{name}{INDEX}"))?.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("chunk of 4"))).collect();
                let values = self.file.f32(&format!("{name}{VALUE}"))?;
                if indices.len() != values.len() || indices.iter().any(|&i| i as usize >= numel) {
                    return Err(bad(format!("{} positions and {} values, positions must be below {numel}", indices.len(), values.len())));
                }
                Encoded::TopK { indices, values }
            }
        };
        Ok(Cow::Owned(encoded.decode(numel)))
    }

    /// Whether tensor `name` is stored encoded (decoded whole by [`VectorReader::values`])
    /// rather than as plain f32 values.
    pub fn is_encoded(&self, name: &str) -> bool {
        self.encoded.contains_key(name)
    }

    /// Drops the file's pages from the resident set (see [`MappedFile::release`]).
    pub fn release(&mut self) {
        self.file.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 1000.0).collect()
    }

    #[test]
    fn int8_decodes_within_half_a_step_of_each_channels_scale() {
        let values = ramp(4 * 30);
        let Encoded::Int8 { q, scales } = encode(&values, &[4, 3, 10], VectorEncoding::Int8, 0.0) else { panic!() };
        assert_eq!((q.len(), scales.len()), (120, 4));
        let decoded = Encoded::Int8 { q, scales: scales.clone() }.decode(120);
        for (i, (a, b)) in values.iter().zip(&decoded).enumerate() {
            assert!((a - b).abs() <= scales[i / 30] / 2.0 + 1e-9, "entry {i}: {a} vs {b}");
        }
    }

    #[test]
    fn top_k_keeps_exactly_the_largest_entries_and_zeroes_the_rest() {
        let values = vec![0.1, -0.9, 0.0, 0.5, -0.2, 0.05, 0.7, -0.3, 0.0, 0.01];
        let encoded = encode(&values, &[2, 5], VectorEncoding::TopK, 0.3);
        assert_eq!(encoded, Encoded::TopK { indices: vec![1, 3, 6], values: vec![-0.9, 0.5, 0.7] });
        assert_eq!(encoded.decode(10), vec![0.0, -0.9, 0.0, 0.5, 0.0, 0.0, 0.7, 0.0, 0.0, 0.0]);
        let Encoded::TopK { indices, .. } = encode(&values, &[2, 5], VectorEncoding::TopK, 1e-9) else { panic!() };
        assert_eq!(indices, vec![1], "at least one entry is kept");
    }

    #[test]
    fn an_all_zero_channel_encodes_without_dividing_by_zero() {
        let encoded = encode(&[0.0; 6], &[2, 3], VectorEncoding::Int8, 0.0);
        assert_eq!(encoded.decode(6), vec![0.0; 6]);
    }
}
