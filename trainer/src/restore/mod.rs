//! Restoring a merged model with what hospitals compute on their own data: batch-norm moments,
//! per-class feature statistics for a closed-form head, or one epoch of training each.
//!
//! A restoration is a list of rounds ([`medmerge_crds::RestoreRound`]); in each, every shard turns
//! the round's input model into a part ([`rounds::shard_part`]) and the coordinator combines the
//! parts into the next model ([`rounds::combine`]). The pipeline runs parts as separate stages
//! (separate pods on a cluster); [`rounds::restore_in_process`] runs them one after another.

pub mod average;
pub mod head;
pub mod moments;
pub mod rounds;

pub use moments::{apply_moments, collect_moments, combine_moments, load_moments, mean_var, save_moments, LayerMoments};

use crate::data::DataError;
use crate::model::ModelError;
use crate::st::StError;

/// Errors during restoration.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Reading a shard's images failed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// Model I/O failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Stats file I/O failed.
    #[error(transparent)]
    St(#[from] StError),
    /// Stats from a shard do not fit the model.
    #[error("{path}: batch-norm statistics for layer {layer:?} are missing, of the wrong size, or not a positive count with finite sums")]
    Stats { path: String, layer: String },
    /// Per-class feature statistics do not fit the model or each other.
    #[error("{path}: head statistics do not fit: {reason}")]
    HeadStats { path: String, reason: String },
    /// The closed-form head cannot be fitted.
    #[error("closed-form head: {0}")]
    Head(String),
    /// A round that combines the shards' parts got none.
    #[error("restoration round {round}: no shard produced a part to combine")]
    NoParts { round: &'static str },
    /// A restoration epoch failed.
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    /// Metadata is wrong.
    #[error(transparent)]
    Meta(#[from] crate::checkpoint::MetaError),
    /// A libtorch operation failed.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}
