//! One restoration round: a shard's part and the coordinator's combination, shared by the
//! pipeline's stages and the `restore` subcommand.

use std::path::{Path, PathBuf};

use medmerge_crds::{RestoreRound, RestoreSpec, TrainingSpec};
use tch::Device;

use super::{average, head, moments, RestoreError};
use crate::checkpoint::{ArtifactKind, ArtifactMeta};
use crate::data::Dataset;
use crate::model::Network;
use crate::st::{write_atomic, MappedFile, StError};

/// How the training rounds train: the MergeJob's training settings for one epoch, without a
/// validation hold-out, at the restoration's learning rate.
pub fn epoch_settings(training: &TrainingSpec, restore: &RestoreSpec) -> TrainingSpec {
    TrainingSpec { epochs: 1, validation_fraction: 0.0, learning_rate: restore.learning_rate.unwrap_or(training.learning_rate), ..training.clone() }
}

fn model_meta(path: &Path) -> Result<ArtifactMeta, RestoreError> {
    Ok(ArtifactMeta::from_map(path, MappedFile::open(path)?.metadata(), ArtifactKind::Model)?)
}

/// Shard `shard`'s part of `round`, computed from the round's `input` model on its own `data`,
/// written to `out`.
pub fn shard_part(round: RestoreRound, input: &Path, data: &Dataset, shard: &str, training: &TrainingSpec, device: Device, out: &Path) -> Result<(), RestoreError> {
    let mut net = Network::load(input, device)?;
    let meta = ArtifactMeta { shard: Some(shard.into()), ..model_meta(input)? };
    let batch = training.batch_size as usize;
    match round {
        RestoreRound::Epoch(_) | RestoreRound::Chain(_) => {
            let report = crate::train::train(&mut net, data, training, device, &format!("restore on {shard}"))?;
            net.check_valid()?;
            net.save(out, &ArtifactMeta { class_counts: report.class_counts, ..meta })?;
        }
        RestoreRound::BnMoments => moments::save_moments(out, &moments::collect_moments(&net, data, batch, device)?, &meta)?,
        RestoreRound::HeadStatistics => head::save(out, &head::collect_class_features(&net, data, batch, device)?, &meta)?,
    }
    Ok(())
}

/// Combines the shards' `parts` of `round` (computed from `input`) into the round's model at
/// `out`, refusing a model that fails [`Network::check_valid`].
pub fn combine(round: RestoreRound, input: &Path, parts: &[PathBuf], device: Device, out: &Path) -> Result<(), RestoreError> {
    let meta = model_meta(input)?;
    let net = match round {
        RestoreRound::Chain(_) => {
            let last = parts.last().unwrap_or(&input.to_path_buf()).clone();
            Network::load(&last, device)?
        }
        RestoreRound::Epoch(_) => average::average_models(parts, device)?,
        RestoreRound::BnMoments => {
            let net = Network::load(input, device)?;
            let loaded = parts.iter().map(|p| moments::load_moments(p)).collect::<Result<Vec<_>, _>>()?;
            moments::apply_moments(&net, &moments::combine_moments(&loaded), &input.display().to_string())?;
            net
        }
        RestoreRound::HeadStatistics => {
            let net = Network::load(input, device)?;
            let loaded = parts.iter().map(|p| head::load(p)).collect::<Result<Vec<_>, _>>()?;
            let (w, b, present) = head::fit_lda(&head::combine(loaded)?, head::SHRINKAGE)?;
            head::apply_head(&net, &w, &b, &present)?;
            net
        }
    };
    net.check_valid()?;
    net.save(out, &meta)?;
    Ok(())
}

/// Runs every round of `restore` on `input` over `shards` (name, images) one after another in this
/// process, keeping the parts in `work`; writes the restored model to `out`.
pub fn restore_in_process(restore: &RestoreSpec, input: &Path, shards: &[(String, Dataset)], training: &TrainingSpec, device: Device, work: &Path, out: &Path) -> Result<(), RestoreError> {
    std::fs::create_dir_all(work).map_err(|source| StError::Write { path: work.into(), source })?;
    let mut current = input.to_path_buf();
    let rounds = {
        let net = Network::load(input, device)?;
        let rounds = restore.rounds(net.multi_label);
        if rounds.is_empty() {
            // Published as it is: checked here, as every round's output is.
            net.check_valid()?;
        }
        rounds
    };
    for round in rounds {
        let mut parts = Vec::new();
        for (name, data) in shards {
            let from = if matches!(round, RestoreRound::Chain(_)) { parts.last().unwrap_or(&current).clone() } else { current.clone() };
            let part = work.join(format!("{}-{name}.safetensors", round.name()));
            shard_part(round, &from, data, name, training, device, &part)?;
            parts.push(part);
        }
        let next = work.join(format!("{}.safetensors", round.name()));
        combine(round, &current, &parts, device, &next)?;
        current = next;
    }
    let bytes = std::fs::read(&current).map_err(|source| StError::Open { path: current.clone(), source })?;
    write_atomic(out, &bytes).map_err(|source| StError::Write { path: out.into(), source })?;
    Ok(())
}
