//! medmerge's artifacts and its merge, in plain Rust with no libtorch: safetensors files
//! ([`st`]), what they say about themselves ([`checkpoint`]), how a hospital's data vector is
//! released ([`release`]) and masked ([`secure`]), and the streaming merge ([`merge`]).
//!
//! The trainer builds on these for every stage that needs libtorch; the `medmerge-merge`
//! binary merges with them alone, so it starts without loading libtorch.

pub mod checkpoint;
pub mod cli;
pub mod merge;
pub mod release;
pub mod secure;
pub mod st;
