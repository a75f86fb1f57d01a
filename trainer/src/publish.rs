//! How a pipeline stage's results reach the store without ever mixing two runs: each attempt
//! writes into a private staging directory, then publishes every file with the store's
//! no-replace publish (a different artifact already there is refused, identical bytes are a
//! no-op), the declared outputs last so the plan sees a stage done only when all of it is.
//! A provenance record (`ArtifactLayout::provenance`) names the SHA-256 of every input the stage
//! read and every output it published; evaluation checks the whole run against them.
//!
//! A per-stage lock file keeps two runners on one machine (or one shared volume) from doing the
//! same work twice, and with S3 a per-stage lease in the bucket does the same for runners on
//! different machines; stale staging directories of killed attempts are swept at the start of a
//! stage.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use medmerge_crds::ArtifactLayout;
use medmerge_store::scratch::{abandoned, owner_tag};
use medmerge_store::{BlockingStore, LEASE_RENEW_EVERY, LEASE_TTL};
use serde::{Deserialize, Serialize};

/// What one stage read and wrote, by SHA-256.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// Stage name, e.g. `merge-merged`.
    pub stage: String,
    /// Input key -> SHA-256 of the bytes the stage read.
    pub inputs: BTreeMap<String, String>,
    /// Output key -> SHA-256 of the bytes it published.
    pub outputs: BTreeMap<String, String>,
}

/// A private directory one stage attempt writes its outputs into, removed when dropped.
pub struct Staging {
    dir: PathBuf,
}

impl Staging {
    /// A fresh staging directory under `<root>/.staging` (same filesystem as a local store, so
    /// publishing links instead of copying), after sweeping the ones killed attempts left.
    pub fn new(root: &Path, stage: &str) -> anyhow::Result<Staging> {
        let parent = root.join(".staging");
        sweep_stale(&parent);
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = parent.join(format!("{}~{stage}~{n}", owner_tag()));
        std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
        Ok(Staging { dir })
    }

    /// Where the stage writes `key`.
    pub fn path(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// Every file the stage wrote, as keys (temporary files of the stage's own atomic writes
    /// excluded).
    pub fn keys(&self) -> anyhow::Result<Vec<String>> {
        let mut keys = Vec::new();
        let mut pending = vec![self.dir.clone()];
        while let Some(dir) = pending.pop() {
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                let path = entry.path();
                if entry.file_type()?.is_dir() {
                    pending.push(path);
                } else if !entry.file_name().to_string_lossy().starts_with('.') {
                    let rel = path.strip_prefix(&self.dir)?;
                    keys.push(rel.to_string_lossy().replace('\\', "/"));
                }
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// Publishes everything staged to `store`: other files first, then `declared` (the outputs
    /// the plan waits for) in order, so a crash in between leaves the stage not done. Returns
    /// the published digests.
    pub fn publish(&self, store: &BlockingStore, declared: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
        let staged = self.keys()?;
        let extra = staged.iter().filter(|k| !declared.contains(k));
        let mut digests = BTreeMap::new();
        for key in extra.chain(declared.iter()) {
            let digest = store.publish_file(key, &self.path(key))?;
            digests.insert(key.clone(), digest);
        }
        Ok(digests)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Removes staging directories whose process is gone (this host, pid not running) or that are
/// older than a day ([`abandoned`]). Best effort: a sweep that fails leaves garbage, never an
/// error.
fn sweep_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let mut parts = name.split('~');
        let (owner, pid) = (parts.next().unwrap_or_default(), parts.next().and_then(|p| p.parse::<u32>().ok()));
        if abandoned(owner, pid, entry.metadata().and_then(|m| m.modified()).ok()) {
            tracing::info!(dir = %entry.path().display(), "removing a killed attempt's staging directory");
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// An exclusive lock on one stage of one run, held while the stage runs (released on drop).
pub struct StageLock {
    _file: File,
}

impl StageLock {
    /// Takes the lock of `stage` in run `run_root` under `root`, waiting (and saying so) while
    /// another runner holds it. Lock files live in the run's hidden `.locks` directory, so they
    /// go with the run.
    pub fn acquire(root: &Path, run_root: &str, stage: &str) -> anyhow::Result<StageLock> {
        let path = root.join(run_root).join(".locks").join(format!("{stage}.lock"));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
        }
        let file = File::options().create(true).truncate(false).write(true).open(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                tracing::info!(stage, lock = %path.display(), "another runner is running this stage; waiting for it");
                file.lock().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            }
            Err(std::fs::TryLockError::Error(e)) => anyhow::bail!("{}: cannot lock: {e}", path.display()),
        }
        Ok(StageLock { _file: file })
    }
}

/// A stage's lease in a shared store, held while the stage runs: a thread renews it every
/// [`LEASE_RENEW_EVERY`]; dropping the guard gives it up. A runner that is killed stops
/// renewing, and the lease lapses after [`LEASE_TTL`].
pub struct StageLease {
    stop: Option<std::sync::mpsc::Sender<()>>,
    renewer: Option<std::thread::JoinHandle<()>>,
}

impl StageLease {
    /// Takes the lease at `key` (`ArtifactLayout::lease`: in the store, so runners on other
    /// machines see it, and it goes with the run) for `stage`, waiting (and saying who holds it)
    /// while another runner's lease has not lapsed.
    pub fn acquire(store: &BlockingStore, key: &str, stage: &str) -> anyhow::Result<StageLease> {
        Self::acquire_for(store, key, stage, LEASE_TTL, LEASE_RENEW_EVERY)
    }

    fn acquire_for(store: &BlockingStore, key: &str, stage: &str, ttl: Duration, renew_every: Duration) -> anyhow::Result<StageLease> {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let holder = format!("{}~{}", owner_tag(), COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let mut said = false;
        while let Some(other) = store.try_lease(key, &holder, ttl)? {
            if !said {
                tracing::info!(stage, holder = %other.holder, lapses_in_seconds = other.remaining().as_secs(), lease = %store.location(key), "another runner holds this stage's lease; waiting for it to finish or lapse");
                said = true;
            }
            std::thread::sleep(renew_every.min(Duration::from_secs(5)));
        }
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let renewer = std::thread::spawn({
            let (store, key, stage) = (store.independent()?, key.to_string(), stage.to_string());
            move || renew_until_stopped(&store, &key, &holder, &stage, ttl, renew_every, &stopped)
        });
        Ok(StageLease { stop: Some(stop), renewer: Some(renewer) })
    }
}

/// The renewing thread: extends the lease every `renew_every` until told to stop (or the guard
/// is gone), then releases it.
fn renew_until_stopped(store: &BlockingStore, key: &str, holder: &str, stage: &str, ttl: Duration, renew_every: Duration, stopped: &std::sync::mpsc::Receiver<()>) {
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(renew_every) {
        match store.renew_lease(key, holder, ttl) {
            Ok(true) => {}
            Ok(false) => {
                // Publishing still decides: if the other runner finishes first, ours is refused
                // or identical.
                tracing::warn!(stage, lease = %store.location(key), "this stage's lease lapsed and another runner took it; carrying on");
                return;
            }
            Err(e) => tracing::warn!(stage, error = %e, "could not renew this stage's lease; trying again"),
        }
    }
    if let Err(e) = store.release_lease(key, holder) {
        tracing::warn!(stage, error = %e, "could not release this stage's lease; it lapses on its own");
    }
}

impl Drop for StageLease {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(renewer) = self.renewer.take() {
            let _ = renewer.join();
        }
    }
}

/// Every provenance record of the run `layout` describes, as published in `store`.
pub fn run_provenance(store: &BlockingStore, layout: &ArtifactLayout) -> anyhow::Result<Vec<Provenance>> {
    let mut records = Vec::new();
    for key in store.list(layout.root())?.into_iter().filter(|k| layout.is_provenance(k)) {
        let bytes = store.get(&key)?.unwrap_or_default();
        records.push(serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("{}: not a provenance record: {e}", store.location(&key)))?);
    }
    Ok(records)
}

/// Checks every provenance record against the artifacts now published (`digest_of` gives the
/// SHA-256 of a key, `None` when it is gone): a stage whose input was replaced after it ran
/// makes the run inconsistent, and the error names the stage, the key and both digests.
pub fn verify_run(records: &[Provenance], digest_of: impl Fn(&str) -> anyhow::Result<Option<String>>) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    for record in records {
        for (key, used) in record.inputs.iter().chain(&record.outputs) {
            match digest_of(key)? {
                Some(now) if &now == used => {}
                Some(now) => problems.push(format!("stage {} used {key} with SHA-256 {used}, but the published one is {now}", record.stage)),
                None => problems.push(format!("stage {} used {key}, which is no longer published", record.stage)),
            }
        }
    }
    anyhow::ensure!(problems.is_empty(), "this run's artifacts are inconsistent (something replaced them after use); start a new run:\n  - {}", problems.join("\n  - "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use medmerge_store::scratch::host;

    #[test]
    fn staged_files_are_published_declared_last_and_the_staging_directory_goes() {
        let root = tempfile::tempdir().unwrap();
        let store = BlockingStore::local(root.path()).unwrap();
        let dir;
        {
            let staging = Staging::new(root.path(), "evaluate").unwrap();
            dir = staging.dir.clone();
            for key in ["run/eval/metrics.json", "run/eval/plot.png", "run/eval/.metrics.json.tmp~pod~1~0"] {
                std::fs::create_dir_all(staging.path(key).parent().unwrap()).unwrap();
                std::fs::write(staging.path(key), key).unwrap();
            }
            let digests = staging.publish(&store, &["run/eval/metrics.json".into()]).unwrap();
            assert_eq!(digests.keys().collect::<Vec<_>>(), ["run/eval/metrics.json", "run/eval/plot.png"]);
        }
        assert!(!dir.exists());
        assert_eq!(store.list("run").unwrap(), ["run/eval/metrics.json", "run/eval/plot.png"]);
    }

    #[test]
    fn a_killed_attempts_staging_directory_is_swept_and_a_live_ones_is_kept() {
        let root = tempfile::tempdir().unwrap();
        let parent = root.path().join(".staging");
        // pid 4194304 is above Linux's pid_max, so it is never running.
        let dead = parent.join(format!("{}~4194304~finetune-a~0", host()));
        let other_host = parent.join("another-pod~4194304~finetune-b~0");
        std::fs::create_dir_all(&dead).unwrap();
        std::fs::create_dir_all(&other_host).unwrap();
        let live = Staging::new(root.path(), "merge").unwrap();
        let _second = Staging::new(root.path(), "merge").unwrap();
        assert!(!dead.exists(), "a dead process's directory is swept");
        assert!(other_host.exists(), "another pod's may still be in use");
        assert!(live.dir.exists(), "this process's own directory stays");
    }

    #[test]
    fn a_replaced_input_makes_the_run_inconsistent_naming_stage_key_and_digests() {
        let record = Provenance { stage: "merge-merged".into(), inputs: [("run/shards/a/vector.safetensors".to_string(), "aaa".to_string())].into(), outputs: BTreeMap::new() };
        verify_run(std::slice::from_ref(&record), |_| Ok(Some("aaa".into()))).unwrap();
        let err = verify_run(std::slice::from_ref(&record), |_| Ok(Some("bbb".into()))).unwrap_err().to_string();
        assert!(err.contains("stage merge-merged used run/shards/a/vector.safetensors with SHA-256 aaa, but the published one is bbb"), "{err}");
        let err = verify_run(&[record], |_| Ok(None)).unwrap_err().to_string();
        assert!(err.contains("no longer published"), "{err}");
    }

    #[test]
    fn a_second_runner_waits_for_the_first_runners_lease_which_is_renewed_and_then_released() {
        let root = tempfile::tempdir().unwrap();
        let store = BlockingStore::local(root.path()).unwrap();
        let (ttl, renew) = (Duration::from_secs(2), Duration::from_millis(100));
        let first = StageLease::acquire_for(&store, "run/leases/merge", "merge", ttl, renew).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let path = root.path().to_path_buf();
        let waiter = std::thread::spawn(move || {
            let store = BlockingStore::local(&path).unwrap();
            let _second = StageLease::acquire_for(&store, "run/leases/merge", "merge", ttl, renew).unwrap();
            tx.send(()).unwrap();
        });
        // Longer than the lease's ttl: only renewal keeps the second runner out.
        assert!(rx.recv_timeout(Duration::from_secs(4)).is_err(), "the second runner waits while the first renews its lease");
        drop(first);
        rx.recv_timeout(Duration::from_secs(30)).expect("and gets it once the first lets go");
        waiter.join().unwrap();
        assert!(store.list("run").unwrap().is_empty(), "released leases leave nothing");
    }

    #[test]
    fn a_killed_runners_lease_lapses_and_the_next_runner_takes_it() {
        let root = tempfile::tempdir().unwrap();
        let store = BlockingStore::local(root.path()).unwrap();
        // A runner that took the lease and was killed long ago: its lease lapsed unrenewed.
        store.put("run/leases/merge", b"holder killed~1~0\nexpires 1\n".to_vec()).unwrap();
        let _lease = StageLease::acquire_for(&store, "run/leases/merge", "merge", Duration::from_secs(60), Duration::from_millis(100)).unwrap();
        let record = String::from_utf8(store.get("run/leases/merge").unwrap().unwrap()).unwrap();
        assert!(record.starts_with(&format!("holder {}~", owner_tag())), "the next runner holds it now: {record}");
    }

    #[test]
    fn a_stage_lock_lives_in_the_run_and_goes_with_it() {
        let root = tempfile::tempdir().unwrap();
        drop(StageLock::acquire(root.path(), "ns/job/g1", "merge-merged").unwrap());
        assert!(root.path().join("ns/job/g1/.locks/merge-merged.lock").exists());
        let store = BlockingStore::local(root.path()).unwrap();
        assert!(store.list("ns/job/g1").unwrap().is_empty(), "a lock file is not an artifact");
    }

    #[test]
    fn a_second_holder_of_a_stage_lock_waits_for_the_first() {
        let root = tempfile::tempdir().unwrap();
        let first = StageLock::acquire(root.path(), "ns/job/g1", "merge-merged").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let path = root.path().to_path_buf();
        let waiter = std::thread::spawn(move || {
            let _second = StageLock::acquire(&path, "ns/job/g1", "merge-merged").unwrap();
            tx.send(()).unwrap();
        });
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "the second runner waits while the first holds the lock");
        drop(first);
        rx.recv_timeout(Duration::from_secs(30)).expect("and gets it once the first lets go");
        waiter.join().unwrap();
    }
}
