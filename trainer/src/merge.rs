//! The merge as the trainer runs it: [`medmerge_merge::merge`]'s streaming merge, plus what needs
//! libtorch: data vectors written from a trained network, a shard's own model rebuilt from its
//! vector, and the merged model loaded and probed before it is published.

use std::path::Path;

use medmerge_crds::results::ReleaseRecord;
use medmerge_crds::ReleaseSpec;
pub use medmerge_merge::merge::*;
use tch::{Device, Tensor};

use crate::checkpoint::{file_digest, ArtifactKind, ArtifactMeta};
use crate::model::{ModelError, Network};
use crate::release::VectorTensor;
use crate::st::{MappedFile, StError};

impl From<ModelError> for MergeError {
    fn from(e: ModelError) -> Self {
        MergeError::Model(Box::new(e))
    }
}

/// Writes shard `shard`'s data vector, released as `spec` asks (privacy noise drawn from the
/// operating system's randomness, then the encoding): `net - base` for pretrained tensors,
/// `net`'s head as is. Returns what the release did, with the file's size.
pub fn write_vector(net: &Network, base_path: &Path, shard: &str, class_counts: Vec<u64>, spec: &ReleaseSpec, out: &Path) -> Result<ReleaseRecord, MergeError> {
    let base = MappedFile::open(base_path)?;
    let base_meta = ArtifactMeta::from_map(base_path, base.metadata(), ArtifactKind::Model)?;
    let head = net.head_prefix();
    let mut tensors = Vec::new();
    for (name, t) in net.named_tensors() {
        let mut values = crate::model::tensor_to_vec(&t).map_err(ModelError::from)?;
        if !name.starts_with(head) {
            math::add_scaled(&mut values, &base.f32(&name)?, -1.0);
        }
        tensors.push(VectorTensor { shape: t.size().iter().map(|&d| d as usize).collect(), name, values });
    }
    let meta = ArtifactMeta { kind: ArtifactKind::Vector, base_digest: file_digest(base_path)?, shard: Some(shard.into()), class_counts, ..base_meta };
    write_released(tensors, &meta, spec, out)
}

/// A shard's own fine-tuned model: base plus its vector, with its head.
pub fn shard_model(base_path: &Path, vector: &ShardVector, device: Device) -> Result<Network, MergeError> {
    let net = Network::load(base_path, device)?;
    let base = MappedFile::open(base_path)?;
    let base_meta = ArtifactMeta::from_map(base_path, base.metadata(), ArtifactKind::Model)?;
    let v = open_checked_vector(vector, &base, &file_digest(base_path)?, &base_meta)?;
    let head = net.head_prefix();
    for (name, mut var) in net.named_tensors() {
        let delta = Tensor::from_slice(&v.1.values(&name)?).view(var.size().as_slice()).to_device(var.device());
        tch::no_grad(|| if name.starts_with(head) { var.f_copy_(&delta) } else { var.f_add_(&delta).map(|_| ()) }).map_err(ModelError::from)?;
    }
    Ok(net)
}

/// [`merge_files`], then the merged model loaded and checked ([`Network::check_valid`]) before it
/// is published at `out`: a model that fails is refused and `out` is left as it was.
pub fn merge_checked(base_path: &Path, vectors: &[ShardVector], opts: &MergeOptions, out: &Path, device: Device) -> Result<(), MergeError> {
    publish_valid_model(out, device, |unchecked| merge_files(base_path, vectors, opts, unchecked), |e| blame_noise(e, vectors))
}

/// Writes a model with `write` to a temporary file beside `out`, loads and checks it
/// ([`Network::check_valid`]) and only then renames it to `out`; a model that fails is removed
/// and its error passed through `explain`.
pub fn publish_valid_model(out: &Path, device: Device, write: impl FnOnce(&Path) -> Result<(), MergeError>, explain: impl FnOnce(MergeError) -> MergeError) -> Result<(), MergeError> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| StError::Write { path: dir.into(), source })?;
    }
    let unchecked = crate::st::temp_path(out);
    let result = write(&unchecked).and_then(|()| {
        Network::load(&unchecked, device)?.check_valid().map_err(|e| explain(MergeError::from(e)))?;
        std::fs::rename(&unchecked, out).map_err(|source| StError::Write { path: out.into(), source }.into())
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&unchecked);
    }
    result
}
