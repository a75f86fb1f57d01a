//! A process's scratch files (temporary files of atomic writes, staging directories) carry
//! their maker in their name, `<host>~<pid>`, so that a later process can tell an abandoned
//! one (its maker was killed) from one still being written, and sweep it.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Scratch entries older than this are abandoned whoever made them (a maker on another host
/// cannot be asked whether it still runs).
pub const ABANDONED_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The marker between a temporary file's target name and its maker.
const TEMP_MARKER: &str = ".tmp~";

/// This machine's name (a pod's name in a cluster), without `~`.
pub fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).ok().filter(|h| !h.is_empty() && !h.contains('~')).unwrap_or_else(|| "host".into())
}

/// `<host>~<pid>` of this process: the maker part of its scratch names.
pub fn owner_tag() -> String {
    format!("{}~{}", host(), std::process::id())
}

/// Whether a scratch entry made by process `pid` on `owner_host`, last modified at
/// `modified`, is abandoned: its maker is a process of this host that no longer runs, or it is
/// older than [`ABANDONED_AFTER`]. This process's own entries are never abandoned.
pub fn abandoned(owner_host: &str, pid: Option<u32>, modified: Option<SystemTime>) -> bool {
    let dead = owner_host == host() && pid.is_some_and(|p| p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists());
    let old = modified.and_then(|t| SystemTime::now().duration_since(t).ok()).is_some_and(|age| age > ABANDONED_AFTER);
    dead || old
}

/// A temporary name beside `path` that no other process uses: `.<name>.tmp~<host>~<pid>~<n>`.
pub fn temp_name(path: &Path) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    path.with_file_name(format!(".{name}{TEMP_MARKER}{}~{n}", owner_tag()))
}

/// The maker (`host`, `pid`) of a temporary file named by [`temp_name`]; `None` for any other name.
fn temp_owner(file_name: &str) -> Option<(&str, Option<u32>)> {
    let rest = &file_name[file_name.rfind(TEMP_MARKER)? + TEMP_MARKER.len()..];
    let mut parts = rest.split('~');
    let owner_host = parts.next()?;
    let pid = parts.next().and_then(|p| p.parse().ok());
    file_name.starts_with('.').then_some((owner_host, pid))
}

/// Removes the abandoned temporary files under `dir` (recursively; symbolic links are not
/// followed) and returns how many. Best effort: what cannot be read or removed stays.
pub fn sweep_temporaries(dir: &Path) -> usize {
    let mut removed = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else { continue };
            let name = entry.file_name().to_string_lossy().into_owned();
            if kind.is_dir() {
                pending.push(entry.path());
            } else if let Some((owner_host, pid)) = temp_owner(&name) {
                if abandoned(owner_host, pid, entry.metadata().and_then(|m| m.modified()).ok()) && std::fs::remove_file(entry.path()).is_ok() {
                    tracing::info!(file = %entry.path().display(), "removed a killed process's temporary file");
                    removed += 1;
                }
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_killed_processes_temporaries_are_swept_and_live_or_foreign_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("run/shards/a");
        std::fs::create_dir_all(&nested).unwrap();
        // pid 4194304 is above Linux's pid_max, so it is never running.
        let dead = nested.join(format!(".vector.safetensors{TEMP_MARKER}{}~4194304~0", host()));
        let other_host = nested.join(format!(".vector.safetensors{TEMP_MARKER}another-pod~4194304~0"));
        let mine = temp_name(&nested.join("metrics.json"));
        let artifact = nested.join("vector.safetensors");
        for file in [&dead, &other_host, &mine, &artifact] {
            std::fs::write(file, b"x").unwrap();
        }
        assert_eq!(sweep_temporaries(dir.path()), 1);
        assert!(!dead.exists(), "a dead process's temporary goes");
        assert!(other_host.exists(), "another host's process may still be writing");
        assert!(mine.exists(), "this process's own temporary stays");
        assert!(artifact.exists(), "artifacts are never touched");
    }

    #[test]
    fn only_names_made_by_temp_name_are_temporaries() {
        assert_eq!(temp_owner(".model.safetensors.tmp~pod-1~42~3"), Some(("pod-1", Some(42))));
        assert_eq!(temp_owner("model.safetensors.tmp~pod-1~42~3"), None);
        assert_eq!(temp_owner(".hidden-but-mine"), None);
        let name = temp_name(Path::new("/x/y/model.safetensors"));
        let name = name.file_name().unwrap().to_string_lossy();
        assert_eq!(temp_owner(&name), Some((host().as_str(), Some(std::process::id()))));
    }
}
