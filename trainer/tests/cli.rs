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

#[test]
fn zero_threads_or_a_zero_batch_is_refused_by_name_before_anything_runs() {
    for args in [
        &["--threads", "0", "evaluate", "--model", "m", "--data", "d"][..],
        &["evaluate", "--batch-size", "0", "--model", "m", "--data", "d"],
        &["finetune", "--batch-size", "0", "--base", "b", "--data", "d", "--shard", "s", "--out", "o"],
    ] {
        let run = trainer().args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{args:?}: {stderr}");
        let flag = args.iter().find(|a| a.starts_with("--") && args[args.iter().position(|x| x == *a).unwrap() + 1] == "0").unwrap();
        assert!(stderr.contains(flag) && !stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
