//! One module per subcommand, each with its flags (`Args`) and a `run` over the library's stage
//! functions, plus what several subcommands share: training flags, the device, input discovery.

pub mod bn_stats;
pub mod evaluate;
pub mod explain;
pub mod export;
pub mod finetune;
pub mod init;
pub mod merge;
pub mod pipeline;
pub mod predict;
pub mod release;
pub mod restore;
pub mod secure;
pub mod serve;
pub mod split;
pub mod store;
pub mod synth;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use medmerge_crds::{validate_release, validate_training, AugmentSpec, Optimizer, PrivacySpec, ReleaseSpec, Schedule, TrainingSpec, VectorEncoding};
use medmerge_trainer::checkpoint::{ArtifactKind, ArtifactMeta};
use medmerge_trainer::data::Dataset;
use medmerge_trainer::model::Network;
use medmerge_trainer::st::MappedFile;
use tch::Device;

/// Training flags shared by `finetune` and `restore` (they map onto `spec.training`).
#[derive(Args)]
pub struct TrainingArgs {
    /// Epochs.
    #[arg(long, default_value_t = 3)]
    epochs: u32,
    /// Batch size.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    batch_size: u32,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Optimiser: adam, adamW, sgd.
    #[arg(long, default_value = "adam")]
    optimizer: String,
    /// Schedule: constant, cosine.
    #[arg(long, default_value = "constant")]
    schedule: String,
    /// Weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Seed.
    #[arg(long, default_value_t = 3315)]
    seed: u64,
    /// Held-out fraction for picking the epoch with the best balanced accuracy (0: the last).
    #[arg(long, default_value_t = 0.0)]
    validation_fraction: f64,
    /// Disable class-weighted cross-entropy.
    #[arg(long)]
    no_class_weighting: bool,
    /// Disable random flips.
    #[arg(long)]
    no_flip: bool,
    /// On CUDA, train with bfloat16 autocast.
    #[arg(long)]
    mixed_precision: bool,
}

/// How the vector leaves the hospital (they map onto `spec.release`).
#[derive(Args)]
pub struct ReleaseArgs {
    /// Differential privacy: the privacy loss epsilon (with --delta and --clip-norm).
    #[arg(long, requires_all = ["delta", "clip_norm"])]
    epsilon: Option<f64>,
    /// Differential privacy: the failure probability delta.
    #[arg(long, requires = "epsilon")]
    delta: Option<f64>,
    /// Differential privacy: the L2 norm the vector is clipped to before noise.
    #[arg(long, requires = "epsilon")]
    clip_norm: Option<f64>,
    /// Encoding of the vector's weight tensors: float32, int8 or topK.
    #[arg(long, default_value = "float32")]
    encoding: String,
    /// With --encoding topK: the fraction of each tensor's entries kept (default 0.1).
    #[arg(long)]
    density: Option<f64>,
}

impl ReleaseArgs {
    /// The release settings, refused naming the flag where the spec would refuse them.
    pub fn spec(&self) -> anyhow::Result<ReleaseSpec> {
        let encoding = serde_yaml::from_str::<VectorEncoding>(&self.encoding).with_context(|| format!("--encoding {}: expected float32, int8 or topK", self.encoding))?;
        let privacy = match (self.epsilon, self.delta, self.clip_norm) {
            (Some(epsilon), Some(delta), Some(clip_norm)) => Some(PrivacySpec { epsilon, delta, clip_norm }),
            _ => None,
        };
        let spec = ReleaseSpec { privacy, encoding, density: self.density };
        let flags = [
            ("release.privacy.epsilon", "--epsilon"),
            ("release.privacy.delta", "--delta"),
            ("release.privacy.clipNorm", "--clip-norm"),
            ("release.encoding", "--encoding"),
            ("release.density", "--density"),
        ];
        check_flags(validate_release(&spec, ""), &flags)?;
        Ok(spec)
    }
}

pub use medmerge_merge::cli::check_flags;

impl TrainingArgs {
    /// The training settings, refused naming the flag where the spec would refuse them.
    pub fn spec(&self) -> anyhow::Result<TrainingSpec> {
        let spec = self.unchecked()?;
        let flags = [
            ("training.epochs", "--epochs"),
            ("training.batchSize", "--batch-size"),
            ("training.learningRate", "--lr"),
            ("training.weightDecay", "--weight-decay"),
            ("training.validationFraction", "--validation-fraction"),
        ];
        check_flags(validate_training(&spec), &flags)?;
        Ok(spec)
    }

    fn unchecked(&self) -> anyhow::Result<TrainingSpec> {
        Ok(TrainingSpec {
            epochs: self.epochs,
            batch_size: self.batch_size,
            optimizer: serde_yaml::from_str::<Optimizer>(&self.optimizer).with_context(|| format!("--optimizer {}", self.optimizer))?,
            learning_rate: self.lr,
            weight_decay: self.weight_decay,
            schedule: serde_yaml::from_str::<Schedule>(&self.schedule).with_context(|| format!("--schedule {}", self.schedule))?,
            seed: self.seed,
            class_weighting: !self.no_class_weighting,
            validation_fraction: self.validation_fraction,
            augment: AugmentSpec { flip: !self.no_flip, ..AugmentSpec::default() },
            mixed_precision: self.mixed_precision,
        })
    }
}

/// The libtorch device `--device` names.
pub fn device(name: &str) -> anyhow::Result<Device> {
    match name {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        "cuda" => anyhow::bail!("--device cuda: no CUDA device is available to libtorch"),
        other => anyhow::bail!("--device {other}: expected auto, cpu or cuda"),
    }
}

/// The metadata of the model file at `path`.
pub fn model_meta(path: &std::path::Path) -> anyhow::Result<ArtifactMeta> {
    Ok(ArtifactMeta::from_map(path, MappedFile::open(path)?.metadata(), ArtifactKind::Model)?)
}

/// The model and the images that `predict` and `explain` read.
#[derive(Args)]
pub struct ModelInputArgs {
    /// Model file.
    #[arg(long)]
    pub model: PathBuf,
    /// An image, a folder of images (searched recursively) or a manifest (labels kept).
    #[arg(long)]
    pub input: PathBuf,
}

impl ModelInputArgs {
    /// The model, its images and whether their labels are real.
    pub fn load(&self, dev: Device) -> anyhow::Result<(Network, Dataset, bool)> {
        let net = Network::load(&self.model, dev)?;
        let (images, labelled) = prediction_inputs(&self.input, &net)?;
        Ok((net, images, labelled))
    }
}

/// The images `predict` and `explain` read: one image, a folder (searched recursively, no
/// labels) or a manifest/ImageFolder dataset; the flag says whether labels are real.
fn prediction_inputs(input: &Path, net: &Network) -> anyhow::Result<(Dataset, bool)> {
    if input.is_file() && input.extension().is_some_and(|e| e != "csv") {
        let sample = medmerge_trainer::data::Sample { path: input.into(), label: 0, targets: vec![] };
        Ok((Dataset { source: input.into(), classes: net.classes.clone(), samples: vec![sample], multi_label: false }, false))
    } else if input.is_dir() {
        Ok((Dataset::unlabelled(input, &net.classes)?, false))
    } else {
        Ok((Dataset::open(input, Some(&net.classes))?, true))
    }
}

/// `data`'s image paths without labels.
pub fn unlabelled(data: &Dataset) -> Vec<(PathBuf, Option<usize>)> {
    data.samples.iter().map(|s| (s.path.clone(), None)).collect()
}
