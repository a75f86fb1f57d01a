//! Writes a model as ONNX (opset 17) for serving stacks and edge devices.

use std::path::PathBuf;

use anyhow::Context;
use medmerge_trainer::export::{quantise_weights, write_onnx, Precision};
use medmerge_trainer::model::Network;
use tch::Device;

use crate::stdout::say;

/// The subcommand's flags.
#[derive(clap::Args)]
pub struct Args {
    /// The model (a merged, restored or any medmerge model file).
    #[arg(long)]
    model: PathBuf,
    /// The ONNX file to write.
    #[arg(long)]
    out: PathBuf,
    /// Store convolution kernels and linear weights as int8 (one scale per output channel;
    /// the first convolution and the head stay float32): about a quarter of the size, for
    /// edge devices.
    #[arg(long)]
    int8: bool,
}

/// Runs the subcommand.
/// Export reads weights only, so it runs on the CPU whatever `--device` says.
pub fn run(Args { model, out, int8 }: Args) -> anyhow::Result<()> {
    let mut net = Network::load(&model, Device::Cpu).with_context(|| format!("--model {}", model.display()))?;
    let precision = if int8 {
        quantise_weights(&mut net)?;
        Precision::Int8Weights
    } else {
        Precision::Float32
    };
    let bytes = write_onnx(&net, &out, precision).with_context(|| format!("--out {}", out.display()))?;
    say!("wrote {} ({} {}, {} classes, {:.1} MB, {})", out.display(), net.arch.as_str(), net.image_size, net.classes.len(), bytes as f64 / 1e6, precision.as_str());
    Ok(())
}
