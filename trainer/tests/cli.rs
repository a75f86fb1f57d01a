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

#[test]
fn export_writes_onnx_and_names_a_file_that_is_not_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("base.safetensors");
    let init = trainer().args(["init", "--arch", "mobilenet-v3-small", "--weights", "random", "--classes", "a,b", "--image-size", "32", "--out"]).arg(&model).output().unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let (float, int8) = (dir.path().join("m.onnx"), dir.path().join("m-int8.onnx"));
    for (out, extra) in [(&float, None), (&int8, Some("--int8"))] {
        let run = trainer().arg("export").arg("--model").arg(&model).arg("--out").arg(out).args(extra).output().unwrap();
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        assert!(String::from_utf8_lossy(&run.stdout).contains("mobilenet-v3-small 32, 2 classes"));
    }
    assert!(std::fs::metadata(&int8).unwrap().len() * 3 < std::fs::metadata(&float).unwrap().len());
    let not_a_model = dir.path().join("notes.txt");
    std::fs::write(&not_a_model, "hello").unwrap();
    let run = trainer().arg("export").arg("--model").arg(&not_a_model).arg("--out").arg(dir.path().join("x.onnx")).output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && stderr.contains("--model") && stderr.contains("notes.txt") && !stderr.contains("panicked"), "{stderr}");
    assert!(!dir.path().join("x.onnx").exists());
}
