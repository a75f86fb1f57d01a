//! Shard and evaluation images that live in S3 (`data.path: s3://bucket/prefix`): downloaded
//! once into a local cache (every object SHA-256 checked when it carries a digest), then read
//! like any local ImageFolder (`s3://bucket/prefix/`) or manifest (`s3://bucket/prefix/x.csv`,
//! with paths relative to the manifest).
//!
//! A shard's images are read with that shard's own credentials: the files `AWS_ACCESS_KEY_ID`
//! and `AWS_SECRET_ACCESS_KEY` in `$MEDMERGE_SHARD_CREDENTIALS_DIR` (where the operator mounts the
//! shard's Secret), falling back to the standard AWS chain.

use std::path::{Path, PathBuf};

use medmerge_crds::MergeJobSpec;
use medmerge_store::{BlockingStore, S3Config};

/// `(bucket, key)` of an `s3://bucket/key` URL; `None` for anything else.
pub fn parse_s3_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("s3://")?;
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    (!bucket.is_empty()).then_some((bucket, key))
}

/// The shard credentials mounted for this pod, if any.
pub fn shard_credentials() -> anyhow::Result<Option<(String, String)>> {
    let Some(dir) = std::env::var_os("MEDMERGE_SHARD_CREDENTIALS_DIR").map(PathBuf::from) else { return Ok(None) };
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).map(|s| s.trim().to_string());
    match (read("AWS_ACCESS_KEY_ID"), read("AWS_SECRET_ACCESS_KEY")) {
        (Ok(id), Ok(secret)) => Ok(Some((id, secret))),
        (Err(e), _) | (_, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        (Err(e), _) | (_, Err(e)) => Err(anyhow::anyhow!("shard credentials in {}: {e}", dir.display())),
    }
}

/// Downloads what `url` names into `cache` and returns the local path to open: the manifest
/// file for a `.csv` key (with everything beside it), otherwise the ImageFolder directory.
/// Objects already in the cache are not downloaded again.
pub fn materialise(url: &str, spec: &MergeJobSpec, credentials: Option<(String, String)>, cache: &Path) -> anyhow::Result<PathBuf> {
    let (bucket, key) = parse_s3_url(url).ok_or_else(|| anyhow::anyhow!("{url}: not an s3://bucket/key URL"))?;
    let prefix = if key.ends_with(".csv") { key.rsplit_once('/').map_or("", |(dir, _)| dir) } else { key.trim_end_matches('/') };
    // Images usually sit in the same S3 service as the artifacts: reuse its endpoint.
    let mut config = match &spec.storage.s3 {
        Some(s3) => S3Config::from_spec(s3),
        None => S3Config { region: "us-east-1".into(), path_style: false, max_attempts: 5, ..S3Config::default() },
    };
    config.bucket = bucket.to_string();
    config.credentials = credentials;
    let store = BlockingStore::s3(config)?;
    let keys = store.list(prefix)?;
    if keys.is_empty() {
        anyhow::bail!("{url}: no objects under s3://{bucket}/{prefix}");
    }
    let root = cache.join(bucket);
    for k in &keys {
        let local = root.join(k);
        if !local.exists() {
            store.get_file(k, &local)?;
        }
    }
    Ok(root.join(key.trim_end_matches('/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls_split_into_bucket_and_key() {
        assert_eq!(parse_s3_url("s3://scans/hospital-a/"), Some(("scans", "hospital-a/")));
        assert_eq!(parse_s3_url("s3://scans"), Some(("scans", "")));
        assert_eq!(parse_s3_url("data/a.csv"), None);
        assert_eq!(parse_s3_url("s3:///x"), None);
    }
}
