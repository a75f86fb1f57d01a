//! The `MergeJob` API: spec and status types, pure validation, the stage plan and the artifact
//! layout. Nothing in this crate does I/O, so the local pipeline, the trainer subcommands and the
//! Kubernetes operator all share one definition of what a MergeJob means.

pub mod command;
pub mod layout;
pub mod limits;
pub mod placement;
pub mod plan;
pub mod results;
pub mod run;
pub mod spec;
pub mod status;
pub mod validate;

pub use layout::{mergejob_root, ArtifactLayout};
pub use plan::{Candidate, CandidateKind, Stage, StagePlan};
pub use run::{run_key, RunDecision};
pub use spec::*;
pub use status::{CandidateSummary, Condition, MergeJobStatus, Phase, ResultsStatus, ShardState, ShardStatus, StageOutcome, StageRecord};
pub use validate::{is_dns_subdomain, validate, validate_for_cluster, validate_for_local, validate_merge, validate_model, validate_release, validate_training, SpecError};
