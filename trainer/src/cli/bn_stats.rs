//! Computes a model's batch-norm moments on one shard (only aggregates leave the shard).

use std::path::PathBuf;

use clap::builder::TypedValueParser;
use medmerge_trainer::data::Dataset;
use medmerge_trainer::model::Network;
use medmerge_trainer::restore::{collect_moments, save_moments};
use tch::Device;

use super::model_meta;
use crate::stdout::say;

/// The subcommand's flags.
#[derive(clap::Args)]
pub struct Args {
    /// Model to restore.
    #[arg(long)]
    model: PathBuf,
    /// The shard's images (ImageFolder or manifest).
    #[arg(long)]
    data: PathBuf,
    /// Output moments file.
    #[arg(long)]
    out: PathBuf,
    /// Images per batch.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
    batch_size: usize,
}

/// Runs the subcommand.
pub fn run(Args { model, data, out, batch_size }: Args, dev: Device) -> anyhow::Result<()> {
    let net = Network::load(&model, dev)?;
    let ds = Dataset::open(&data, Some(&net.classes))?;
    let moments = collect_moments(&net, &ds, batch_size, dev)?;
    save_moments(&out, &moments, &model_meta(&model)?)?;
    say!("batch-norm moments written to {}", out.display());
    Ok(())
}
