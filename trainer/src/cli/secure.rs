//! A hospital's side of secure aggregation: its key, its masked vector, its dropout shares.

use std::path::PathBuf;

use medmerge_trainer::merge::ShardVector;
use medmerge_trainer::secure::merge::mask_vector;
use medmerge_trainer::secure::{DropoutShare, HospitalKey, Roster};

use crate::stdout::say;

/// The subcommand's actions.
#[derive(clap::Subcommand)]
pub enum Action {
    /// Write a new private key (readable by its owner only) and print the public key for the roster.
    Keygen {
        /// Where to write the private key; never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Mask this hospital's vector for the session's sum.
    Mask {
        #[command(flatten)]
        me: Identity,
        /// Base model the vector was computed from.
        #[arg(long)]
        base: PathBuf,
        /// The vector (plain, or released with noise or an encoding).
        #[arg(long)]
        vector: PathBuf,
        /// The masked vector to upload.
        #[arg(long)]
        out: PathBuf,
    },
    /// Reveal this hospital's pair seed with a hospital that dropped out, so the coordinator can
    /// take that pair's masks out of the sum.
    Share {
        #[command(flatten)]
        me: Identity,
        /// The hospital that did not upload.
        #[arg(long)]
        dropped: String,
        /// The share to upload (JSON).
        #[arg(long)]
        out: PathBuf,
    },
}

/// Who is masking, in which sum.
#[derive(clap::Args)]
pub struct Identity {
    /// This hospital's name in the roster.
    #[arg(long = "self")]
    me: String,
    /// This hospital's private key (from `keygen`).
    #[arg(long)]
    key: PathBuf,
    /// YAML or JSON map of every hospital's name to its public key.
    #[arg(long)]
    roster: PathBuf,
    /// The session every hospital of this sum uses (e.g. the MergeJob and run); never reuse one.
    #[arg(long)]
    session: String,
}

impl Identity {
    fn open(&self) -> anyhow::Result<(Roster, HospitalKey)> {
        Ok((Roster::load(&self.roster)?, HospitalKey::load(&self.key)?))
    }
}

/// Runs the subcommand.
pub fn run(action: Action) -> anyhow::Result<()> {
    match action {
        Action::Keygen { out } => {
            let key = HospitalKey::generate();
            key.save(&out)?;
            say!("private key written to {}; public key for the roster: {}", out.display(), key.public_hex());
        }
        Action::Mask { me, base, vector, out } => {
            let (roster, key) = me.open()?;
            mask_vector(&base, &ShardVector { shard: me.me.clone(), path: vector }, &roster, &me.me, &key, &me.session, &out)?;
            say!("masked vector of {} for session {:?} written to {}", me.me, me.session, out.display());
        }
        Action::Share { me, dropped, out } => {
            let (roster, key) = me.open()?;
            let share = DropoutShare::new(&roster, &me.me, &key, &dropped, &me.session)?;
            medmerge_trainer::st::write_atomic(&out, &serde_json::to_vec_pretty(&share)?)?;
            say!("dropout share of {} about {dropped} written to {}", me.me, out.display());
        }
    }
    Ok(())
}
