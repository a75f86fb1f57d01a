//! medmerge's deep-learning core: models, data, training, merging, restoration, evaluation and
//! the in-process pipeline that runs a whole MergeJob on one machine.

pub use medmerge_merge::{checkpoint, release, st};
pub mod allocator;
pub mod clinical;
pub mod data;
pub mod evaluate;
pub mod explain;
pub mod export;
pub mod html;
pub mod merge;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod plots;
pub mod publish;
pub mod remote_data;
pub mod report;
pub mod restore;
pub mod secure;
pub mod serve;
pub mod split;
pub mod synth;
pub mod table;
pub mod train;
