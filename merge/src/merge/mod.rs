//! Data vectors (fine-tuned minus pretrained) and the streaming merge that combines them.
//!
//! A vector file holds, for every tensor of the model, the delta from the base for pretrained
//! tensors and the absolute values for the new classification head, plus metadata naming its
//! base's SHA-256 digest. The merge reads one tensor at a time from every vector (memory-mapped),
//! so its memory does not grow with the number of shards, and refuses anything inconsistent
//! before publishing a byte.

pub mod math;

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use medmerge_crds::results::ReleaseRecord;
use medmerge_crds::{HeadStrategy, MergeMethod, ReleaseSpec};
use rand::rngs::StdRng;
use rand::SeedableRng;
use safetensors::tensor::Dtype;

use crate::checkpoint::{file_digest, head_prefix, ArtifactKind, ArtifactMeta, MetaError};
use crate::release::encoding::VectorReader;
use crate::release::{release, VectorTensor};
use crate::st::{f32_as_le_bytes, MappedFile, StError, StreamWriter, TensorMeta};

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
    /// The base itself holds NaN or infinite values.
    #[error("base {path}: tensor {tensor:?} contains NaN or infinite values")]
    NonFiniteBase { path: PathBuf, tensor: String },
    /// Finite inputs summed to NaN or infinity: the merged values do not fit in f32.
    #[error("merged tensor {tensor:?} overflows f32 (NaN or infinite values from finite inputs); lower lambda")]
    Overflow { tensor: String },
    /// Nothing to merge.
    #[error("vectors of shards {first} and {second} are the same vector ({why}): it would count twice")]
    Duplicate { first: String, second: String, why: String },
    #[error("no vectors to merge")]
    NoVectors,
    /// A merged batch-norm running variance is negative: the model would give NaN.
    #[error("merged {tensor}: running variance {value} at index {index} is negative; refusing to publish a model that gives NaN")]
    InvalidVariance { tensor: String, index: usize, value: f32 },
    /// The merged model is unusable and the vectors carry privacy noise large enough to explain it.
    #[error("{source}: the vectors of {shards} carry differential-privacy noise (σ up to {sigma:.3} per entry) that the merged model cannot absorb; raise epsilon or release without privacy (README: Differential privacy)")]
    TooNoisy { source: Box<MergeError>, shards: String, sigma: f64 },
    /// A vector masked for secure aggregation was given to the plain merge.
    #[error("shard {shard}: {path} is masked for secure aggregation; merge the masked vectors together with `merge --masked`")]
    Masked { shard: String, path: PathBuf },
    /// Secure aggregation refused its inputs.
    #[error(transparent)]
    Secure(#[from] crate::secure::SecureError),
    /// Reading or writing a file failed.
    #[error(transparent)]
    St(#[from] StError),
    /// Metadata is missing or of the wrong kind.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// Loading or checking the merged model in a deep-learning framework failed (the
    /// trainer's check of a model before it is published).
    #[error(transparent)]
    Model(Box<dyn std::error::Error + Send + Sync>),
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

/// Releases an existing vector again as `spec` asks (e.g. a hospital that trained with the
/// CLI and now adds noise or compresses before uploading): decoded, checked against the base,
/// released and written to `out`. Its shard and sample counts are kept.
pub fn release_vector(base_path: &Path, vector: &ShardVector, spec: &ReleaseSpec, out: &Path) -> Result<ReleaseRecord, MergeError> {
    let (meta, tensors) = read_vector_tensors(base_path, vector)?;
    write_released(tensors, &meta, spec, out)
}

/// Every tensor of `vector`, decoded, after checking it against the base (digest included) and
/// refusing non-finite values.
pub fn read_vector_tensors(base_path: &Path, vector: &ShardVector) -> Result<(ArtifactMeta, Vec<VectorTensor>), MergeError> {
    let base = MappedFile::open(base_path)?;
    let base_meta = ArtifactMeta::from_map(base_path, base.metadata(), ArtifactKind::Model)?;
    let (meta, file) = open_checked_vector(vector, &base, &file_digest(base_path)?, &base_meta)?;
    let mut tensors = Vec::new();
    for t in file.tensors() {
        tensors.push(VectorTensor { values: finite_view(&file, &t.name, &vector.shard)?.into_owned(), name: t.name, shape: t.shape });
    }
    Ok((meta, tensors))
}

/// Releases `tensors` and writes them with `meta` (and the release's metadata) to `out`.
pub fn write_released(tensors: Vec<VectorTensor>, meta: &ArtifactMeta, spec: &ReleaseSpec, out: &Path) -> Result<ReleaseRecord, MergeError> {
    let released = release(tensors, head_prefix(meta.arch), spec, &mut StdRng::from_os_rng());
    let mut metadata = meta.to_map();
    metadata.extend(released.metadata);
    let mut writer = StreamWriter::create(out, released.parts.iter().map(|(m, _)| m.clone()).collect(), &metadata)?;
    for (m, bytes) in &released.parts {
        writer.write(&m.name, bytes)?;
    }
    writer.finish()?;
    let bytes = std::fs::metadata(out).map_err(|source| StError::Open { path: out.into(), source })?.len();
    Ok(ReleaseRecord { bytes: Some(bytes), ..released.record })
}

/// Opens shard `v`'s vector and checks it against the base: kind, architecture, classes, and
/// every tensor's name, shape and dtype (decoded ones as they decode). The base digest is
/// checked by the caller.
fn open_vector(v: &ShardVector, base: &MappedFile, base_meta: &ArtifactMeta) -> Result<(ArtifactMeta, VectorReader), MergeError> {
    let file = VectorReader::open(&v.path)?;
    let meta = ArtifactMeta::from_map(&v.path, file.file().metadata(), ArtifactKind::Vector)?;
    let shard = v.shard.clone();
    if file.file().metadata().contains_key(crate::secure::MASKED_KEY) {
        return Err(MergeError::Masked { shard, path: v.path.clone() });
    }
    check_like_base(&shard, &meta, base_meta, base, &file.tensors(), |t| t.dtype)?;
    Ok((meta, file))
}

/// Checks a shard's file against the base it claims: the same architecture and classes, and
/// exactly the base's tensors with the base's shapes, each stored as `stored_as(base tensor)`
/// (a plain vector keeps the base's dtype; a masked one holds fixed-point words).
pub fn check_like_base(shard: &str, meta: &ArtifactMeta, base_meta: &ArtifactMeta, base: &MappedFile, tensors: &[TensorMeta], stored_as: impl Fn(&TensorMeta) -> Dtype) -> Result<(), MergeError> {
    let shard = shard.to_string();
    if meta.arch != base_meta.arch {
        return Err(MergeError::Incompatible { shard, what: "architecture", found: meta.arch.as_str().into(), expected: base_meta.arch.as_str().into() });
    }
    if meta.classes != base_meta.classes {
        return Err(MergeError::Incompatible { shard, what: "classes", found: format!("{:?}", meta.classes), expected: format!("{:?}", base_meta.classes) });
    }
    let base_names: BTreeSet<&str> = base.tensors().map(|t| t.name.as_str()).collect();
    let names: BTreeSet<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    if let Some(t) = base_names.difference(&names).next() {
        return Err(MergeError::MissingTensor { shard, tensor: (*t).into() });
    }
    if let Some(t) = names.difference(&base_names).next() {
        return Err(MergeError::ExtraTensor { shard, tensor: (*t).into() });
    }
    for t in base.tensors() {
        let mine = tensors.iter().find(|m| m.name == t.name).expect("name sets are equal");
        let dtype = stored_as(t);
        if mine.shape != t.shape || mine.dtype != dtype {
            return Err(MergeError::TensorMismatch { shard, tensor: t.name.clone(), found: format!("{:?} {:?}", mine.dtype, mine.shape), expected: format!("{dtype:?} {:?}", t.shape) });
        }
    }
    Ok(())
}

/// Opens and checks one vector, base digest included (for single-vector readers).
pub fn open_checked_vector(v: &ShardVector, base: &MappedFile, digest: &str, base_meta: &ArtifactMeta) -> Result<(ArtifactMeta, VectorReader), MergeError> {
    let opened = open_vector(v, base, base_meta)?;
    check_base_digest(v, &opened.0.base_digest, digest)?;
    Ok(opened)
}

/// The same file given twice, or two files written by the same shard's training (a copied
/// vector), would add one hospital's vector twice.
fn refuse_duplicates(vectors: &[ShardVector], opened: &[(ArtifactMeta, VectorReader)]) -> Result<(), MergeError> {
    let real: Vec<Option<PathBuf>> = vectors.iter().map(|v| v.path.canonicalize().ok()).collect();
    for i in 0..vectors.len() {
        for j in i + 1..vectors.len() {
            let same_file = real[i].is_some() && real[i] == real[j];
            let written_by = |k: usize| opened[k].0.shard.clone().filter(|s| !s.is_empty());
            let why = if vectors[i].shard == vectors[j].shard {
                Some(format!("both are named {}", vectors[i].shard))
            } else if same_file {
                Some(format!("both are {}", vectors[i].path.display()))
            } else if written_by(i).is_some() && written_by(i) == written_by(j) && file_digest(&vectors[i].path)? == file_digest(&vectors[j].path)? {
                // Hospitals may pick the same --shard name; only identical bytes are a copy.
                Some(format!("identical copies of shard {}'s vector", written_by(i).unwrap_or_default()))
            } else {
                None
            };
            if let Some(why) = why {
                return Err(MergeError::Duplicate { first: vectors[i].shard.clone(), second: vectors[j].shard.clone(), why });
            }
        }
    }
    Ok(())
}

/// Checks a vector that arrived from elsewhere (a hospital's upload) before it joins a run:
/// a medmerge data vector computed from exactly this base (by SHA-256), with the base's
/// architecture, classes and tensors, and finite values.
pub fn check_vector(base_path: &Path, v: &ShardVector) -> Result<(), MergeError> {
    let base = MappedFile::open(base_path)?;
    let base_meta = ArtifactMeta::from_map(base_path, base.metadata(), ArtifactKind::Model)?;
    let (meta, file) = open_vector(v, &base, &base_meta)?;
    check_base_digest(v, &meta.base_digest, &file_digest(base_path)?)?;
    for t in file.tensors().iter().filter(|t| t.dtype == safetensors::Dtype::F32) {
        if file.values(&t.name)?.iter().any(|x| !x.is_finite()) {
            return Err(MergeError::NonFinite { shard: v.shard.clone(), tensor: t.name.clone() });
        }
    }
    Ok(())
}

fn check_base_digest(v: &ShardVector, claim: &str, digest: &str) -> Result<(), MergeError> {
    if claim != digest {
        return Err(MergeError::BaseMismatch { shard: v.shard.clone(), path: v.path.clone(), found: claim.into(), expected: digest.into() });
    }
    Ok(())
}

/// `error` (an unusable merged model), naming the privacy noise of the vectors that carry some.
pub fn blame_noise(error: MergeError, vectors: &[ShardVector]) -> MergeError {
    let noisy: Vec<(String, f64)> = vectors
        .iter()
        .filter_map(|v| {
            let file = MappedFile::open(&v.path).ok()?;
            let sigma = crate::release::recorded_release(file.metadata())?.privacy?.noise_stddev;
            Some((v.shard.clone(), sigma))
        })
        .collect();
    if noisy.is_empty() {
        return error;
    }
    let sigma = noisy.iter().map(|(_, s)| *s).fold(0.0, f64::max);
    MergeError::TooNoisy { source: Box::new(error), shards: noisy.into_iter().map(|(s, _)| s).collect::<Vec<_>>().join(", "), sigma }
}

/// Merges `vectors` onto the base at `base_path` and writes a complete model to `out`.
///
/// Hashing the base costs as much as merging a few vectors, so it runs on its own thread while
/// the merge streams; the vectors' claim of which base they came from is checked against it
/// before the result is published.
pub fn merge_files(base_path: &Path, vectors: &[ShardVector], opts: &MergeOptions, out: &Path) -> Result<(), MergeError> {
    if vectors.is_empty() {
        return Err(MergeError::NoVectors);
    }
    let base = MappedFile::open(base_path)?;
    let base_meta = ArtifactMeta::from_map(base_path, base.metadata(), ArtifactKind::Model)?;
    std::thread::scope(|scope| {
        let hashing = scope.spawn(|| file_digest(base_path));
        let opened = vectors.iter().map(|v| open_vector(v, &base, &base_meta)).collect::<Result<Vec<_>, _>>()?;
        refuse_duplicates(vectors, &opened)?;
        let claims: Vec<String> = opened.iter().map(|(m, _)| m.base_digest.clone()).collect();
        // Vectors that disagree on their base cannot all match it: skip the merge, name the culprits.
        let writer = if claims.iter().all(|c| *c == claims[0]) { Some(stream_merge(base, &base_meta, &claims[0], vectors, opened, opts, out)?) } else { None };
        let digest = hashing.join().expect("hashing the base does not panic")?;
        for (v, claim) in vectors.iter().zip(&claims) {
            check_base_digest(v, claim, &digest)?;
        }
        writer.expect("vectors that all match the base agree on it").finish()?;
        Ok(())
    })
}

/// Writes every merged tensor to an unpublished file at `out`; the caller publishes it.
fn stream_merge(
    mut base: MappedFile,
    base_meta: &ArtifactMeta,
    digest: &str,
    vectors: &[ShardVector],
    opened: Vec<(ArtifactMeta, VectorReader)>,
    opts: &MergeOptions,
    out: &Path,
) -> Result<StreamWriter, MergeError> {
    let head_weights: Vec<f64> = match opts.heads {
        HeadStrategy::Mean => vec![1.0; opened.len()],
        HeadStrategy::SampleWeighted => opened.iter().map(|(m, _)| m.samples().max(1) as f64).collect(),
    };
    let (recycle, recycled) = std::sync::mpsc::channel::<Vec<f32>>();
    let mut merger = TensorMerger::new(head_prefix(base_meta.arch), &head_weights, opts, Buffers::new(recycled));
    let mut files: Vec<VectorReader> = opened.into_iter().map(|(_, file)| file).collect();
    let metas: Vec<TensorMeta> = base.tensors().cloned().collect();
    let out_meta = ArtifactMeta { kind: ArtifactKind::Model, base_digest: digest.into(), shard: None, class_counts: vec![], ..base_meta.clone() };
    let writer = StreamWriter::create(out, metas.clone(), &out_meta.to_map())?;
    // Copying a tensor into the page cache costs as much as merging it: a writer thread does it
    // while the next tensor merges (at most two merged tensors wait, so memory stays flat).
    std::thread::scope(|scope| {
        let (send, receive) = std::sync::mpsc::sync_channel::<(String, Merged)>(2);
        let writing = scope.spawn(move || -> Result<StreamWriter, StError> {
            let mut writer = writer;
            for (name, tensor) in receive {
                writer.write(&name, &tensor.bytes())?;
                if let Merged::Values(values) = tensor {
                    let _ = recycle.send(values); // the merge may have ended: nothing to reuse then
                }
            }
            Ok(writer)
        });
        let merging = (|| -> Result<(), MergeError> {
            for t in &metas {
                let tensor = if t.dtype != Dtype::F32 {
                    // Integer buffers (e.g. num_batches_tracked) are counters, not weights: keep the base's.
                    Merged::Bytes(base.bytes(&t.name)?.to_vec())
                } else {
                    Merged::Values(merger.merge(&t.name, &base, vectors, &mut files)?)
                };
                if send.send((t.name.clone(), tensor)).is_err() {
                    break; // the writer failed: its error is reported below
                }
                // Done with this tensor everywhere: memory stays one tensor's worth whatever N is.
                base.release();
                for file in files.iter_mut() {
                    file.release();
                }
            }
            Ok(())
        })();
        drop(send);
        let written = writing.join().expect("the writer thread does not panic");
        merging?;
        Ok(written?)
    })
}

/// Merges one F32 tensor at a time. Heads, and every tensor of the linear methods, are
/// `init + Σ scale_i · τ_i` with scales fixed for the whole run; TIES, DARE and the random
/// control look at every vector's entry at once.
struct TensorMerger<'a> {
    head_prefix: &'static str,
    /// Each vector's weight in the averaged head.
    head_scales: Vec<f32>,
    /// Each vector's scale for the other tensors, when the method is linear.
    body_scales: Option<Vec<f32>>,
    opts: &'a MergeOptions,
    rng: StdRng,
    buffers: Buffers,
}

impl<'a> TensorMerger<'a> {
    fn new(head_prefix: &'static str, head_weights: &[f64], opts: &'a MergeOptions, buffers: Buffers) -> Self {
        let n = head_weights.len();
        let total: f64 = head_weights.iter().sum();
        let body_scale = if opts.pretrained_only {
            Some(0.0)
        } else {
            match opts.method {
                MergeMethod::DataVector => Some(opts.lambda as f32),
                MergeMethod::ParamsMean => Some(1.0 / n as f32),
                MergeMethod::RandomVector | MergeMethod::Ties | MergeMethod::Dare => None,
            }
        };
        TensorMerger {
            head_prefix,
            head_scales: head_weights.iter().map(|w| (w / total) as f32).collect(),
            body_scales: body_scale.map(|s| vec![s; n]),
            opts,
            rng: StdRng::seed_from_u64(opts.seed),
            buffers,
        }
    }

    fn merge(&mut self, name: &str, base: &MappedFile, vectors: &[ShardVector], files: &mut [VectorReader]) -> Result<Vec<f32>, MergeError> {
        if name.starts_with(self.head_prefix) {
            // New heads start from nothing: the base's head is another class list's.
            let len = base.meta(name).map_or(0, TensorMeta::numel);
            let out = self.buffers.zeroed(len);
            return linear_combination(out, name, vectors, files, &self.head_scales, None, &mut self.buffers.reads);
        }
        let mut pre = self.buffers.zeroed(base.meta(name).map_or(0, TensorMeta::numel));
        base.read_f32_into(name, 0, &mut pre)?;
        if is_bn_statistic(name) {
            // Running statistics estimate the data's moments; they are not weights. Adding
            // λ·Στ to them can drive a variance negative (NaN logits in eval mode); the shards'
            // mean is always a valid estimate (restoration recomputes them in any case).
            let n = vectors.len().max(1) as f32;
            let scale = if self.opts.pretrained_only { 0.0 } else { 1.0 / n };
            let merged = linear_combination(pre, name, vectors, files, &vec![scale; vectors.len()], Some(base), &mut self.buffers.reads)?;
            return check_variance(name, merged);
        }
        if let Some(scales) = &self.body_scales {
            return linear_combination(pre, name, vectors, files, scales, Some(base), &mut self.buffers.reads);
        }
        let mut taus = Vec::with_capacity(files.len());
        for (v, file) in vectors.iter().zip(files.iter()) {
            taus.push(finite_view(file, name, &v.shard)?);
        }
        let views: Vec<&[f32]> = taus.iter().map(|t| t.as_ref()).collect();
        let (opts, lambda) = (self.opts, self.opts.lambda as f32);
        let merged = match opts.method {
            MergeMethod::RandomVector => math::random_vector(&pre, &views, lambda, &mut self.rng),
            MergeMethod::Ties => math::ties(&pre, &views, lambda, opts.ties_density),
            MergeMethod::Dare => math::dare(&pre, &views, lambda, opts.dare_drop_rate, &mut self.rng),
            MergeMethod::DataVector | MergeMethod::ParamsMean => unreachable!("linear methods have body scales"),
        };
        // Finite inputs can still overflow (a huge λ): no merged model may hold NaN or Inf.
        if !math::all_finite(&pre) {
            return Err(MergeError::NonFiniteBase { path: base.path().into(), tensor: name.into() });
        }
        if !math::all_finite(&merged) {
            return Err(MergeError::Overflow { tensor: name.into() });
        }
        Ok(merged)
    }
}

/// Buffers kept for the whole merge: tensor-sized ones handed back by the writer once written,
/// and the pieces vectors are read into. A fresh buffer costs a page fault per 4 KiB page on
/// first touch (nine in ten of a merge's faults before they were kept).
struct Buffers {
    returned: std::sync::mpsc::Receiver<Vec<f32>>,
    spare: Vec<Vec<f32>>,
    /// What [`add_plain`] reads into, one per thread.
    reads: [Vec<f32>; 2],
}

impl Buffers {
    /// At most this many spare buffers are kept: as many as can be between merger and writer.
    const KEEP: usize = 4;

    fn new(returned: std::sync::mpsc::Receiver<Vec<f32>>) -> Self {
        Buffers { returned, spare: Vec::new(), reads: Default::default() }
    }

    /// `len` zeros, in the largest spare buffer when there is one.
    fn zeroed(&mut self, len: usize) -> Vec<f32> {
        self.spare.extend(self.returned.try_iter());
        self.spare.sort_by_key(Vec::capacity);
        self.spare.drain(..self.spare.len().saturating_sub(Self::KEEP));
        let mut buffer = self.spare.pop().unwrap_or_default();
        buffer.clear();
        buffer.resize(len, 0.0);
        buffer
    }
}

/// Whether `name` is a batch-norm running statistic (torchvision and efficientnet_pytorch names).
pub fn is_bn_statistic(name: &str) -> bool {
    name.ends_with(".running_mean") || name.ends_with(".running_var")
}

/// Refuses a negative running variance (a model with it gives NaN in eval mode). Zero is valid:
/// batch norm adds its epsilon, and pretrained models have dead channels with variance 0.
pub fn check_variance(name: &str, values: Vec<f32>) -> Result<Vec<f32>, MergeError> {
    if name.ends_with(".running_var") {
        if let Some((index, value)) = values.iter().enumerate().find(|(_, v)| v.is_nan() || **v < 0.0) {
            return Err(MergeError::InvalidVariance { tensor: name.into(), index, value: *value });
        }
    }
    Ok(values)
}

/// What the writer thread writes next: merged values, or bytes kept from the base.
enum Merged {
    Values(Vec<f32>),
    Bytes(Vec<u8>),
}

impl Merged {
    fn bytes(&self) -> Cow<'_, [u8]> {
        match self {
            Merged::Values(values) => f32_as_le_bytes(values),
            Merged::Bytes(bytes) => Cow::Borrowed(bytes),
        }
    }
}

/// `init + Σ scales[i] · vector_i[name]`, `init` being `base`'s tensor (or zeros for a new
/// head), one vector at a time, each read in cache-sized pieces, so memory stays one tensor's
/// worth whatever the number of hospitals.
///
/// NaN and infinities survive any sum (even times zero), so one check of the result replaces a
/// check of every input; only when it fails are the inputs searched for the one at fault.
fn linear_combination(
    mut out: Vec<f32>,
    name: &str,
    vectors: &[ShardVector],
    files: &[VectorReader],
    scales: &[f32],
    base: Option<&MappedFile>,
    reads: &mut [Vec<f32>; 2],
) -> Result<Vec<f32>, MergeError> {
    // Encoded vectors decode whole, once; plain ones are read in pieces, a large tensor's two
    // halves on two threads (reading and adding 64 vectors is the merge's longest work).
    let mut plain = Vec::new();
    for (file, scale) in files.iter().zip(scales) {
        if file.is_encoded(name) {
            math::add_scaled(&mut out, &file.values(name)?, *scale);
        } else {
            plain.push((file.file(), *scale));
        }
    }
    let [low_reads, high_reads] = reads;
    if out.len() < SPLIT_FROM {
        add_plain(&plain, name, 0, &mut out, low_reads)?;
    } else {
        let middle = out.len() / 2;
        let (low, high) = out.split_at_mut(middle);
        let first_high = low.len();
        std::thread::scope(|scope| {
            let other = scope.spawn(|| add_plain(&plain, name, first_high, high, high_reads));
            add_plain(&plain, name, 0, low, low_reads).and(other.join().expect("adding vectors does not panic"))
        })?;
    }
    if !math::all_finite(&out) {
        for (v, file) in vectors.iter().zip(files.iter()) {
            finite_view(file, name, &v.shard)?;
        }
        if let Some(base) = base.filter(|b| b.f32_view(name).is_ok_and(|t| !math::all_finite(&t))) {
            return Err(MergeError::NonFiniteBase { path: base.path().into(), tensor: name.into() });
        }
        return Err(MergeError::Overflow { tensor: name.into() });
    }
    Ok(out)
}

/// `out += Σ scale · file[name][first..first + out.len()]` over plain-stored vectors, a
/// cache-sized piece of `out` at a time: each piece stays in the cache while every vector's
/// matching piece is read (by positioned reads, not the mapping) and added to it, in the
/// vectors' order, so the sums are the same as one pass per vector.
fn add_plain(plain: &[(&MappedFile, f32)], name: &str, first: usize, out: &mut [f32], buffer: &mut Vec<f32>) -> Result<(), StError> {
    buffer.resize(READ_PIECE, 0.0);
    for (k, piece) in out.chunks_mut(READ_PIECE).enumerate() {
        let values = &mut buffer[..piece.len()];
        for (file, scale) in plain {
            file.read_f32_into(name, first + k * READ_PIECE, values)?;
            math::add_scaled(piece, values, *scale);
        }
    }
    Ok(())
}

/// Values per read of [`add_plain`]: 256 KiB, so a piece of the sum and of one vector fit in a
/// core's L2 cache (1 MiB here) together, in few enough reads that their calls cost little.
const READ_PIECE: usize = 64 * 1024;

/// Tensors of at least this many values are summed by two threads, half each.
const SPLIT_FROM: usize = 1 << 18;

/// Shard `shard`'s tensor `name`, refused when it holds NaN or Inf.
fn finite_view<'a>(file: &'a VectorReader, name: &str, shard: &str) -> Result<std::borrow::Cow<'a, [f32]>, MergeError> {
    let tau = file.values(name)?;
    if tau.iter().any(|x| !x.is_finite()) {
        return Err(MergeError::NonFinite { shard: shard.into(), tensor: name.into() });
    }
    Ok(tau)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_tensor_is_summed_in_two_halves_exactly_as_one_pass_would_sum_it() {
        let dir = tempfile::tempdir().unwrap();
        let n = SPLIT_FROM + 12_345; // odd: the halves differ in length
        let vectors: Vec<ShardVector> = (0..3).map(|k| ShardVector { shard: format!("h{k}"), path: dir.path().join(format!("v{k}.safetensors")) }).collect();
        for (k, v) in vectors.iter().enumerate() {
            let values: Vec<f32> = (0..n).map(|i| ((i * (k + 3)) % 1000) as f32 / 1000.0).collect();
            let mut w = StreamWriter::create(&v.path, vec![TensorMeta { name: "w".into(), dtype: Dtype::F32, shape: vec![n] }], &Default::default()).unwrap();
            w.write("w", &f32_as_le_bytes(&values)).unwrap();
            w.finish().unwrap();
        }
        let files: Vec<VectorReader> = vectors.iter().map(|v| VectorReader::open(&v.path).unwrap()).collect();
        let (scales, init): ([f32; 3], Vec<f32>) = ([0.5, -1.0, 2.0], (0..n).map(|i| i as f32 * 1e-6).collect());
        let merged = linear_combination(init.clone(), "w", &vectors, &files, &scales, None, &mut Default::default()).unwrap();
        let mut expected = init;
        for (file, scale) in files.iter().zip(scales) {
            math::add_scaled(&mut expected, &file.values("w").unwrap(), scale);
        }
        assert!(merged == expected, "the same sums in the same order, bit for bit");
    }

    #[test]
    fn a_buffer_the_writer_hands_back_is_reused_zeroed_and_only_the_largest_are_kept() {
        let (give_back, returned) = std::sync::mpsc::channel();
        let mut buffers = Buffers::new(returned);
        let first = buffers.zeroed(1000);
        let address = first.as_ptr();
        give_back.send(vec![7.0f32; 1500]).unwrap();
        give_back.send(first.into_iter().map(|_| 3.0).collect()).unwrap(); // same allocation, written over
        let reused = buffers.zeroed(1200);
        assert!(reused.len() == 1200 && reused.iter().all(|v| *v == 0.0), "handed out zeroed");
        assert!(reused.capacity() >= 1500, "the largest spare is handed out first");
        let next = buffers.zeroed(10);
        assert_eq!(next.as_ptr(), address, "the other spare is reused, not allocated afresh");
        for k in 0..2 * Buffers::KEEP {
            give_back.send(vec![0.0; 100 + k]).unwrap();
        }
        let _ = buffers.zeroed(1);
        assert!(buffers.spare.len() < Buffers::KEEP && buffers.spare.iter().all(|b| b.capacity() >= 100 + Buffers::KEEP), "{:?}", buffers.spare.iter().map(Vec::capacity).collect::<Vec<_>>());
    }

    #[test]
    fn a_negative_running_variance_is_refused_by_tensor_and_index_but_zero_is_kept() {
        let e = check_variance("layer1.0.bn1.running_var", vec![0.5, 0.0, -0.25]).unwrap_err().to_string();
        assert!(e.contains("layer1.0.bn1.running_var") && e.contains("-0.25 at index 2"), "{e}");
        assert_eq!(check_variance("_bn0.running_var", vec![0.0, 1.0]).unwrap(), vec![0.0, 1.0]);
        assert!(check_variance("layer1.0.bn1.running_var", vec![f32::NAN]).is_err());
        assert_eq!(check_variance("_bn0.running_mean", vec![-3.0]).unwrap(), vec![-3.0], "means may be negative");
        assert!(is_bn_statistic("_blocks.0._bn1.running_var") && !is_bn_statistic("_blocks.0._bn1.weight"));
    }
}
