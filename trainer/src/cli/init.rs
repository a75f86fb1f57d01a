//! Writes the base model: pretrained weights plus a new seeded head.

use std::path::PathBuf;

use anyhow::Context;
use medmerge_crds::{validate_model, Architecture, ModelSpec, WeightsSource};
use medmerge_trainer::checkpoint::{ArtifactKind, ArtifactMeta};
use medmerge_trainer::data::Dataset;
use medmerge_trainer::pipeline::init_base;
use tch::Device;

use super::check_flags;
use crate::stdout::say;

/// The subcommand's flags.
#[derive(clap::Args)]
pub struct Args {
    /// Architecture.
    #[arg(long, default_value = "efficientnet-lite0")]
    arch: String,
    /// imagenet (efficientnet-lite0), random, or a .safetensors/.pth file.
    #[arg(long, default_value = "imagenet")]
    weights: String,
    /// Class names, comma-separated (or give --data to read them from an ImageFolder).
    #[arg(long, value_delimiter = ',')]
    classes: Vec<String>,
    /// An ImageFolder whose folder names are the classes.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Input resolution.
    #[arg(long, default_value_t = 128)]
    image_size: u32,
    /// Seed for new layers.
    #[arg(long, default_value_t = 3315)]
    seed: u64,
    /// Multi-label model (sigmoid per class, binary cross-entropy).
    #[arg(long)]
    multi_label: bool,
    /// Output base model.
    #[arg(long)]
    out: PathBuf,
}

/// Runs the subcommand.
pub fn run(a: Args, dev: Device) -> anyhow::Result<()> {
    let arch = Architecture::parse(&a.arch).with_context(|| format!("--arch {}: unknown architecture", a.arch))?;
    let classes = match (&a.data, a.classes.is_empty()) {
        (Some(d), true) => Dataset::open(d, None)?.classes,
        (None, true) => anyhow::bail!("--classes or --data is required to know the classes"),
        _ => a.classes.clone(),
    };
    let (weights, weights_path) = match a.weights.as_str() {
        "imagenet" => (WeightsSource::Imagenet, None),
        "random" => (WeightsSource::Random, None),
        path => (WeightsSource::File, Some(path.to_string())),
    };
    let model = ModelSpec { architecture: arch, weights, weights_path: weights_path.clone(), classes: classes.clone(), image_size: a.image_size, seed: a.seed, multi_label: a.multi_label };
    check_flags(validate_model(&model), &[("model.imageSize", "--image-size"), ("model.classes", "--classes"), ("model.weights", "--weights")])?;
    let net = init_base(&model, &classes, dev, weights_path.map(PathBuf::from))?;
    let meta = ArtifactMeta { kind: ArtifactKind::Model, arch, classes, image_size: a.image_size, base_digest: String::new(), shard: None, class_counts: vec![], multi_label: a.multi_label };
    net.save(&a.out, &meta)?;
    say!("base model written to {}", a.out.display());
    Ok(())
}
