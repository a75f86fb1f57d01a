//! The local directory backend.

use std::path::{Path, PathBuf};

use crate::scratch::temp_name;
use crate::{same_or_refused, sha256_hex, Result, StoreError};

/// Keys are `/`-separated paths under `root`.
#[derive(Clone, Debug)]
pub struct LocalStore {
    /// The store's directory.
    pub root: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.into(), source }
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so
/// readers never see a partial file.
pub async fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(io(dir))?;
    }
    let tmp = temp_name(path);
    tokio::fs::write(&tmp, bytes).await.map_err(io(&tmp))?;
    tokio::fs::rename(&tmp, path).await.map_err(io(path))
}

impl LocalStore {
    /// The file holding `key`.
    pub fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    pub(crate) async fn put(&self, key: &str, bytes: &[u8]) -> Result<String> {
        write_atomic(&self.path(key), bytes).await?;
        Ok(sha256_hex(bytes))
    }

    /// No-replace publish: the bytes go to a temporary file that is then hard-linked to the
    /// key's name, which fails atomically when the name exists.
    pub(crate) async fn publish(&self, key: &str, bytes: &[u8]) -> Result<String> {
        let path = self.path(key);
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(io(dir))?;
        }
        let digest = sha256_hex(bytes);
        let tmp = temp_name(&path);
        tokio::fs::write(&tmp, bytes).await.map_err(io(&tmp))?;
        let linked = self.link_unless_present(&tmp, &path, digest.clone()).await;
        let _ = tokio::fs::remove_file(&tmp).await;
        match linked? {
            Some(digest) => Ok(digest),
            // No hard links on this filesystem: check, then rename (a narrow race remains).
            None => {
                if let Some(existing) = self.get(key).await? {
                    return same_or_refused(path.display().to_string(), sha256_hex(&existing), digest);
                }
                write_atomic(&path, bytes).await?;
                Ok(digest)
            }
        }
    }

    /// Links the file `src` to `key` unless something is there; `None` when the filesystem
    /// cannot link (another device, no hard links), so the caller copies instead.
    pub(crate) async fn publish_link(&self, key: &str, src: &Path) -> Result<Option<String>> {
        let path = self.path(key);
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(io(dir))?;
        }
        let digest = sha256_hex(&tokio::fs::read(src).await.map_err(io(src))?);
        self.link_unless_present(src, &path, digest).await
    }

    /// Hard-links `src` (whose SHA-256 is `digest`) to `path` unless something is there.
    async fn link_unless_present(&self, src: &Path, path: &Path, digest: String) -> Result<Option<String>> {
        match tokio::fs::hard_link(src, path).await {
            Ok(()) => Ok(Some(digest)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let existing = tokio::fs::read(path).await.map_err(io(path))?;
                same_or_refused(path.display().to_string(), sha256_hex(&existing), digest).map(Some)
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::CrossesDevices | std::io::ErrorKind::Unsupported) || e.raw_os_error() == Some(1) => Ok(None),
            Err(source) => Err(StoreError::Io { path: path.into(), source }),
        }
    }

    pub(crate) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(key);
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    pub(crate) async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let mut keys = Vec::new();
        let mut pending = vec![self.path(prefix)];
        while let Some(dir) = pending.pop() {
            let mut entries = match tokio::fs::read_dir(&dir).await {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(StoreError::Io { path: dir, source }),
            };
            while let Some(entry) = entries.next_entry().await.map_err(io(&dir))? {
                let path = entry.path();
                // Hidden names are a runner's own (temporary files, staging, locks), not keys.
                if entry.file_name().to_string_lossy().starts_with('.') {
                    continue;
                }
                if path.is_dir() {
                    pending.push(path);
                } else {
                    if let Ok(rel) = path.strip_prefix(&self.root) {
                        keys.push(rel.to_string_lossy().replace('\\', "/"));
                    }
                }
            }
        }
        keys.sort();
        Ok(keys)
    }

    pub(crate) async fn remove(&self, key: &str) -> Result<()> {
        let path = self.path(key);
        match tokio::fs::remove_file(&path).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::Io { path, source: e }),
            _ => Ok(()),
        }
    }

    pub(crate) async fn remove_prefix(&self, prefix: &str) -> Result<()> {
        let path = self.path(prefix);
        match tokio::fs::remove_dir_all(&path).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::Io { path, source: e }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{Store, StoreError};

    #[tokio::test]
    async fn a_local_store_round_trips_lists_and_removes_by_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::local(dir.path());
        let digest = store.put("runs/a/g1/base/model.safetensors", b"weights".to_vec()).await.unwrap();
        assert_eq!(digest, crate::sha256_hex(b"weights"));
        store.put("runs/a/g1/eval/metrics.json", b"{}".to_vec()).await.unwrap();
        store.put("runs/b/g1/eval/metrics.json", b"{}".to_vec()).await.unwrap();
        assert_eq!(store.list("runs/a").await.unwrap(), ["runs/a/g1/base/model.safetensors", "runs/a/g1/eval/metrics.json"]);
        assert_eq!(store.get("runs/a/g1/base/model.safetensors").await.unwrap().as_deref(), Some(&b"weights"[..]));
        assert!(store.exists("runs/b/g1/eval/metrics.json").await.unwrap());
        store.remove_prefix("runs/a").await.unwrap();
        assert!(store.list("runs/a").await.unwrap().is_empty());
        assert_eq!(store.list("").await.unwrap(), ["runs/b/g1/eval/metrics.json"]);
    }

    #[tokio::test]
    async fn publishing_never_replaces_different_content_and_identical_content_is_a_no_op() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::local(dir.path().join("store"));
        let key = "ns/job/g1/shards/a/vector.safetensors";
        store.publish(key, b"first".to_vec()).await.unwrap();
        assert_eq!(store.publish(key, b"first".to_vec()).await.unwrap(), crate::sha256_hex(b"first"));
        let err = store.publish(key, b"second".to_vec()).await.unwrap_err();
        assert!(matches!(err, StoreError::AlreadyPublished { .. }) && err.to_string().contains("shards/a/vector.safetensors"), "{err}");
        assert_eq!(store.get(key).await.unwrap().as_deref(), Some(&b"first"[..]));
        let file = dir.path().join("staged");
        std::fs::write(&file, b"other").unwrap();
        assert!(matches!(store.publish_file(key, &file).await, Err(StoreError::AlreadyPublished { .. })));
        assert_eq!(store.get(key).await.unwrap().as_deref(), Some(&b"first"[..]));
        // A hospital correcting its upload may replace it.
        store.put(key, b"fixed".to_vec()).await.unwrap();
        assert_eq!(store.get(key).await.unwrap().as_deref(), Some(&b"fixed"[..]));
        assert_eq!(store.list("").await.unwrap(), [key], "no temporary file is left behind");
    }

    #[tokio::test]
    async fn two_publishers_racing_for_one_key_leave_exactly_one_of_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::local(dir.path());
        let tasks: Vec<_> = (0..8u8)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move { store.publish("run/merged/model.safetensors", vec![i; 4096]).await })
            })
            .collect();
        let mut won = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => won += 1,
                Err(StoreError::AlreadyPublished { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(won, 1);
        let bytes = store.get("run/merged/model.safetensors").await.unwrap().unwrap();
        assert!(bytes.iter().all(|b| *b == bytes[0]), "the published file is one publisher's, whole");
    }

    #[tokio::test]
    async fn keys_that_would_leave_the_store_are_refused_before_any_io() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::local(dir.path().join("store"));
        for key in ["../escape", "a/../../escape", "/etc/passwd", "a//b", "./a", "a\\..\\b", ""] {
            let err = store.put(key, b"x".to_vec()).await.unwrap_err();
            assert!(matches!(err, StoreError::InvalidKey { .. }) && err.to_string().contains("store key"), "{key}: {err}");
            assert!(matches!(store.get(key).await, Err(StoreError::InvalidKey { .. })), "{key}");
            assert!(matches!(store.publish(key, vec![]).await, Err(StoreError::InvalidKey { .. })), "{key}");
        }
        assert!(matches!(store.remove_prefix("..").await, Err(StoreError::InvalidKey { .. })));
        assert!(matches!(store.list("a/../..").await, Err(StoreError::InvalidKey { .. })));
        assert!(!dir.path().join("escape").exists());
        store.list("").await.unwrap();
    }

    #[tokio::test]
    async fn a_missing_key_is_none_and_downloading_it_names_it_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::local(dir.path().join("store"));
        assert_eq!(store.get("nope").await.unwrap(), None);
        let target = dir.path().join("out/file");
        let err = store.get_file("nope", &target).await.unwrap_err();
        assert!(matches!(err, StoreError::NotFound { .. }) && err.to_string().contains("store/nope"), "{err}");
        assert!(!target.exists());
    }
}
