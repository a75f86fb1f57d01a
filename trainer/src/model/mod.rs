//! Classifier networks with stable, checkpoint-compatible tensor names, and their weights on disk.

mod bn;
mod efficientnet;
pub mod layout;
mod mobile;
pub mod precision;
mod resnet;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use medmerge_crds::Architecture;
use safetensors::tensor::Dtype;
use tch::{nn, Device, Kind, Tensor};

pub use bn::{Bn, Moments};
pub use mobile::{Act, Gate};

use crate::checkpoint::{ArtifactKind, ArtifactMeta, MetaError};
use crate::export::graph::{GraphBuilder, GraphError, Value};
use crate::st::{f32_as_le_bytes, MappedFile, StError, StreamWriter, TensorMeta};

/// Errors building, loading or saving networks.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A weights file lacks a tensor the network needs.
    #[error("{path}: missing tensor {name:?} needed by {arch}")]
    MissingTensor { path: PathBuf, name: String, arch: &'static str },
    /// A weights file has a tensor of the wrong shape.
    #[error("{path}: tensor {name:?} has shape {found:?}, {arch} needs {expected:?}")]
    Shape { path: PathBuf, name: String, found: Vec<i64>, expected: Vec<i64>, arch: &'static str },
    /// The weights file does not exist.
    #[error("weights file {path} does not exist{hint}")]
    NoWeights { path: PathBuf, hint: &'static str },
    /// A libtorch error while loading a `.pth` file.
    #[error("cannot load {path} as a PyTorch zip checkpoint (legacy pickles must be converted to safetensors first): {source}")]
    Pth {
        path: PathBuf,
        #[source]
        source: tch::TchError,
    },
    /// The model is not usable (refused before anything publishes it).
    #[error("invalid model: {what}")]
    Invalid { what: String },
    /// A libtorch operation failed.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// safetensors I/O failed.
    #[error(transparent)]
    St(#[from] StError),
    /// Artifact metadata is wrong.
    #[error(transparent)]
    Meta(#[from] MetaError),
}

#[derive(Debug)]
enum Body {
    EfficientNetLite(efficientnet::EfficientNetLite),
    ResNet(resnet::ResNet),
    Mobile(mobile::TorchvisionMobile),
}

/// A classifier: its variables, its forward pass and its batch-norm layers.
pub struct Network {
    /// All trainable weights and batch-norm buffers.
    pub vs: nn::VarStore,
    /// Architecture.
    pub arch: Architecture,
    /// Class names in label order.
    pub classes: Vec<String>,
    /// Input resolution.
    pub image_size: u32,
    /// Multi-label (sigmoid per class) rather than single-label (softmax).
    pub multi_label: bool,
    body: Body,
    bns: Vec<Rc<Bn>>,
}

impl Network {
    /// A freshly initialised network (seeded), on `device`.
    pub fn new(arch: Architecture, classes: &[String], image_size: u32, device: Device, seed: u64) -> Self {
        tch::manual_seed(seed as i64);
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let n = classes.len() as i64;
        let mut bns = Vec::new();
        let body = match arch {
            Architecture::EfficientnetLite0 => Body::EfficientNetLite(efficientnet::EfficientNetLite::lite0(&root, n, &mut bns)),
            Architecture::Resnet18 => Body::ResNet(resnet::ResNet::new(&root, [2, 2, 2, 2], false, n, &mut bns)),
            Architecture::Resnet34 => Body::ResNet(resnet::ResNet::new(&root, [3, 4, 6, 3], false, n, &mut bns)),
            Architecture::Resnet50 => Body::ResNet(resnet::ResNet::new(&root, [3, 4, 6, 3], true, n, &mut bns)),
            Architecture::EfficientnetB0 => Body::Mobile(mobile::TorchvisionMobile::efficientnet_b0(&root, n, &mut bns)),
            Architecture::MobilenetV2 => Body::Mobile(mobile::TorchvisionMobile::mobilenet_v2(&root, n, &mut bns)),
            Architecture::MobilenetV3Large => Body::Mobile(mobile::TorchvisionMobile::mobilenet_v3(&root, true, n, &mut bns)),
            Architecture::MobilenetV3Small => Body::Mobile(mobile::TorchvisionMobile::mobilenet_v3(&root, false, n, &mut bns)),
        };
        if layout::channels_last(device) {
            layout::to_channels_last(&vs);
        }
        Network { vs, arch, classes: classes.to_vec(), image_size, multi_label: false, body, bns }
    }

    /// Loads a complete model file written by [`Network::save`].
    pub fn load(path: &Path, device: Device) -> Result<Self, ModelError> {
        let file = MappedFile::open(path)?;
        let meta = ArtifactMeta::from_map(path, file.metadata(), ArtifactKind::Model)?;
        let mut net = Network::new(meta.arch, &meta.classes, meta.image_size, device, 0);
        net.multi_label = meta.multi_label;
        net.copy_from(&file, |_| true)?;
        Ok(net)
    }

    /// Class probabilities from this model's `logits`: a sigmoid per label for multi-label
    /// models, a softmax over classes otherwise.
    pub fn probabilities(&self, logits: &Tensor) -> Tensor {
        if self.multi_label {
            logits.sigmoid()
        } else {
            logits.softmax(-1, Kind::Float)
        }
    }

    /// The prediction for one image's probabilities `p`: the most probable class, or for
    /// multi-label models every label at or above 0.5, `|`-joined.
    pub fn predicted(&self, p: &[f32]) -> String {
        if self.multi_label {
            self.classes.iter().zip(p).filter(|(_, &v)| v >= 0.5).map(|(c, _)| c.as_str()).collect::<Vec<_>>().join("|")
        } else {
            self.classes[crate::metrics::argmax(p)].clone()
        }
    }

    /// Logits for a batch of normalised images `[N, 3, H, W]`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.forward_tapped(x, train, &mut Tap::off())
    }

    /// Logits, with `tap` capturing the output of one named layer (see [`Network::tap_names`]).
    pub fn forward_tapped(&self, x: &Tensor, train: bool, tap: &mut Tap) -> Tensor {
        match &self.body {
            Body::EfficientNetLite(m) => m.forward_t(x, train, tap),
            Body::ResNet(m) => m.forward_t(x, train, tap),
            Body::Mobile(m) => m.forward_t(x, train, tap),
        }
    }

    /// The eval-mode forward pass as ONNX nodes, from normalised images `x` to logits.
    pub fn emit_onnx(&self, g: &mut GraphBuilder, x: &Value) -> Result<Value, GraphError> {
        match &self.body {
            Body::EfficientNetLite(m) => m.emit_onnx(g, x),
            Body::ResNet(m) => m.emit_onnx(g, x),
            Body::Mobile(m) => m.emit_onnx(g, x),
        }
    }

    /// The convolutional layers whose output can be tapped, in forward order; the last one is
    /// the last convolutional block (Grad-CAM's default).
    pub fn tap_names(&self) -> Vec<String> {
        match &self.body {
            Body::EfficientNetLite(m) => m.tap_names(),
            Body::ResNet(m) => m.tap_names(),
            Body::Mobile(m) => m.tap_names(),
        }
    }

    /// The features the classification head sees, `[N, d]`, in eval mode (running batch-norm
    /// statistics, no dropout).
    pub fn pooled_features(&self, x: &Tensor) -> Tensor {
        let tap = &mut Tap::off();
        match &self.body {
            Body::EfficientNetLite(m) => m.head_input(x, false, tap),
            Body::ResNet(m) => m.head_input(x, false, tap),
            Body::Mobile(m) => m.head_input(x, false, tap),
        }
    }

    /// The head's weight `[classes, d]` and bias `[classes]`.
    pub fn head(&self) -> Option<(Tensor, Tensor)> {
        let prefix = self.head_prefix();
        let vars = self.vs.variables();
        Some((vars.get(&format!("{prefix}weight"))?.shallow_clone(), vars.get(&format!("{prefix}bias"))?.shallow_clone()))
    }

    /// Refuses a model that would give wrong answers: a batch-norm running variance that is
    /// negative or not finite, any non-finite weight, or non-finite logits for a probe batch in
    /// eval mode. Every model a stage publishes goes through this.
    pub fn check_valid(&self) -> Result<(), ModelError> {
        for bn in &self.bns {
            let var = &bn.inner.running_var;
            let bad = var.lt(0.0).logical_or(&var.isfinite().logical_not()).sum(Kind::Int64).int64_value(&[]);
            if bad > 0 {
                let min = var.min().double_value(&[]);
                return Err(ModelError::Invalid { what: format!("batch-norm layer {} has {bad} running variances that are negative or not finite (smallest {min})", bn.name) });
            }
        }
        for (name, t) in self.named_tensors() {
            if !all_finite(&t) {
                return Err(ModelError::Invalid { what: format!("tensor {name} holds NaN or Inf") });
            }
        }
        let device = self.vs.device();
        let size = self.image_size as i64;
        let probe = Tensor::f_randn([2, 3, size, size], (Kind::Float, device))?;
        let logits = tch::no_grad(|| self.forward_t(&probe, false));
        if logits.isfinite().all().int64_value(&[]) == 0 {
            return Err(ModelError::Invalid { what: "a probe batch gives non-finite logits in eval mode".into() });
        }
        Ok(())
    }

    /// The batch-norm layers, in forward order.
    pub fn bns(&self) -> &[Rc<Bn>] {
        &self.bns
    }

    /// Name prefix of the classification head, which is new per task and never part of a vector.
    pub fn head_prefix(&self) -> &'static str {
        head_prefix(self.arch)
    }

    /// Variables sorted by name.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<_> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Copies every variable for which `wanted(name)` holds from `file`, checking names and shapes.
    pub fn copy_from(&mut self, file: &MappedFile, wanted: impl Fn(&str) -> bool) -> Result<(), ModelError> {
        let arch = self.arch.as_str();
        for (name, mut var) in self.named_tensors() {
            if !wanted(&name) {
                continue;
            }
            let meta = file.meta(&name).ok_or_else(|| ModelError::MissingTensor { path: file.path().into(), name: name.clone(), arch })?;
            let found: Vec<i64> = meta.shape.iter().map(|&d| d as i64).collect();
            if found != var.size() {
                return Err(ModelError::Shape { path: file.path().into(), name, found, expected: var.size(), arch });
            }
            // Copied straight from the mapping into the variable: a whole model's worth of
            // temporary copies (a Vec, then a tensor) was most of loading a model.
            let values = file.f32_view(&name)?;
            // SAFETY: `values` holds `found`'s element count of f32 (checked against the
            // variable's shape above) and outlives `src`, which is dropped after the copy.
            let src = unsafe { Tensor::f_from_blob(values.as_ptr().cast::<u8>(), &found, &[], Kind::Float, Device::Cpu) }?;
            tch::no_grad(|| var.f_copy_(&src))?;
            drop(src);
        }
        Ok(())
    }

    /// Writes all variables (F32) with `meta`, atomically.
    pub fn save(&self, path: &Path, meta: &ArtifactMeta) -> Result<(), ModelError> {
        let tensors = self.named_tensors();
        write_tensors(path, &tensors, &meta.to_map())
    }

    /// Imports pretrained weights for every tensor outside the head from a `.safetensors` or
    /// PyTorch zip `.pth` file. Extra tensors in the file (old head, `num_batches_tracked`) are
    /// ignored; missing or mis-shaped ones are refused by name.
    pub fn import_pretrained(&mut self, path: &Path) -> Result<(), ModelError> {
        if !path.exists() {
            return Err(ModelError::NoWeights { path: path.into(), hint: "" });
        }
        let head = self.head_prefix();
        let is_backbone = |n: &str| !n.starts_with(head);
        if path.extension().is_some_and(|e| e == "safetensors") {
            let file = MappedFile::open(path)?;
            return self.copy_from(&file, is_backbone);
        }
        let loaded: BTreeMap<String, Tensor> = Tensor::loadz_multi(path).map_err(|source| ModelError::Pth { path: path.into(), source })?.into_iter().collect();
        let arch = self.arch.as_str();
        for (name, mut var) in self.named_tensors() {
            if !is_backbone(&name) {
                continue;
            }
            let src = loaded.get(&name).ok_or_else(|| ModelError::MissingTensor { path: path.into(), name: name.clone(), arch })?;
            if src.size() != var.size() {
                return Err(ModelError::Shape { path: path.into(), name, found: src.size(), expected: var.size(), arch });
            }
            tch::no_grad(|| var.f_copy_(&src.to_kind(Kind::Float)))?;
        }
        Ok(())
    }
}

/// Captures the output of one named layer during a forward pass (for Grad-CAM).
#[derive(Default)]
pub struct Tap {
    want: Option<String>,
    got: Option<Tensor>,
}

impl Tap {
    /// A tap that captures nothing.
    pub fn off() -> Self {
        Tap::default()
    }

    /// A tap that captures the output of layer `name`.
    pub fn at(name: &str) -> Self {
        Tap { want: Some(name.into()), got: None }
    }

    /// Whether this tap wants any layer (so callers can skip formatting names).
    pub fn is_on(&self) -> bool {
        self.want.is_some()
    }

    /// Offers layer `name`'s output `t`; kept when it is the wanted layer.
    pub fn see(&mut self, name: &str, t: &Tensor) {
        if self.want.as_deref() == Some(name) {
            self.got = Some(t.shallow_clone());
        }
    }

    /// The captured output, if the wanted layer ran.
    pub fn take(&mut self) -> Option<Tensor> {
        self.got.take()
    }
}

pub use crate::checkpoint::head_prefix;

/// Writes named tensors (converted to F32 on the CPU) to a safetensors file, atomically.
pub fn write_tensors(path: &Path, tensors: &[(String, Tensor)], metadata: &BTreeMap<String, String>) -> Result<(), ModelError> {
    let metas = tensors.iter().map(|(n, t)| TensorMeta { name: n.clone(), dtype: Dtype::F32, shape: t.size().iter().map(|&d| d as usize).collect() }).collect();
    let mut w = StreamWriter::create(path, metas, metadata)?;
    for (n, t) in tensors {
        w.write(n, &f32_as_le_bytes(&tensor_to_vec(t)?))?;
    }
    Ok(w.finish()?)
}

/// A tensor's values as a flat f32 vector.
pub fn tensor_to_vec(t: &Tensor) -> Result<Vec<f32>, tch::TchError> {
    let flat = t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?.f_contiguous()?.f_view([-1])?;
    Vec::<f32>::try_from(&flat)
}

/// Where the ImageNet EfficientNet-Lite0 weights are installed by `scripts/setup-torch.sh`.
pub fn builtin_weights_path() -> PathBuf {
    if let Ok(p) = std::env::var("MEDMERGE_WEIGHTS") {
        return PathBuf::from(p);
    }
    let cache = std::env::var("MEDMERGE_CACHE").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| ".".into())).join(".cache/medmerge"));
    cache.join("weights/efficientnet-lite0-imagenet.safetensors")
}

/// The hint printed when the built-in weights are missing.
pub const BUILTIN_WEIGHTS_HINT: &str = " (run scripts/setup-torch.sh, or set MEDMERGE_WEIGHTS)";

/// Whether every value of `t` is finite. A dense CPU float tensor (in any memory format, such as
/// channels-last) is read in place: libtorch's `isfinite().all()` builds a mask as large as the
/// tensor, and over a whole model that was most of checking it.
fn all_finite(t: &Tensor) -> bool {
    let (size, stride) = (t.size(), t.stride());
    let numel: i64 = size.iter().product();
    let last = size.iter().zip(&stride).map(|(n, s)| (n - 1) * s).sum::<i64>();
    let dense = stride.iter().all(|s| *s > 0) && numel > 0 && last + 1 == numel;
    if t.device() == Device::Cpu && t.kind() == Kind::Float && dense {
        // SAFETY: the tensor's elements span exactly `numel` f32 from its data pointer (its
        // strides are positive and its last element sits at offset numel - 1), and `t` is
        // borrowed for as long as the slice lives.
        let values = unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, numel as usize) };
        return values.iter().all(|x| x.is_finite());
    }
    t.isfinite().all().int64_value(&[]) != 0
}
