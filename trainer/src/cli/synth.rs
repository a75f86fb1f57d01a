//! Generates a small labelled image set of shapes for demos and tests.

use std::path::PathBuf;

use medmerge_trainer::synth;
use tch::Device;

use crate::stdout::say;

/// The subcommand's flags.
#[derive(clap::Args)]
pub struct Args {
    /// Output ImageFolder.
    #[arg(long)]
    out: PathBuf,
    /// Number of classes (2-4).
    #[arg(long, default_value_t = 3)]
    classes: usize,
    /// Images per class.
    #[arg(long, default_value_t = 60)]
    per_class: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 64)]
    size: u32,
    /// Per-pixel noise, in grey levels (0-255).
    #[arg(long, default_value_t = 20)]
    noise: i16,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Runs the subcommand.
pub fn run(Args { out, classes, per_class, size, noise, seed }: Args, _dev: Device) -> anyhow::Result<()> {
    synth::generate_noisy(&out, classes, per_class, size, seed, noise)?;
    say!("generated {} classes x {per_class} images of {size}px in {}", classes.clamp(2, 4), out.display());
    Ok(())
}
