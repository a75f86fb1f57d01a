//! The command line as a user meets it: the real binary, run as a separate process.

use std::process::Command;

fn trainer() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_medmerge-trainer"));
    command.env("MEDMERGE_THREADS", "1");
    command
}

#[test]
fn a_reader_that_has_gone_away_ends_a_command_quietly_instead_of_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let made = trainer().args(["synth", "--classes", "2", "--per-class", "10", "--size", "16", "--out"]).arg(&data).output().unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    // `medmerge-trainer split … | head -0`: the pipe's reading end is closed before the first line.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let split = trainer().args(["split", "--shards", "2", "--data"]).arg(&data).arg("--out").arg(dir.path().join("split")).stdout(writer).output().unwrap();
    let stderr = String::from_utf8_lossy(&split.stderr);
    assert!(split.status.success(), "exit {:?}: {stderr}", split.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
    // The work itself was done before the first line was due.
    assert!(dir.path().join("split/test.csv").exists());
}
