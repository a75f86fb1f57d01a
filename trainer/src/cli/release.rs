//! Releases an already written vector again: privacy noise and/or an encoding, before upload.

use std::path::PathBuf;

use medmerge_trainer::merge::{is_bn_statistic, release_vector, ShardVector};
use medmerge_trainer::release::describe_release;
use medmerge_trainer::release::encoding::VectorReader;
use medmerge_trainer::release::privacy::l2_norm;

use super::ReleaseArgs;
use crate::stdout::say;

/// The subcommand's flags.
#[derive(clap::Args)]
pub struct Args {
    /// Base model the vector was computed from.
    #[arg(long)]
    base: PathBuf,
    /// The vector as `finetune` wrote it.
    #[arg(long)]
    vector: PathBuf,
    /// The released vector (to upload).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    release: ReleaseArgs,
}

/// Runs the subcommand.
pub fn run(a: Args) -> anyhow::Result<()> {
    let spec = a.release.spec()?;
    let input = VectorReader::open(&a.vector)?;
    let shard = input.file().metadata().get("shard").cloned().unwrap_or_default();
    // The norm helps choose --clip-norm; it is printed here and written nowhere.
    let covered: Vec<Vec<f32>> = input.tensors().iter().filter(|t| !is_bn_statistic(&t.name)).map(|t| input.values(&t.name).map(|v| v.into_owned())).collect::<Result<_, _>>()?;
    let norm = l2_norm(&covered.iter().map(Vec::as_slice).collect::<Vec<_>>());
    let record = release_vector(&a.base, &ShardVector { shard: shard.clone(), path: a.vector.clone() }, &spec, &a.out)?;
    say!("vector of shard {shard} (L2 norm {norm:.4}, not recorded) released to {}: {}", a.out.display(), describe_release(&record));
    Ok(())
}
