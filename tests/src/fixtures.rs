//! What every real-server suite needs: the repository, the built trainer, the S3 server that
//! scripts/with-s3.sh starts, and environment set by the scripts (a clear panic naming the
//! script when it is missing).

use std::path::PathBuf;

use medmerge_store::S3Config;

/// The repository root.
pub fn repo() -> PathBuf {
    // `cargo test` sets the variable when it runs a test too. That value wins over the one baked in
    // at build time: the build cache is shared between checkouts (~/.cache/medmerge/target), and
    // a binary built in one checkout and still fresh for another would read the first one's files.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest_dir.parent().expect("tests/ sits in the repository").to_path_buf()
}

/// The variable `name` that `script` sets; panics naming both when it is not set.
pub fn script_env(name: &str, script: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run these tests through {script}"))
}

/// The debug `medmerge-trainer` binary of this workspace. Built by `cargo build --workspace
/// --bins`, which every script runs before these suites (a test crate cannot ask cargo for
/// another package's binary).
pub fn trainer() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("target"));
    let bin = target.join("debug/medmerge-trainer");
    assert!(bin.is_file(), "{} is missing: run `cargo build --workspace --bins` first", bin.display());
    bin
}

/// The S3 server's endpoint (scripts/with-s3.sh).
pub fn s3_endpoint() -> String {
    script_env("MEDMERGE_S3_ENDPOINT", "scripts/with-s3.sh")
}

/// A client configuration for `bucket` on the test S3 server, with the credentials of the
/// environment (the server's admin unless a test overrides them), path-style addressing and
/// three attempts per request.
pub fn s3_config(bucket: &str) -> S3Config {
    S3Config { bucket: bucket.into(), endpoint: Some(s3_endpoint()), region: "us-east-1".into(), path_style: true, credentials: None, max_attempts: 3, attempt_timeout: None }
}
