//! Restores a merged model: batch-norm statistics, a closed-form head, or training passes over the shards.

use std::path::PathBuf;

use anyhow::Context;
use medmerge_crds::{limits, RestoreMode, RestoreSpec, TrainingSpec};
use medmerge_trainer::data::Dataset;
use medmerge_trainer::model::Network;
use medmerge_trainer::restore::rounds::restore_in_process;
use medmerge_trainer::restore::{apply_moments, combine_moments, load_moments};
use tch::Device;

use super::{model_meta, TrainingArgs};
use crate::stdout::say;

/// The subcommand's flags.
#[derive(clap::Args)]
pub struct Args {
    /// Merged model.
    #[arg(long)]
    model: PathBuf,
    /// bn-recalibrate, closed-form-head, averaged-epoch, averaged-epoch-head, finetune-epoch, none.
    #[arg(long, default_value = "bn-recalibrate")]
    mode: String,
    /// Shard images, in order (repeatable).
    #[arg(long = "data")]
    data: Vec<PathBuf>,
    /// Pre-computed moments from `bn-stats` (repeatable; bn-recalibrate only, instead of --data).
    #[arg(long = "stats")]
    stats: Vec<PathBuf>,
    /// Output model.
    #[arg(long)]
    out: PathBuf,
    /// Training rounds of the modes that train (restore.epochs): averaged epochs or passes
    /// along the chain.
    #[arg(long, default_value_t = RestoreSpec::default().epochs)]
    restore_epochs: u32,
    /// Training settings of the modes that train (one epoch per shard and round; --epochs is
    /// ignored).
    #[command(flatten)]
    training: TrainingArgs,
}

/// Runs the subcommand.
pub fn run(a: Args, dev: Device) -> anyhow::Result<()> {
    let modes: Vec<&str> = RestoreMode::ALL.iter().map(|m| m.as_str()).collect();
    let mode = RestoreMode::parse(&a.mode).with_context(|| format!("--mode {}: expected one of {}", a.mode, modes.join(", ")))?;
    if let Some(e) = limits::RESTORE_EPOCHS.check(a.restore_epochs) {
        anyhow::bail!("--restore-epochs: {e}");
    }
    if !a.stats.is_empty() {
        anyhow::ensure!(mode == RestoreMode::BnRecalibrate && a.data.is_empty(), "--stats goes with --mode bn-recalibrate and no --data");
        let net = Network::load(&a.model, dev)?;
        let parts = a.stats.iter().map(|s| load_moments(s)).collect::<Result<Vec<_>, _>>()?;
        apply_moments(&net, &combine_moments(&parts), &a.model.display().to_string())?;
        net.check_valid().with_context(|| format!("restored {}", a.out.display()))?;
        net.save(&a.out, &model_meta(&a.model)?)?;
    } else {
        anyhow::ensure!(mode == RestoreMode::None || !a.data.is_empty(), "--mode {}: needs --data (one per shard)", a.mode);
        let classes = Network::load(&a.model, dev)?.classes;
        let shards = a.data.iter().enumerate().map(|(i, d)| Ok((format!("shard-{}", i + 1), Dataset::open(d, Some(&classes))?))).collect::<anyhow::Result<Vec<_>>>()?;
        let mut work = a.out.as_os_str().to_owned();
        work.push(".parts");
        let work = PathBuf::from(work);
        let training = TrainingSpec { epochs: 1, validation_fraction: 0.0, ..a.training.spec()? };
        let restore = RestoreSpec { mode, epochs: a.restore_epochs, ..RestoreSpec::default() };
        let result = restore_in_process(&restore, &a.model, &shards, &training, dev, &work, &a.out);
        let _ = std::fs::remove_dir_all(&work);
        result.with_context(|| format!("restoring {} ({})", a.model.display(), mode.as_str()))?;
    }
    say!("restored model written to {}", a.out.display());
    Ok(())
}
