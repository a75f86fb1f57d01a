//! `medmerge-trainer store`: list, upload and download artifacts in an S3 bucket (or a local
//! store directory) without other tools — how a hospital that trains on its own premises
//! uploads its vector, and how a user fetches the merged model.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use medmerge_store::{BlockingStore, S3Config};

use crate::stdout::say;

/// Where the store is.
#[derive(Args)]
pub struct StoreArgs {
    /// S3 bucket (or set MEDMERGE_S3_BUCKET); credentials come from the standard AWS chain.
    #[arg(long, env = "MEDMERGE_S3_BUCKET", conflicts_with = "local")]
    bucket: Option<String>,
    /// Endpoint URL of an S3-compatible server (MinIO, SeaweedFS, Ceph).
    #[arg(long, env = "MEDMERGE_S3_ENDPOINT")]
    endpoint: Option<String>,
    /// Region.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    region: String,
    /// Use virtual-hosted-style addressing (AWS S3) instead of path style.
    #[arg(long)]
    virtual_hosted: bool,
    /// A local store directory instead of a bucket.
    #[arg(long)]
    local: Option<PathBuf>,
    #[command(subcommand)]
    action: StoreAction,
}

#[derive(Subcommand)]
enum StoreAction {
    /// List keys under a prefix.
    Ls {
        /// Key prefix (e.g. runs/radiology/fundus/g1).
        #[arg(default_value = "")]
        prefix: String,
    },
    /// Upload a file as a key (atomically, with its SHA-256 recorded).
    Put {
        /// Local file.
        file: PathBuf,
        /// Destination key (e.g. incoming/partner-clinic.safetensors).
        key: String,
    },
    /// Download a key to a file (its SHA-256 verified).
    Get {
        /// Key to fetch.
        key: String,
        /// Local destination file.
        file: PathBuf,
    },
}

/// Runs a `store` command.
pub fn run(args: StoreArgs) -> anyhow::Result<()> {
    let store = match (&args.bucket, &args.local) {
        (_, Some(dir)) => BlockingStore::local(dir)?,
        (Some(bucket), None) => BlockingStore::s3(S3Config {
            bucket: bucket.clone(),
            endpoint: args.endpoint.clone(),
            region: args.region.clone(),
            path_style: !args.virtual_hosted,
            credentials: None,
            max_attempts: 5,
            attempt_timeout: None,
        })?,
        (None, None) => anyhow::bail!("store: give --bucket (or MEDMERGE_S3_BUCKET) or --local"),
    };
    match args.action {
        StoreAction::Ls { prefix } => {
            for key in store.list(&prefix)? {
                say!("{key}");
            }
        }
        StoreAction::Put { file, key } => {
            let digest = store.put_file(&key, &file)?;
            say!("{} sha256:{digest}", store.location(&key));
        }
        StoreAction::Get { key, file } => {
            store.get_file(&key, &file)?;
            say!("{}", file.display());
        }
    }
    Ok(())
}
