//! Faults and bad input a careless operator or a new user produces, each with the exact outcome:
//! the message names the thing at fault, nothing outside the store is written, and every
//! published artifact stays consistent (`make test`; plain `cargo test` runs them too).

use medmerge_trainer::synth::tiny_local_job;
use std::path::Path;
use std::process::{Command, Output};

use medmerge_crds::ArtifactLayout;
use medmerge_store::BlockingStore;
use medmerge_trainer::publish::{run_provenance, verify_run, Provenance};

fn trainer() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_medmerge-trainer"));
    c.args(["--threads", "1"]).env("AWS_EC2_METADATA_DISABLED", "true");
    c
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every provenance record of a local run checked against the files published now.
fn assert_consistent(store: &Path, layout: &ArtifactLayout) {
    let records: Vec<Provenance> = run_provenance(&BlockingStore::local(store).unwrap(), layout).unwrap();
    assert!(records.iter().any(|r| r.stage == "evaluate"), "the run finished: {records:?}");
    verify_run(&records, |key| Ok(std::fs::read(store.join(key)).ok().map(|b| medmerge_store::sha256_hex(&b)))).unwrap();
}

#[test]
fn two_runners_on_one_mergejob_end_with_one_consistent_run_or_a_clear_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let job = tiny_local_job(dir.path(), "  merge: {baselines: [paramsMean]}\n", 2).unwrap();
    let runners: Vec<_> = (0..2).map(|_| trainer().arg("pipeline").arg(&job).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap()).collect();
    let outputs: Vec<Output> = runners.into_iter().map(|r| r.wait_with_output().unwrap()).collect();
    for o in &outputs {
        assert!(o.status.success() || stderr(o).contains("already published with different content"), "a runner failed some other way: {}", stderr(o));
    }
    assert!(outputs.iter().any(|o| o.status.success()), "one runner finishes the run");
    assert_consistent(&dir.path().join("out"), &ArtifactLayout::new("runs", "local", "tiny", 1));
    // And a third runner afterwards finds it done and consistent.
    let again = trainer().arg("pipeline").arg(&job).output().unwrap();
    assert!(again.status.success(), "{}", stderr(&again));
}

#[test]
fn a_misspelt_field_or_a_wrong_kind_is_refused_naming_it_instead_of_running_with_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let job = tiny_local_job(dir.path(), "  merge: {lamda: 3}\n", 2).unwrap();
    let yaml = std::fs::read_to_string(&job).unwrap();
    std::fs::write(&job, yaml.replace("- {name: h0,", "- {colour: red, name: h0,")).unwrap();
    let out = trainer().arg("pipeline").arg(&job).arg("--plan").output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unknown fields spec.shards[0].colour, spec.merge.lamda"), "{}", stderr(&out));

    for (from, to, expect) in
        [("kind: MergeJob", "kind: Job", "kind \"Job\" is not MergeJob"), ("apiVersion: medmerge.io/v1alpha1", "apiVersion: batch/v1", "apiVersion \"batch/v1\" is not medmerge.io/v1alpha1")]
    {
        std::fs::write(&job, yaml.replace(from, to).replace("  merge: {lamda: 3}\n", "")).unwrap();
        let out = trainer().arg("pipeline").arg(&job).arg("--plan").output().unwrap();
        assert!(!out.status.success() && stderr(&out).contains(expect), "{}", stderr(&out));
    }
    assert!(!dir.path().join("out").exists(), "nothing was written");
}

/// A tiny base and one shard's vector made with the CLI, in `dir`.
fn base_and_vector(dir: &Path) {
    let run = |args: &[&str]| {
        let out = trainer().current_dir(dir).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    };
    run(&["synth", "--out", "images", "--classes", "2", "--per-class", "6", "--size", "32"]);
    run(&["init", "--arch", "resnet18", "--weights", "random", "--data", "images", "--image-size", "32", "--out", "base.safetensors"]);
    run(&["finetune", "--base", "base.safetensors", "--data", "images", "--shard", "a", "--out", "a.safetensors", "--epochs", "1", "--batch-size", "4"]);
}

#[test]
fn cli_flags_follow_the_specs_rules_and_a_vector_given_twice_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    base_and_vector(dir.path());
    std::fs::copy(dir.path().join("a.safetensors"), dir.path().join("copy.safetensors")).unwrap();
    let fails = |args: &[&str], expect: &str| {
        let out = trainer().current_dir(dir.path()).args(args).output().unwrap();
        assert!(!out.status.success() && stderr(&out).contains(expect), "{args:?}: expected {expect:?}, got {}", stderr(&out));
    };
    fails(
        &["finetune", "--base", "base.safetensors", "--data", "images", "--shard", "z", "--out", "z.safetensors", "--epochs", "0"],
        "--epochs: 0 is outside [1, 10000] (the same rule as spec.training.epochs)",
    );
    fails(&["finetune", "--base", "base.safetensors", "--data", "images", "--shard", "z", "--out", "z.safetensors", "--validation-fraction", "0.9"], "--validation-fraction: 0.9 is outside [0, 0.5]");
    let merge = ["merge", "--base", "base.safetensors", "--out", "m.safetensors"];
    fails(&[&merge[..], &["--vector", "a=a.safetensors", "--lambda", "1e30"]].concat(), "--lambda: 1000000000000000000000000000000 is outside [0, 4]");
    fails(&[&merge[..], &["--vector", "a=a.safetensors", "--lambda=-3"]].concat(), "--lambda: -3 is outside [0, 4]");
    fails(&[&merge[..], &["--vector", "a=a.safetensors", "--vector", "b=a.safetensors"]].concat(), "vectors of shards a and b are the same vector (both are a.safetensors)");
    fails(&[&merge[..], &["--vector", "a=a.safetensors", "--vector", "b=copy.safetensors"]].concat(), "identical copies of shard a's vector");
    assert!(!dir.path().join("m.safetensors").exists() && !dir.path().join("z.safetensors").exists());
}

#[test]
fn a_name_or_namespace_that_would_leave_the_store_is_refused_and_nothing_is_written_outside() {
    let dir = tempfile::tempdir().unwrap();
    let job = tiny_local_job(dir.path(), "", 2).unwrap();
    let yaml = std::fs::read_to_string(&job).unwrap();
    for (metadata, field) in [("{name: ../../escape}", "metadata.name \"../../escape\""), ("{name: tiny, namespace: /tmp}", "metadata.namespace \"/tmp\""), ("{name: Tiny}", "metadata.name \"Tiny\"")]
    {
        std::fs::write(&job, yaml.replace("metadata: {name: tiny}", &format!("metadata: {metadata}"))).unwrap();
        let out = trainer().arg("pipeline").arg(&job).output().unwrap();
        assert!(!out.status.success() && stderr(&out).contains(field) && stderr(&out).contains("DNS subdomain"), "{}", stderr(&out));
    }
    assert!(!dir.path().join("out").exists() && !dir.path().parent().unwrap().join("escape").exists());
    // The store CLI refuses the same escapes in keys.
    let out = trainer().args(["store", "--local"]).arg(dir.path().join("store")).arg("put").arg(&job).arg("../outside").output().unwrap();
    assert!(!out.status.success() && stderr(&out).contains("store key \"../outside\""), "{}", stderr(&out));
    assert!(!dir.path().join("outside").exists());
}

#[test]
fn a_mistyped_label_is_refused_naming_shard_file_and_line_instead_of_becoming_a_class() {
    let dir = tempfile::tempdir().unwrap();
    let job = tiny_local_job(dir.path(), "", 2).unwrap();
    let s1 = dir.path().join("s1.csv");
    let text = std::fs::read_to_string(&s1).unwrap();
    let typo = text.replacen(",disc\n", ",dsic\n", 1);
    assert_ne!(typo, text, "the fixture has a disc row");
    let line = typo.lines().position(|l| l.ends_with(",dsic")).unwrap() + 1;
    std::fs::write(&s1, &typo).unwrap();
    // Classes read from the data: the typo is in no evaluation image.
    let out = trainer().arg("pipeline").arg(&job).output().unwrap();
    assert!(!out.status.success() && stderr(&out).contains("shard h1: class \"dsic\"") && stderr(&out).contains("s1.csv"), "{}", stderr(&out));
    // Classes listed in the spec: the row is named by file and line.
    let yaml = std::fs::read_to_string(&job).unwrap().replace("imageSize: 32}", "imageSize: 32, classes: [disc, square, stripes]}");
    std::fs::write(&job, yaml).unwrap();
    let out = trainer().arg("pipeline").arg(&job).output().unwrap();
    assert!(!out.status.success() && stderr(&out).contains(&format!("s1.csv, line {line}: class \"dsic\" is not one of the model's classes")), "{}", stderr(&out));
    assert!(!dir.path().join("out/runs/local/tiny/g1/shards/h1").exists(), "the shard with the bad row published nothing");
}

#[test]
fn empty_and_non_image_folders_are_not_classes_and_a_truncated_jpeg_is_named() {
    use medmerge_trainer::data::{decode_image, Dataset};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("images");
    medmerge_trainer::synth::generate(&data, 2, 3, 32, 1).unwrap();
    std::fs::create_dir_all(data.join("empty")).unwrap();
    std::fs::create_dir_all(data.join("notes")).unwrap();
    std::fs::write(data.join("notes/readme.txt"), "not an image").unwrap();
    let ds = Dataset::open(&data, None).unwrap();
    assert!(!ds.classes.iter().any(|c| c == "empty" || c == "notes"), "{:?}", ds.classes);
    assert_eq!(ds.classes.len(), 2);

    let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8 * 4, y as u8 * 4, 128]));
    let whole = dir.path().join("whole.jpg");
    img.save(&whole).unwrap();
    decode_image(&whole, 32, None).unwrap();
    let bytes = std::fs::read(&whole).unwrap();
    let cut = dir.path().join("cut.jpg");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let err = decode_image(&cut, 32, None).unwrap_err().to_string();
    assert!(err.contains("cut.jpg is truncated"), "{err}");
}

#[test]
fn a_one_image_shard_a_classless_or_oversized_model_and_empty_bn_counts_are_errors_not_panics() {
    use medmerge_trainer::checkpoint::{ArtifactKind, ArtifactMeta};
    use medmerge_trainer::restore::moments::{load_moments, save_moments};
    let dir = tempfile::tempdir().unwrap();
    base_and_vector(dir.path());
    let fails = |args: &[&str], expect: &str| {
        let out = trainer().current_dir(dir.path()).args(args).output().unwrap();
        let err = stderr(&out);
        assert!(!out.status.success() && err.contains(expect) && !err.contains("panicked"), "{args:?}: expected {expect:?}, got {err}");
    };
    // A valid spec (validationFraction > 0) on a shard of one image.
    let image = std::fs::read_dir(dir.path().join("images/disc")).unwrap().next().unwrap().unwrap().path();
    std::fs::write(dir.path().join("one.csv"), format!("path,label\n{},disc\n", image.display())).unwrap();
    fails(&["finetune", "--base", "base.safetensors", "--data", "one.csv", "--shard", "tiny", "--out", "t.safetensors", "--validation-fraction", "0.3"], "tiny: 1 image(s) is too few to fine-tune");
    fails(&["init", "--arch", "resnet18", "--weights", "random", "--classes", "", "--out", "x.safetensors"], "--classes: class \"\" is empty or repeated");
    fails(&["init", "--arch", "resnet18", "--weights", "random", "--classes", "a,b", "--image-size", "100000", "--out", "x.safetensors"], "--image-size: 100000 is outside [16, 1024]");
    assert!(!dir.path().join("x.safetensors").exists());

    let meta = ArtifactMeta {
        kind: ArtifactKind::BnStats,
        ..ArtifactMeta::from_map(Path::new("base"), medmerge_trainer::st::MappedFile::open(&dir.path().join("base.safetensors")).unwrap().metadata(), ArtifactKind::Model).unwrap()
    };
    for count in [0.0, f64::NAN] {
        let stats = dir.path().join("stats.safetensors");
        save_moments(&stats, &[("bn1".to_string(), (count, vec![1.0], vec![1.0]))].into(), &meta).unwrap();
        let err = load_moments(&stats).unwrap_err().to_string();
        assert!(err.contains("layer \"bn1\"") && err.contains("positive count"), "{err}");
    }
}

#[test]
fn predict_on_a_folder_with_a_symlink_cycle_reads_each_image_once_and_ends() {
    let dir = tempfile::tempdir().unwrap();
    base_and_vector(dir.path());
    let folder = dir.path().join("images/disc");
    std::os::unix::fs::symlink(dir.path().join("images"), folder.join("loop")).unwrap();
    let out = trainer().current_dir(dir.path()).args(["predict", "--model", "base.safetensors", "--input", "images", "--out", "p.csv"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = std::fs::read_to_string(dir.path().join("p.csv")).unwrap().lines().count() - 1;
    assert_eq!(rows, 12, "2 classes x 6 images, each once");
}

#[test]
fn predictions_of_an_image_whose_name_holds_a_comma_and_a_quote_keep_their_columns() {
    let dir = tempfile::tempdir().unwrap();
    base_and_vector(dir.path());
    let folder = dir.path().join("images/disc");
    let first = std::fs::read_dir(&folder).unwrap().next().unwrap().unwrap().path();
    let awkward = folder.join("left eye, \"late\".png");
    std::fs::rename(&first, &awkward).unwrap();
    let out = trainer().current_dir(dir.path()).args(["predict", "--model", "base.safetensors", "--input", "images", "--out", "p.csv"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let mut reader = csv::Reader::from_path(dir.path().join("p.csv")).unwrap();
    let width = reader.headers().unwrap().len();
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert!(rows.iter().all(|r| r.len() == width), "every row has the header's {width} columns");
    assert!(rows.iter().any(|r| r[0].ends_with("left eye, \"late\".png")), "the awkward name is one cell");
}
