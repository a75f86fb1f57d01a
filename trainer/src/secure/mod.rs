//! Secure aggregation ([`medmerge_merge::secure`]: keys, rosters, masks and dropout shares),
//! and the masking and merge of vectors that need the trainer ([`merge`]).

pub use medmerge_merge::secure::*;

pub mod merge;
