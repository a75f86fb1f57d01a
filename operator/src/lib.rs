//! The medmerge operator's pure core: what to do next for a MergeJob (`decide`) and the Jobs
//! that do it (`jobs`). The controller loop that observes the cluster and applies these
//! decisions is built on top of these and is still to come.

pub mod decide;
pub mod jobs;
pub mod names;
