//! Data vectors (fine-tuned minus pretrained) and the streaming merge that combines them.
//!
//! A vector file holds, for every tensor of the model, the delta from the base for pretrained
//! tensors and the absolute values for the new classification head, plus metadata naming its
//! base's SHA-256 digest. The merge reads one tensor at a time from every vector (memory-mapped),
//! so its memory does not grow with the number of shards, and refuses anything inconsistent
//! before publishing a byte.

pub mod math;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use medmerge_crds::{HeadStrategy, MergeMethod};
use rand::rngs::StdRng;
use rand::SeedableRng;
use safetensors::tensor::Dtype;
use tch::{Device, Tensor};

use crate::checkpoint::{file_digest, ArtifactKind, ArtifactMeta, MetaError};
use crate::model::{head_prefix, ModelError, Network};
use crate::st::{f32_to_bytes, MappedFile, StError, StreamWriter, TensorMeta};

/// Why a merge (or a vector) was refused.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// A vector was computed from a different base.
    #[error("shard {shard}: vector {path} was computed from base {found}, but this run's base is {expected}")]
    BaseMismatch { shard: String, path: PathBuf, found: String, expected: String },
    /// A vector describes another architecture or class list.
    #[error("shard {shard}: vector has {what} {found}, the base has {expected}")]
    Incompatible { shard: String, what: &'static str, found: String, expected: String },
    /// A tensor is missing from a vector.
    #[error("shard {shard}: vector lacks tensor {tensor:?}")]
    MissingTensor { shard: String, tensor: String },
    /// A vector has a tensor the base does not.
    #[error("shard {shard}: vector has unexpected tensor {tensor:?}")]
    ExtraTensor { shard: String, tensor: String },
    /// A tensor's shape or dtype differs from the base.
    #[error("shard {shard}: tensor {tensor:?} is {found}, the base has {expected}")]
    TensorMismatch { shard: String, tensor: String, found: String, expected: String },
    /// A tensor holds NaN or infinite values.
    #[error("shard {shard}: tensor {tensor:?} contains NaN or infinite values")]
    NonFinite { shard: String, tensor: String },
    /// Nothing to merge.
    #[error("no vectors to merge")]
    NoVectors,
    /// Reading or writing a file failed.
    #[error(transparent)]
    St(#[from] StError),
    /// Metadata is missing or of the wrong kind.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// Building a network from the merged tensors failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A libtorch operation failed.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// How to merge.
#[derive(Clone, Debug)]
pub struct MergeOptions {
    /// Combination of the pretrained-layer vectors.
    pub method: MergeMethod,
    /// Scale for dataVector, ties, dare and randomVector.
    pub lambda: f64,
    /// How heads are combined.
    pub heads: HeadStrategy,
    /// TIES density.
    pub ties_density: f64,
    /// DARE drop rate.
    pub dare_drop_rate: f64,
    /// Seed for randomVector and DARE.
    pub seed: u64,
    /// Keep the pretrained layers as they are (only heads averaged): the "restoration alone" control.
    pub pretrained_only: bool,
}

/// A vector to merge, with the shard it came from (for error messages).
#[derive(Clone, Debug)]
pub struct ShardVector {
    /// Shard name.
    pub shard: String,
    /// Vector file.
    pub path: PathBuf,
}

/// Writes shard `shard`'s data vector: `net - base` for pretrained tensors, `net`'s head as is.
pub fn write_vector(net: &Network, base_path: &Path, shard: &str, class_counts: Vec<u64>, out: &Path) -> Result<(), MergeError> {
    let base = MappedFile::open(base_path)?;
    let base_meta = ArtifactMeta::from_map(base_path, base.metadata(), ArtifactKind::Model)?;
    let head = net.head_prefix();
    let mut tensors = Vec::new();
    for (name, t) in net.named_tensors() {
        let v = if name.starts_with(head) {
            t
        } else {
            let pre = Tensor::from_slice(&base.f32(&name)?).view(t.size().as_slice()).to_device(t.device());
            t.f_sub(&pre)?
        };
        tensors.push((name, v));
    }
    let meta = ArtifactMeta {
        kind: ArtifactKind::Vector,
        base_digest: file_digest(base_path)?,
        shard: Some(shard.into()),
        class_counts,
        ..base_meta
    };
    crate::model::write_tensors(out, &tensors, &meta.to_map())?;
    Ok(())
}

/// A shard's own fine-tuned model: base plus its vector, with its head.
pub fn shard_model(base_path: &Path, vector: &ShardVector, device: Device) -> Result<Network, MergeError> {
    let net = Network::load(base_path, device)?;
    let base = MappedFile::open(base_path)?;
    let base_meta = ArtifactMeta::from_map(base_path, base.metadata(), ArtifactKind::Model)?;
    let v = open_vector(vector, &base, &file_digest(base_path)?, &base_meta)?;
    let head = net.head_prefix();
    for (name, mut var) in net.named_tensors() {
        let delta = Tensor::from_slice(&v.1.f32(&name)?).view(var.size().as_slice()).to_device(var.device());
        tch::no_grad(|| if name.starts_with(head) { var.f_copy_(&delta) } else { var.f_add_(&delta).map(|_| ()) })?;
    }
    Ok(net)
}

fn open_vector(v: &ShardVector, base: &MappedFile, digest: &str, base_meta: &ArtifactMeta) -> Result<(ArtifactMeta, MappedFile), MergeError> {
    let file = MappedFile::open(&v.path)?;
    let meta = ArtifactMeta::from_map(&v.path, file.metadata(), ArtifactKind::Vector)?;
    let shard = v.shard.clone();
    if meta.base_digest != digest {
        return Err(MergeError::BaseMismatch { shard, path: v.path.clone(), found: meta.base_digest, expected: digest.into() });
    }
    if meta.arch != base_meta.arch {
        return Err(MergeError::Incompatible { shard, what: "architecture", found: meta.arch.as_str().into(), expected: base_meta.arch.as_str().into() });
    }
    if meta.classes != base_meta.classes {
        return Err(MergeError::Incompatible { shard, what: "classes", found: format!("{:?}", meta.classes), expected: format!("{:?}", base_meta.classes) });
    }
    let base_names: BTreeSet<&str> = base.tensors().map(|t| t.name.as_str()).collect();
    let names: BTreeSet<&str> = file.tensors().map(|t| t.name.as_str()).collect();
    if let Some(t) = base_names.difference(&names).next() {
        return Err(MergeError::MissingTensor { shard, tensor: (*t).into() });
    }
    if let Some(t) = names.difference(&base_names).next() {
        return Err(MergeError::ExtraTensor { shard, tensor: (*t).into() });
    }
    for t in base.tensors() {
        let mine = file.meta(&t.name).expect("name sets are equal");
        if mine.shape != t.shape || mine.dtype != t.dtype {
            return Err(MergeError::TensorMismatch {
                shard,
                tensor: t.name.clone(),
                found: format!("{:?} {:?}", mine.dtype, mine.shape),
                expected: format!("{:?} {:?}", t.dtype, t.shape),
            });
        }
    }
    Ok((meta, file))
}

/// Merges `vectors` onto the base at `base_path` and writes a complete model to `out`.
pub fn merge_files(base_path: &Path, vectors: &[ShardVector], opts: &MergeOptions, out: &Path) -> Result<(), MergeError> {
    if vectors.is_empty() {
        return Err(MergeError::NoVectors);
    }
    let mut base = MappedFile::open(base_path)?;
    let base_meta = ArtifactMeta::from_map(base_path, base.metadata(), ArtifactKind::Model)?;
    let digest = file_digest(base_path)?;
    let mut opened = vectors.iter().map(|v| open_vector(v, &base, &digest, &base_meta)).collect::<Result<Vec<_>, _>>()?;
    let head_weights: Vec<f64> = match opts.heads {
        HeadStrategy::Mean => vec![1.0; opened.len()],
        HeadStrategy::SampleWeighted => opened.iter().map(|(m, _)| m.samples().max(1) as f64).collect(),
    };
    let head = head_prefix(base_meta.arch);
    let metas: Vec<TensorMeta> = base.tensors().cloned().collect();
    let out_meta = ArtifactMeta { kind: ArtifactKind::Model, base_digest: digest, shard: None, class_counts: vec![], ..base_meta };
    let mut writer = StreamWriter::create(out, metas.clone(), &out_meta.to_map())?;
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let lambda = opts.lambda as f32;
    for t in &metas {
        if t.dtype != Dtype::F32 {
            // Integer buffers (e.g. num_batches_tracked) are counters, not weights: keep the base's.
            writer.write(&t.name, base.bytes(&t.name)?)?;
            continue;
        }
        let pre = base.f32(&t.name)?;
        let is_head = t.name.starts_with(head);
        let linear = is_head || opts.pretrained_only || matches!(opts.method, MergeMethod::DataVector | MergeMethod::ParamsMean);
        let merged = if linear {
            // Linear methods add one vector at a time and release it at once, so memory stays
            // one tensor's worth whatever the number of hospitals.
            let total: f64 = head_weights.iter().sum();
            let mut out = if is_head { vec![0f32; pre.len()] } else { pre };
            for (i, (v, (_, file))) in vectors.iter().zip(opened.iter_mut()).enumerate() {
                let scale = if is_head {
                    (head_weights[i] / total) as f32
                } else if opts.pretrained_only {
                    0.0
                } else if opts.method == MergeMethod::ParamsMean {
                    1.0 / vectors.len() as f32
                } else {
                    lambda
                };
                {
                    let tau = finite_view(file, &t.name, &v.shard)?;
                    math::add_scaled(&mut out, &tau, scale);
                }
                file.release(&t.name);
            }
            out
        } else {
            // TIES, DARE and the random control look at every vector's entry at once.
            let mut taus = Vec::with_capacity(opened.len());
            for (v, (_, file)) in vectors.iter().zip(&opened) {
                taus.push(finite_view(file, &t.name, &v.shard)?);
            }
            let views: Vec<&[f32]> = taus.iter().map(|t| t.as_ref()).collect();
            match opts.method {
                MergeMethod::RandomVector => math::random_vector(&pre, &views, lambda, &mut rng),
                MergeMethod::Ties => math::ties(&pre, &views, lambda, opts.ties_density),
                MergeMethod::Dare => math::dare(&pre, &views, lambda, opts.dare_drop_rate, &mut rng),
                MergeMethod::DataVector | MergeMethod::ParamsMean => unreachable!("linear methods stream"),
            }
        };
        writer.write(&t.name, &f32_to_bytes(&merged))?;
        // Done with this tensor everywhere: memory stays one tensor's worth whatever N is.
        base.release(&t.name);
        for (_, file) in opened.iter_mut() {
            file.release(&t.name);
        }
    }
    writer.finish()?;
    Ok(())
}

/// Shard `shard`'s tensor `name`, refused when it holds NaN or Inf.
fn finite_view<'a>(file: &'a MappedFile, name: &str, shard: &str) -> Result<std::borrow::Cow<'a, [f32]>, MergeError> {
    let tau = file.f32_view(name)?;
    if tau.iter().any(|x| !x.is_finite()) {
        return Err(MergeError::NonFinite { shard: shard.into(), tensor: name.into() });
    }
    Ok(tau)
}
