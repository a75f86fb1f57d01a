//! Faults and bad input a careless operator or a new user produces, each with the exact outcome:
//! the message names the thing at fault, nothing outside the store is written, and every
//! published artifact stays consistent (`make test`; plain `cargo test` runs them too).

mod common;

use std::path::Path;
use std::process::{Command, Output};

use medmerge_trainer::publish::{verify_run, Provenance};

fn trainer() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_medmerge-trainer"));
    c.args(["--threads", "1"]).env("AWS_EC2_METADATA_DISABLED", "true");
    c
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every provenance record of a local run checked against the files published now.
fn assert_consistent(store: &Path, run: &str) {
    let dir = store.join(run).join("provenance");
    let records: Vec<Provenance> = std::fs::read_dir(&dir).unwrap().map(|e| serde_json::from_slice(&std::fs::read(e.unwrap().path()).unwrap()).unwrap()).collect();
    assert!(records.iter().any(|r| r.stage == "evaluate"), "the run finished: {records:?}");
    verify_run(&records, |key| Ok(std::fs::read(store.join(key)).ok().map(|b| medmerge_store::sha256_hex(&b)))).unwrap();
}

#[test]
fn two_runners_on_one_mergejob_end_with_one_consistent_run_or_a_clear_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let job = common::write_job(dir.path(), "  merge: {baselines: [paramsMean]}\n", 2);
    let runners: Vec<_> = (0..2).map(|_| trainer().arg("pipeline").arg(&job).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap()).collect();
    let outputs: Vec<Output> = runners.into_iter().map(|r| r.wait_with_output().unwrap()).collect();
    for o in &outputs {
        assert!(o.status.success() || stderr(o).contains("already published with different content"), "a runner failed some other way: {}", stderr(o));
    }
    assert!(outputs.iter().any(|o| o.status.success()), "one runner finishes the run");
    assert_consistent(&dir.path().join("out"), "runs/local/tiny/g1");
    // And a third runner afterwards finds it done and consistent.
    let again = trainer().arg("pipeline").arg(&job).output().unwrap();
    assert!(again.status.success(), "{}", stderr(&again));
}
