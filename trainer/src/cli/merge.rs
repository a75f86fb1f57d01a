//! Merges data vectors onto the base.

use std::path::PathBuf;

use anyhow::Context;
use medmerge_crds::{validate_merge, HeadStrategy, MergeMethod, MergeSpec};
use medmerge_trainer::merge::{merge_checked, MergeOptions, ShardVector};
use medmerge_trainer::secure::merge::secure_merge;
use medmerge_trainer::secure::DropoutShare;
use tch::Device;

use super::check_flags;
use crate::stdout::say;

/// The subcommand's flags.
#[derive(clap::Args)]
pub struct Args {
    /// Base model.
    #[arg(long)]
    base: PathBuf,
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
    /// data-vector, params-mean, random-vector, ties, dare.
    #[arg(long, default_value = "data-vector")]
    method: String,
    /// Scale of the summed vectors (default: `spec.merge.lambda`'s).
    #[arg(long, default_value_t = MergeSpec::default().lambda)]
    lambda: f64,
    /// Weight heads by shard sample counts instead of a plain mean.
    #[arg(long)]
    sample_weighted_heads: bool,
    /// TIES density.
    #[arg(long, default_value_t = 0.2)]
    ties_density: f64,
    /// DARE drop rate.
    #[arg(long, default_value_t = 0.9)]
    dare_drop_rate: f64,
    /// Keep pretrained layers unchanged (average heads only): the restoration-alone control.
    #[arg(long)]
    pretrained_only: bool,
    /// Seed.
    #[arg(long, default_value_t = 3315)]
    seed: u64,
    /// Output model.
    #[arg(long)]
    out: PathBuf,
}

/// Runs the subcommand.
pub fn run(a: Args, dev: Device) -> anyhow::Result<()> {
    let named = |flag: &str, values: &[String]| {
        values
            .iter()
            .map(|v| v.split_once('=').map(|(s, p)| ShardVector { shard: s.into(), path: p.into() }).with_context(|| format!("--{flag} {v}: expected NAME=PATH")))
            .collect::<anyhow::Result<Vec<_>>>()
    };
    let vectors = named("vector", &a.vectors)?;
    let masked = named("masked", &a.masked)?;
    let method = MergeMethod::parse(&a.method).with_context(|| format!("--method {}: unknown merge method", a.method))?;
    let bounds = MergeSpec { lambda: a.lambda, ties_density: a.ties_density, dare_drop_rate: a.dare_drop_rate, ..MergeSpec::default() };
    check_flags(validate_merge(&bounds), &[("merge.lambda", "--lambda"), ("merge.tiesDensity", "--ties-density"), ("merge.dareDropRate", "--dare-drop-rate")])?;
    let opts = MergeOptions {
        method,
        lambda: a.lambda,
        heads: if a.sample_weighted_heads { HeadStrategy::SampleWeighted } else { HeadStrategy::Mean },
        ties_density: a.ties_density,
        dare_drop_rate: a.dare_drop_rate,
        seed: a.seed,
        pretrained_only: a.pretrained_only,
    };
    if masked.is_empty() {
        merge_checked(&a.base, &vectors, &opts, &a.out, dev)?;
    } else {
        let shares = a
            .dropout_shares
            .iter()
            .map(|p| -> anyhow::Result<DropoutShare> {
                serde_json::from_slice(&std::fs::read(p).with_context(|| format!("--dropout-share {}", p.display()))?).with_context(|| format!("--dropout-share {}: not a dropout share", p.display()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        secure_merge(&a.base, &masked, &shares, &opts, &a.out, dev)?;
    }
    say!("merged model written to {}", a.out.display());
    Ok(())
}
