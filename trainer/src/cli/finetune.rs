//! Fine-tunes the base on one shard's images and writes the shard's data vector.

use std::path::PathBuf;

use medmerge_trainer::data::Dataset;
use medmerge_trainer::merge::write_vector;
use medmerge_trainer::model::Network;
use medmerge_trainer::release::describe_release;
use medmerge_trainer::train;
use tch::Device;

use super::{ReleaseArgs, TrainingArgs};
use crate::stdout::say;

/// The subcommand's flags.
#[derive(clap::Args)]
pub struct Args {
    /// Base model written by `init`.
    #[arg(long)]
    base: PathBuf,
    /// The shard's images (ImageFolder or manifest).
    #[arg(long)]
    data: PathBuf,
    /// Shard name recorded in the vector.
    #[arg(long)]
    shard: String,
    /// Output vector file.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    training: TrainingArgs,
    #[command(flatten)]
    release: ReleaseArgs,
}

/// Runs the subcommand.
pub fn run(a: Args, dev: Device) -> anyhow::Result<()> {
    let training = a.training.spec()?;
    let release = a.release.spec()?;
    let mut net = Network::load(&a.base, dev)?;
    let data = Dataset::open(&a.data, Some(&net.classes))?;
    let report = train::train(&mut net, &data, &training, dev, &a.shard)?;
    let released = write_vector(&net, &a.base, &a.shard, report.class_counts.clone(), &release, &a.out)?;
    say!("data vector of shard {} written to {} (best epoch {}, {})", a.shard, a.out.display(), report.best_epoch, describe_release(&released));
    Ok(())
}
