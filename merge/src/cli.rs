//! The merge's command line, shared by `medmerge-merge` and `medmerge-trainer merge`.

use std::path::PathBuf;

use anyhow::Context;
use medmerge_crds::{validate_merge, HeadStrategy, MergeMethod, MergeSpec, SpecError};

use crate::merge::{MergeOptions, ShardVector};

/// The base, the method and its settings, and the output: every merge flag but the vectors.
#[derive(clap::Args)]
pub struct MergeFlags {
    /// Base model.
    #[arg(long)]
    pub base: PathBuf,
    /// data-vector, params-mean, random-vector, ties, dare.
    #[arg(long, default_value = "data-vector")]
    pub method: String,
    /// Scale of the summed vectors (default: `spec.merge.lambda`'s).
    #[arg(long, default_value_t = MergeSpec::default().lambda)]
    pub lambda: f64,
    /// Weight heads by shard sample counts instead of a plain mean.
    #[arg(long)]
    pub sample_weighted_heads: bool,
    /// TIES density.
    #[arg(long, default_value_t = 0.2)]
    pub ties_density: f64,
    /// DARE drop rate.
    #[arg(long, default_value_t = 0.9)]
    pub dare_drop_rate: f64,
    /// Keep pretrained layers unchanged (average heads only): the restoration-alone control.
    #[arg(long)]
    pub pretrained_only: bool,
    /// Seed.
    #[arg(long, default_value_t = 3315)]
    pub seed: u64,
    /// Output model.
    #[arg(long)]
    pub out: PathBuf,
}

impl MergeFlags {
    /// The merge's options, refused naming the flag where a MergeJob's spec would refuse them.
    pub fn options(&self) -> anyhow::Result<MergeOptions> {
        let method = MergeMethod::parse(&self.method).with_context(|| format!("--method {}: unknown merge method", self.method))?;
        let bounds = MergeSpec { lambda: self.lambda, ties_density: self.ties_density, dare_drop_rate: self.dare_drop_rate, ..MergeSpec::default() };
        check_flags(validate_merge(&bounds), &[("merge.lambda", "--lambda"), ("merge.tiesDensity", "--ties-density"), ("merge.dareDropRate", "--dare-drop-rate")])?;
        Ok(MergeOptions {
            method,
            lambda: self.lambda,
            heads: if self.sample_weighted_heads { HeadStrategy::SampleWeighted } else { HeadStrategy::Mean },
            ties_density: self.ties_density,
            dare_drop_rate: self.dare_drop_rate,
            seed: self.seed,
            pretrained_only: self.pretrained_only,
        })
    }
}

/// `NAME=PATH` values of `--flag` as shard vectors, refusing one without `=` by its flag.
pub fn named_vectors(flag: &str, values: &[String]) -> anyhow::Result<Vec<ShardVector>> {
    values.iter().map(|v| v.split_once('=').map(|(s, p)| ShardVector { shard: s.into(), path: p.into() }).with_context(|| format!("--{flag} {v}: expected NAME=PATH"))).collect()
}

/// Refuses flag values the spec would refuse, naming the flag (and the spec field with the same
/// rule): one set of bounds for the CLI and MergeJobs.
pub fn check_flags(errors: Vec<SpecError>, flags: &[(&str, &str)]) -> anyhow::Result<()> {
    let Some(first) = errors.first() else { return Ok(()) };
    let names = |field: &str| first.field == field || first.field.starts_with(&format!("{field}["));
    let flag = flags.iter().find(|(field, _)| names(field)).map_or("", |(_, flag)| flag);
    anyhow::bail!("{flag}: {} (the same rule as spec.{})", first.message, first.field)
}
