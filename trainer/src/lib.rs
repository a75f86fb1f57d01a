//! medmerge's deep-learning core: models, data, training, merging, restoration, evaluation and
//! the in-process pipeline that runs a whole MergeJob on one machine.

pub mod checkpoint;
pub mod model;
pub mod st;
