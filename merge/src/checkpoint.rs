//! What medmerge artifacts say about themselves (safetensors `__metadata__`), and the SHA-256
//! digest that ties every vector to the exact base it was computed from.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use medmerge_crds::Architecture;

/// The kinds of tensor files medmerge writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArtifactKind {
    /// Complete model weights (base, merged, restored, full-training).
    Model,
    /// A shard's data vector: deltas for pretrained tensors, absolute values for its head.
    Vector,
    /// Batch-norm moments a shard computed for restoration.
    BnStats,
    /// Per-class feature statistics a shard computed for the closed-form head.
    HeadStats,
}

impl ArtifactKind {
    fn as_str(self) -> &'static str {
        match self {
            ArtifactKind::Model => "model",
            ArtifactKind::Vector => "data-vector",
            ArtifactKind::BnStats => "bn-stats",
            ArtifactKind::HeadStats => "head-stats",
        }
    }
}

/// Errors about artifact metadata.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// A required metadata key is missing or unreadable.
    #[error("{path}: metadata {key:?} is missing or invalid (not a medmerge {expected} file?)")]
    Field { path: String, key: &'static str, expected: &'static str },
    /// The file is a different kind of artifact.
    #[error("{path} is a {found} file, expected {expected}")]
    Kind { path: String, found: String, expected: &'static str },
    /// Reading the file for its digest failed.
    #[error("cannot read {path} to compute its digest: {source}")]
    Digest {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Metadata carried by every medmerge tensor file.
#[derive(Clone, Debug, PartialEq)]
pub struct ArtifactMeta {
    /// What the file holds.
    pub kind: ArtifactKind,
    /// Network architecture.
    pub arch: Architecture,
    /// Class names in label order.
    pub classes: Vec<String>,
    /// Input resolution.
    pub image_size: u32,
    /// SHA-256 of the base model file the weights descend from (empty for the base itself).
    pub base_digest: String,
    /// The shard that produced it, if any.
    pub shard: Option<String>,
    /// Training images per class behind it (vectors).
    pub class_counts: Vec<u64>,
    /// Multi-label model (sigmoid per class) rather than one class per image (softmax).
    pub multi_label: bool,
}

impl ArtifactMeta {
    /// Total training images behind it.
    pub fn samples(&self) -> u64 {
        self.class_counts.iter().sum()
    }

    /// As a safetensors `__metadata__` map.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert("format".into(), "medmerge/1".into());
        m.insert("medmerge_version".into(), env!("CARGO_PKG_VERSION").into());
        m.insert("kind".into(), self.kind.as_str().into());
        m.insert("arch".into(), self.arch.as_str().into());
        m.insert("classes".into(), serde_json::to_string(&self.classes).expect("strings serialise"));
        m.insert("image_size".into(), self.image_size.to_string());
        m.insert("base_digest".into(), self.base_digest.clone());
        if let Some(s) = &self.shard {
            m.insert("shard".into(), s.clone());
        }
        m.insert("class_counts".into(), serde_json::to_string(&self.class_counts).expect("ints serialise"));
        m.insert("samples".into(), self.samples().to_string());
        if self.multi_label {
            m.insert("multi_label".into(), "true".into());
        }
        m
    }

    /// Reads it back from a file's metadata map, requiring kind `expected`.
    pub fn from_map(path: &Path, map: &BTreeMap<String, String>, expected: ArtifactKind) -> Result<Self, MetaError> {
        let p = path.display().to_string();
        let field = |key: &'static str| MetaError::Field { path: p.clone(), key, expected: expected.as_str() };
        let kind = map.get("kind").ok_or_else(|| field("kind"))?;
        if kind != expected.as_str() {
            return Err(MetaError::Kind { path: p.clone(), found: kind.clone(), expected: expected.as_str() });
        }
        Ok(ArtifactMeta {
            kind: expected,
            arch: map.get("arch").and_then(|a| Architecture::parse(a)).ok_or_else(|| field("arch"))?,
            classes: map.get("classes").and_then(|c| serde_json::from_str(c).ok()).ok_or_else(|| field("classes"))?,
            image_size: map.get("image_size").and_then(|s| s.parse().ok()).ok_or_else(|| field("image_size"))?,
            base_digest: map.get("base_digest").cloned().ok_or_else(|| field("base_digest"))?,
            shard: map.get("shard").cloned(),
            class_counts: map.get("class_counts").and_then(|c| serde_json::from_str(c).ok()).unwrap_or_default(),
            multi_label: map.get("multi_label").is_some_and(|v| v == "true"),
        })
    }
}

/// SHA-256 of a file, hex-encoded.
pub fn file_digest(path: &Path) -> Result<String, MetaError> {
    use sha2::Digest;
    let err = |source| MetaError::Digest { path: path.display().to_string(), source };
    let mut f = std::fs::File::open(path).map_err(err)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = f.read(&mut buf).map_err(err)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Head name prefix per architecture.
pub fn head_prefix(arch: Architecture) -> &'static str {
    match arch {
        Architecture::EfficientnetLite0 => "_fc.",
        Architecture::Resnet18 | Architecture::Resnet34 | Architecture::Resnet50 => "fc.",
        Architecture::EfficientnetB0 | Architecture::MobilenetV2 => "classifier.",
        // classifier.0 is MobileNetV3's pretrained hidden layer; only classifier.3 is new.
        Architecture::MobilenetV3Large | Architecture::MobilenetV3Small => "classifier.3.",
    }
}
