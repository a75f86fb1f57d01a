//! Merges data vectors onto the base (`medmerge-merge` does the same without libtorch; this one
//! also probes the merged model in libtorch before publishing it, and merges masked vectors).

use std::path::PathBuf;

use anyhow::Context;
use medmerge_merge::cli::{named_vectors, MergeFlags};
use medmerge_trainer::merge::merge_checked;
use medmerge_trainer::secure::merge::secure_merge;
use medmerge_trainer::secure::DropoutShare;
use tch::Device;

use crate::stdout::say;

/// The subcommand's flags.
#[derive(clap::Args)]
pub struct Args {
    /// Vectors as NAME=PATH (repeatable).
    #[arg(long = "vector", required_unless_present = "masked")]
    vectors: Vec<String>,
    /// Masked vectors as NAME=PATH (repeatable; from `secure mask`): merged from their sum alone.
    #[arg(long, conflicts_with = "vectors")]
    masked: Vec<String>,
    /// With --masked: a dropout share (from `secure share`) of a hospital that uploaded, about
    /// one that did not (repeatable).
    #[arg(long = "dropout-share", requires = "masked")]
    dropout_shares: Vec<PathBuf>,
    #[command(flatten)]
    flags: MergeFlags,
}

/// Runs the subcommand.
pub fn run(a: Args, dev: Device) -> anyhow::Result<()> {
    let vectors = named_vectors("vector", &a.vectors)?;
    let masked = named_vectors("masked", &a.masked)?;
    let opts = a.flags.options()?;
    let (base, out) = (&a.flags.base, &a.flags.out);
    if masked.is_empty() {
        merge_checked(base, &vectors, &opts, out, dev)?;
    } else {
        let shares = a
            .dropout_shares
            .iter()
            .map(|p| -> anyhow::Result<DropoutShare> {
                serde_json::from_slice(&std::fs::read(p).with_context(|| format!("--dropout-share {}", p.display()))?).with_context(|| format!("--dropout-share {}: not a dropout share", p.display()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        secure_merge(base, &masked, &shares, &opts, out, dev)?;
    }
    say!("merged model written to {}", out.display());
    Ok(())
}
