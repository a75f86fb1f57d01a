//! Masking a hospital's vector for the sum, and the coordinator's merge of masked vectors.

use std::collections::BTreeSet;
use std::path::Path;

use medmerge_crds::{HeadStrategy, MergeMethod};
use rand::RngCore;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};
use tch::Device;

use super::{from_fixed, mask_sign, to_fixed, DropoutShare, HospitalKey, Roster, SecureError};
use crate::checkpoint::{file_digest, ArtifactKind, ArtifactMeta};
use crate::merge::{check_variance, is_bn_statistic, publish_valid_model, read_vector_tensors, MergeError, MergeOptions, ShardVector};
use crate::model::head_prefix;
use crate::st::{f32_as_le_bytes, MappedFile, StError, StreamWriter, TensorMeta};

pub use medmerge_merge::secure::MASKED_KEY;

/// Which sum a masked vector is part of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskedFor {
    /// The run's session name.
    pub session: String,
    /// The hospital that masked it (its roster name).
    pub shard: String,
    /// Every hospital of the roster.
    pub roster: Vec<String>,
}

impl MaskedFor {
    /// What a file's metadata says it was masked for, or None for a file that is not masked.
    pub fn from_metadata(metadata: &std::collections::BTreeMap<String, String>) -> Option<Self> {
        metadata.get(MASKED_KEY).and_then(|j| serde_json::from_str(j).ok())
    }
}

/// Masks hospital `me`'s vector (checked against the base) for `session` and writes it to `out`:
/// every entry in fixed point plus, for every other hospital of the roster, their pair's mask.
pub fn mask_vector(base_path: &Path, vector: &ShardVector, roster: &Roster, me: &str, key: &HospitalKey, session: &str, out: &Path) -> Result<(), MergeError> {
    let (meta, tensors) = read_vector_tensors(base_path, vector)?;
    let peers: Vec<(String, super::PairSeed)> = roster.names().into_iter().filter(|n| n != me).map(|n| roster.pair_seed(me, key, &n, session).map(|s| (n, s))).collect::<Result<_, _>>()?;
    let mut parts = Vec::new();
    for t in &tensors {
        let mut words = Vec::with_capacity(t.values.len());
        for x in &t.values {
            words.push(to_fixed(*x).ok_or_else(|| SecureError::Mismatch(format!("shard {me}: tensor {:?} holds {x}, beyond the fixed-point range", t.name)))?);
        }
        for (peer, seed) in &peers {
            let mut stream = seed.stream(&t.name);
            let add = mask_sign(me, peer);
            for w in words.iter_mut() {
                let m = stream.next_u64();
                *w = if add { w.wrapping_add(m) } else { w.wrapping_sub(m) };
            }
        }
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        parts.push((TensorMeta { name: t.name.clone(), dtype: Dtype::U64, shape: t.shape.clone() }, bytes));
    }
    let mut metadata = ArtifactMeta { shard: Some(me.into()), ..meta }.to_map();
    let masked = MaskedFor { session: session.into(), shard: me.into(), roster: roster.names() };
    metadata.insert(MASKED_KEY.into(), serde_json::to_string(&masked).expect("names serialise"));
    let mut writer = StreamWriter::create(out, parts.iter().map(|(m, _)| m.clone()).collect(), &metadata)?;
    for (m, bytes) in &parts {
        writer.write(&m.name, bytes)?;
    }
    Ok(writer.finish()?)
}

/// Checks one hospital's masked upload as a collect stage receives it: a masked vector of this
/// base for `session`, masked by the shard it is collected for. Returns what it was masked for
/// (the roster tells the merge whose shares to expect if someone drops out).
pub fn check_masked(base_path: &Path, vector: &ShardVector, session: &str) -> Result<MaskedFor, MergeError> {
    let base = MappedFile::open(base_path)?;
    let base_meta = ArtifactMeta::from_map(base_path, base.metadata(), ArtifactKind::Model)?;
    let upload = open_masked(&base, &base_meta, &file_digest(base_path)?, std::slice::from_ref(vector))?.remove(0);
    if upload.masked.session != session {
        return Err(MergeError::Secure(SecureError::Mismatch(format!("shard {}: masked for session {:?}, this MergeJob's is {session:?}", vector.shard, upload.masked.session))));
    }
    Ok(upload.masked)
}

/// One masked upload, opened and checked.
struct Masked {
    shard: String,
    file: MappedFile,
    masked: MaskedFor,
}

/// Merges the masked vectors of the hospitals that uploaded, removing with `shares` the masks
/// of those that did not, and publishes the checked model at `out`. The result equals
/// [`crate::merge::merge_checked`] on the plain vectors (to the fixed-point rounding). Only sums
/// are available, so only `dataVector` and `paramsMean` with mean heads are possible.
pub fn secure_merge(base_path: &Path, masked: &[ShardVector], shares: &[DropoutShare], opts: &MergeOptions, out: &Path, device: Device) -> Result<(), MergeError> {
    let mismatch = |m: String| MergeError::Secure(SecureError::Mismatch(m));
    let body_scale = match (opts.method, opts.heads) {
        _ if opts.pretrained_only => 0.0,
        (MergeMethod::DataVector, HeadStrategy::Mean) => opts.lambda as f32,
        (MergeMethod::ParamsMean, HeadStrategy::Mean) => 1.0 / masked.len().max(1) as f32,
        (method, heads) => {
            return Err(mismatch(format!(
                "secure aggregation reveals only the sum: merge method {} with {heads:?} heads needs each vector; use dataVector or paramsMean with mean heads",
                method.as_str()
            )))
        }
    };
    let base = MappedFile::open(base_path)?;
    let base_meta = ArtifactMeta::from_map(base_path, base.metadata(), ArtifactKind::Model)?;
    let digest = file_digest(base_path)?;
    let uploads = open_masked(&base, &base_meta, &digest, masked)?;
    let removals = dropout_masks(&uploads, shares)?;
    let n = uploads.len() as f32;
    let head = head_prefix(base_meta.arch);
    publish_valid_model(
        out,
        device,
        |unchecked| {
            let metas: Vec<TensorMeta> = base.tensors().cloned().collect();
            let out_meta = ArtifactMeta { kind: ArtifactKind::Model, base_digest: digest.clone(), shard: None, class_counts: vec![], ..base_meta.clone() };
            let mut writer = StreamWriter::create(unchecked, metas.clone(), &out_meta.to_map())?;
            for t in &metas {
                if t.dtype != Dtype::F32 {
                    writer.write(&t.name, base.bytes(&t.name)?)?;
                    continue;
                }
                let sum = unmasked_sum(&t.name, t.numel(), &uploads, &removals)?;
                let merged: Vec<f32> = if t.name.starts_with(head) {
                    sum.iter().map(|s| (s / n as f64) as f32).collect()
                } else {
                    let scale = if is_bn_statistic(&t.name) {
                        if opts.pretrained_only {
                            0.0
                        } else {
                            1.0 / n
                        }
                    } else {
                        body_scale
                    };
                    base.f32(&t.name)?.iter().zip(&sum).map(|(p, s)| p + scale * *s as f32).collect()
                };
                writer.write(&t.name, &f32_as_le_bytes(&check_variance(&t.name, merged)?))?;
            }
            Ok(writer.finish()?)
        },
        |e| e,
    )
}

/// Opens every masked upload and checks it against the base and the others: a masked medmerge
/// vector of this base, architecture and classes, the same session and roster, named as given,
/// with every tensor of the base in 64-bit words.
fn open_masked(base: &MappedFile, base_meta: &ArtifactMeta, digest: &str, masked: &[ShardVector]) -> Result<Vec<Masked>, MergeError> {
    let mismatch = |m: String| MergeError::Secure(SecureError::Mismatch(m));
    let mut uploads: Vec<Masked> = Vec::new();
    for v in masked {
        let file = MappedFile::open(&v.path)?;
        let meta = ArtifactMeta::from_map(&v.path, file.metadata(), ArtifactKind::Vector)?;
        let shard = v.shard.clone();
        let m = MaskedFor::from_metadata(file.metadata()).ok_or_else(|| mismatch(format!("shard {shard}: {} is not a masked vector (mask it with `secure mask`)", v.path.display())))?;
        if meta.base_digest != digest {
            return Err(MergeError::BaseMismatch { shard, path: v.path.clone(), found: meta.base_digest, expected: digest.into() });
        }
        if m.shard != shard {
            return Err(mismatch(format!("shard {shard}: {} was masked by {}", v.path.display(), m.shard)));
        }
        if let Some(first) = uploads.first() {
            if m.session != first.masked.session || m.roster != first.masked.roster {
                return Err(mismatch(format!(
                    "shard {shard} masked for session {:?} with roster {:?}, shard {} for {:?} with {:?}",
                    m.session, m.roster, first.shard, first.masked.session, first.masked.roster
                )));
            }
        }
        if !m.roster.contains(&shard) || uploads.iter().any(|u| u.shard == shard) {
            return Err(mismatch(format!("shard {shard}: not in the roster {:?}, or given twice", m.roster)));
        }
        let stored: Vec<TensorMeta> = file.tensors().cloned().collect();
        crate::merge::check_like_base(&shard, &meta, base_meta, base, &stored, |t| if t.dtype == Dtype::F32 { Dtype::U64 } else { t.dtype })?;
        uploads.push(Masked { shard: v.shard.clone(), file, masked: m });
    }
    if uploads.is_empty() {
        return Err(MergeError::NoVectors);
    }
    Ok(uploads)
}

/// The pair masks to take out of the sum: for every uploader and every hospital of the roster
/// that did not upload, the uploader's dropout share about it (its seed, and whether the
/// uploader added or subtracted that pair's mask).
fn dropout_masks(uploads: &[Masked], shares: &[DropoutShare]) -> Result<Vec<(super::PairSeed, bool)>, MergeError> {
    let mismatch = |m: String| MergeError::Secure(SecureError::Mismatch(m));
    let first = &uploads[0].masked;
    let uploaded: BTreeSet<&str> = uploads.iter().map(|u| u.shard.as_str()).collect();
    let dropped: Vec<&String> = first.roster.iter().filter(|n| !uploaded.contains(n.as_str())).collect();
    let shares: Vec<&DropoutShare> = shares.iter().filter(|s| s.session == first.session).collect();
    if let Some(revealed) = shares.iter().find(|s| uploaded.contains(s.dropped.as_str())) {
        return Err(mismatch(format!("shard {}'s masks were revealed by {}'s dropout share: its upload would be readable and is not merged", revealed.dropped, revealed.from)));
    }
    let mut removals = Vec::new();
    let mut missing = Vec::new();
    for u in uploads {
        for d in &dropped {
            match shares.iter().find(|s| s.from == u.shard && &s.dropped == *d) {
                Some(share) => removals.push((share.pair_seed()?, mask_sign(&u.shard, d))),
                None => missing.push(format!("{} about {d}", u.shard)),
            }
        }
    }
    if !missing.is_empty() {
        return Err(mismatch(format!(
            "{} did not upload; their masks stay in the sum until these dropout shares arrive: {}",
            dropped.iter().map(|d| d.as_str()).collect::<Vec<_>>().join(", "),
            missing.join("; ")
        )));
    }
    Ok(removals)
}

/// The sum of every upload's tensor `name` with the dropped pairs' masks taken out, decoded.
fn unmasked_sum(name: &str, numel: usize, uploads: &[Masked], removals: &[(super::PairSeed, bool)]) -> Result<Vec<f64>, StError> {
    let mut sum = vec![0u64; numel];
    for u in uploads {
        for (s, chunk) in sum.iter_mut().zip(u.file.bytes(name)?.chunks_exact(8)) {
            *s = s.wrapping_add(u64::from_le_bytes(chunk.try_into().expect("chunk of 8")));
        }
    }
    for (seed, added) in removals {
        let mut stream = seed.stream(name);
        for s in sum.iter_mut() {
            let m = stream.next_u64();
            *s = if *added { s.wrapping_sub(m) } else { s.wrapping_add(m) };
        }
    }
    Ok(sum.into_iter().map(from_fixed).collect())
}
