//! The local directory backend.

use std::path::{Path, PathBuf};

use crate::{sha256_hex, Result, StoreError};

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
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
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
                let hidden = entry.file_name().to_string_lossy().starts_with('.');
                if path.is_dir() {
                    pending.push(path);
                } else if !hidden {
                    if let Ok(rel) = path.strip_prefix(&self.root) {
                        keys.push(rel.to_string_lossy().replace('\\', "/"));
                    }
                }
            }
        }
        keys.sort();
        Ok(keys)
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
