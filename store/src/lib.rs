//! The artifact store every stage reads from and writes to: a local directory (the embedded
//! default for one-machine runs) or an S3-compatible bucket (clusters, hospitals uploading
//! from their own premises).
//!
//! Guarantees, for both backends:
//! - **Atomic publishing**: an object appears whole or not at all (local: write to a temporary
//!   name, then rename; S3: a single PUT or a completed multipart upload is atomic, an aborted
//!   one leaves nothing).
//! - **Verified content** (S3): every object carries its SHA-256 in metadata; downloads are
//!   checked against it, and a mismatch is refused naming the bucket and key.
//! - **No silent replacement**: [`Store::publish`] never replaces an artifact with different
//!   content (local: a hard link, which fails when the name exists; S3: a conditional PUT,
//!   `If-None-Match: *`, after a HEAD); publishing identical bytes again is a no-op, so a retried
//!   stage that reproduces its result succeeds and one that does not is refused, naming both
//!   digests. [`Store::put`] (a hospital re-uploading a fixed vector) still replaces.
//! - **Contained keys**: a key with an empty, `.` or `..` segment, a leading `/` or a backslash
//!   is refused before any I/O, so no key reaches outside the store's root or prefix.
//! - **Clear failures**: transient errors are retried with backoff by the SDK; what is left
//!   names the bucket, key and cause.

mod lease;
mod local;
mod s3;
pub mod scratch;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use lease::{LeaseRecord, LEASE_RENEW_EVERY, LEASE_TTL};
pub use s3::{S3Config, MULTIPART_THRESHOLD, PART_SIZE};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist.
    #[error("{location}: no such object")]
    NotFound {
        /// `s3://bucket/key` or the local path.
        location: String,
    },
    /// The object's content does not match the SHA-256 recorded when it was written.
    #[error("{location}: content does not match its recorded SHA-256 (expected {expected}, got {actual}); the object is corrupt and was not used")]
    DigestMismatch {
        /// `s3://bucket/key`.
        location: String,
        /// Recorded digest.
        expected: String,
        /// Digest of what was downloaded.
        actual: String,
    },
    /// A different artifact is already published under this key; nothing was replaced.
    #[error("{location} is already published with different content (published SHA-256 {published}, this one {new}); it was not replaced: another runner produced it, or an earlier attempt of this stage did. Delete it to publish again")]
    AlreadyPublished {
        /// `s3://bucket/key` or the local path.
        location: String,
        /// Digest of what is there.
        published: String,
        /// Digest of what was refused.
        new: String,
    },
    /// The key would leave the store (or is not a key at all).
    #[error("store key {key:?}: {reason}")]
    InvalidKey {
        /// The key as given.
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The S3 server refused or could not be reached (after retries).
    #[error("{location}: {operation} failed: {cause}")]
    S3 {
        /// `s3://bucket/key` (or `s3://bucket/prefix` for listings).
        location: String,
        /// What was being done (put, get, list, ...).
        operation: &'static str,
        /// The SDK's error with its context.
        cause: String,
    },
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
}

/// Shorthand for store results.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Refuses keys that could reach outside the store: empty keys or segments, `.` and `..`
/// segments, a leading `/` (absolute paths) and backslashes (Windows separators).
pub fn check_key(key: &str) -> Result<()> {
    let reason = if key.is_empty() {
        "is empty"
    } else if key.starts_with('/') {
        "must be relative (it starts with '/')"
    } else if key.contains('\\') {
        "must use '/' as separator (it contains a backslash)"
    } else if key.contains('\0') {
        "contains a NUL byte"
    } else if key.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
        "must not contain empty, '.' or '..' segments"
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidKey { key: key.into(), reason })
}

/// Publishing found `published` under `location`: identical content is fine (returns `new`),
/// different content is refused.
pub(crate) fn same_or_refused(location: String, published: String, new: String) -> Result<String> {
    if published == new {
        Ok(new)
    } else {
        Err(StoreError::AlreadyPublished { location, published, new })
    }
}

/// Like [`check_key`], but `""` (the whole store) and a trailing `/` are allowed: prefixes for
/// listing and removal.
fn check_prefix(prefix: &str) -> Result<()> {
    match prefix.trim_end_matches('/') {
        "" => Ok(()),
        p => check_key(p),
    }
}

/// An artifact store (cheap to clone).
#[derive(Clone, Debug)]
pub enum Store {
    /// Keys are paths under `root`.
    Local(local::LocalStore),
    /// Keys are object keys in a bucket.
    S3(s3::S3Store),
}

impl Store {
    /// A store in the local directory `root`.
    pub fn local(root: impl Into<PathBuf>) -> Store {
        Store::Local(local::LocalStore { root: root.into() })
    }

    /// A store in an S3 bucket.
    pub async fn s3(config: S3Config) -> Store {
        Store::S3(s3::S3Store::connect(config).await)
    }

    /// Creates the bucket if it does not exist (nothing to do for a local store).
    pub async fn create_bucket(&self) -> Result<()> {
        match self {
            Store::Local(s) => tokio::fs::create_dir_all(&s.root).await.map_err(|source| StoreError::Io { path: s.root.clone(), source }),
            Store::S3(s) => s.create_bucket().await,
        }
    }

    /// Where `key` lives, for messages: a local path or `s3://bucket/key`.
    pub fn location(&self, key: &str) -> String {
        match self {
            Store::Local(s) => s.path(key).display().to_string(),
            Store::S3(s) => s.location(key),
        }
    }

    /// Writes `bytes` at `key` atomically, replacing what is there; returns their SHA-256. For
    /// uploads a person may correct (a hospital's vector); stages use [`Store::publish`].
    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<String> {
        check_key(key)?;
        match self {
            Store::Local(s) => s.put(key, &bytes).await,
            Store::S3(s) => s.put(key, bytes).await,
        }
    }

    /// Writes the file at `path` as `key` (replacing, like [`Store::put`]).
    pub async fn put_file(&self, key: &str, path: &Path) -> Result<String> {
        let bytes = tokio::fs::read(path).await.map_err(|source| StoreError::Io { path: path.into(), source })?;
        self.put(key, bytes).await
    }

    /// Publishes `bytes` at `key` atomically unless something is there already: identical bytes
    /// are a no-op, different ones are refused with [`StoreError::AlreadyPublished`]. Returns the
    /// SHA-256.
    pub async fn publish(&self, key: &str, bytes: Vec<u8>) -> Result<String> {
        check_key(key)?;
        match self {
            Store::Local(s) => s.publish(key, &bytes).await,
            Store::S3(s) => s.publish(key, bytes).await,
        }
    }

    /// Publishes the file at `path` as `key`, like [`Store::publish`]. A local store links the
    /// file into place (no copy) when it lies on the same filesystem.
    pub async fn publish_file(&self, key: &str, path: &Path) -> Result<String> {
        check_key(key)?;
        if let Store::Local(s) = self {
            if let Some(digest) = s.publish_link(key, path).await? {
                return Ok(digest);
            }
        }
        let bytes = tokio::fs::read(path).await.map_err(|source| StoreError::Io { path: path.into(), source })?;
        self.publish(key, bytes).await
    }

    /// The (verified) content of `key`, or `None` when it does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        check_key(key)?;
        match self {
            Store::Local(s) => s.get(key).await,
            Store::S3(s) => s.get(key).await,
        }
    }

    /// The SHA-256 of what is published at `key`, `None` when nothing is. S3 answers from the
    /// digest recorded in the object's metadata (a HEAD, no download).
    pub async fn digest(&self, key: &str) -> Result<Option<String>> {
        check_key(key)?;
        match self {
            Store::Local(s) => Ok(s.get(key).await?.map(|b| sha256_hex(&b))),
            Store::S3(s) => s.published_digest(key).await,
        }
    }

    /// Downloads `key` to `path` (atomically: a failed download leaves no file there).
    pub async fn get_file(&self, key: &str, path: &Path) -> Result<()> {
        let bytes = self.get(key).await?.ok_or_else(|| StoreError::NotFound { location: self.location(key) })?;
        local::write_atomic(path, &bytes).await
    }

    /// Whether `key` exists.
    pub async fn exists(&self, key: &str) -> Result<bool> {
        check_key(key)?;
        match self {
            Store::Local(s) => Ok(s.path(key).is_file()),
            Store::S3(s) => s.exists(key).await,
        }
    }

    /// Every key under `prefix` (a directory-like key; `""` for all), sorted.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        check_prefix(prefix)?;
        match self {
            Store::Local(s) => s.list(prefix).await,
            Store::S3(s) => s.list(prefix).await,
        }
    }

    /// Deletes `key` (nothing to do when it does not exist).
    pub async fn remove(&self, key: &str) -> Result<()> {
        check_key(key)?;
        match self {
            Store::Local(s) => s.remove(key).await,
            Store::S3(s) => s.remove(key).await,
        }
    }

    /// Deletes every object under `prefix`.
    pub async fn remove_prefix(&self, prefix: &str) -> Result<()> {
        check_prefix(prefix)?;
        match self {
            Store::Local(s) => s.remove_prefix(prefix).await,
            Store::S3(s) => s.remove_prefix(prefix).await,
        }
    }
}

/// A [`Store`] for synchronous code (the trainer): each call runs on a private runtime.
pub struct BlockingStore {
    runtime: tokio::runtime::Runtime,
    store: Store,
}

impl BlockingStore {
    /// A blocking store over the local directory `root`.
    pub fn local(root: impl Into<PathBuf>) -> std::io::Result<BlockingStore> {
        BlockingStore::from_store(Store::local(root))
    }

    /// A blocking store over an S3 bucket.
    pub fn s3(config: S3Config) -> std::io::Result<BlockingStore> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let store = runtime.block_on(Store::s3(config));
        Ok(BlockingStore { runtime, store })
    }

    fn from_store(store: Store) -> std::io::Result<BlockingStore> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        Ok(BlockingStore { runtime, store })
    }

    /// The same store with its own runtime and connections, for another thread: sharing this
    /// one's S3 connections from another runtime would hang while this thread is not inside a
    /// store call.
    pub fn independent(&self) -> std::io::Result<BlockingStore> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let store = match &self.store {
            Store::Local(s) => Store::Local(s.clone()),
            Store::S3(s) => Store::S3(runtime.block_on(s.reconnect())),
        };
        Ok(BlockingStore { runtime, store })
    }

    /// The wrapped store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// See [`Store::create_bucket`].
    pub fn create_bucket(&self) -> Result<()> {
        self.runtime.block_on(self.store.create_bucket())
    }

    /// See [`Store::put_file`].
    pub fn put_file(&self, key: &str, path: &Path) -> Result<String> {
        self.runtime.block_on(self.store.put_file(key, path))
    }

    /// See [`Store::put`].
    pub fn put(&self, key: &str, bytes: Vec<u8>) -> Result<String> {
        self.runtime.block_on(self.store.put(key, bytes))
    }

    /// See [`Store::publish`].
    pub fn publish(&self, key: &str, bytes: Vec<u8>) -> Result<String> {
        self.runtime.block_on(self.store.publish(key, bytes))
    }

    /// See [`Store::publish_file`].
    pub fn publish_file(&self, key: &str, path: &Path) -> Result<String> {
        self.runtime.block_on(self.store.publish_file(key, path))
    }

    /// See [`Store::get`].
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.runtime.block_on(self.store.get(key))
    }

    /// See [`Store::digest`].
    pub fn digest(&self, key: &str) -> Result<Option<String>> {
        self.runtime.block_on(self.store.digest(key))
    }

    /// See [`Store::get_file`].
    pub fn get_file(&self, key: &str, path: &Path) -> Result<()> {
        self.runtime.block_on(self.store.get_file(key, path))
    }

    /// See [`Store::exists`].
    pub fn exists(&self, key: &str) -> Result<bool> {
        self.runtime.block_on(self.store.exists(key))
    }

    /// See [`Store::list`].
    pub fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.runtime.block_on(self.store.list(prefix))
    }

    /// See [`Store::try_lease`].
    pub fn try_lease(&self, key: &str, holder: &str, ttl: std::time::Duration) -> Result<Option<LeaseRecord>> {
        self.runtime.block_on(self.store.try_lease(key, holder, ttl))
    }

    /// See [`Store::renew_lease`].
    pub fn renew_lease(&self, key: &str, holder: &str, ttl: std::time::Duration) -> Result<bool> {
        self.runtime.block_on(self.store.renew_lease(key, holder, ttl))
    }

    /// See [`Store::release_lease`].
    pub fn release_lease(&self, key: &str, holder: &str) -> Result<()> {
        self.runtime.block_on(self.store.release_lease(key, holder))
    }

    /// See [`Store::location`].
    pub fn location(&self, key: &str) -> String {
        self.store.location(key)
    }
}
