//! A tiny MergeJob end to end on generated images (ResNet-18, random init, 32 px), plus the
//! failure paths a user meets: a corrupt image, a missing weights file.

use std::path::{Path, PathBuf};

use medmerge_crds::results::{EvaluationResults, ShardTraining};
use medmerge_crds::{HeadStrategy, MergeMethod, ReleaseSpec};
use medmerge_trainer::merge::{merge_checked, write_vector, MergeOptions, ShardVector};
use medmerge_trainer::model::Network;
use medmerge_trainer::pipeline::{Job, Runner};
use medmerge_trainer::secure::merge::mask_vector;
use medmerge_trainer::secure::{DropoutShare, HospitalKey, Roster};
use medmerge_trainer::st::MappedFile;
use medmerge_trainer::synth;
use medmerge_trainer::synth::tiny_local_job;
use rand::{Rng, SeedableRng};
use tch::Device;

#[test]
fn a_tiny_mergejob_runs_end_to_end_and_reports_every_candidate() {
    tch::set_num_threads(2);
    let dir = tempfile::tempdir().unwrap();
    let job = tiny_local_job(dir.path(), "  merge: {baselines: [paramsMean, randomVector, ties, dare, shardModels, pretrainedRestored, fullTraining]}\n", 3).unwrap();
    let report = Runner::new(Job::load(&job).unwrap(), Device::Cpu).unwrap().run().unwrap();
    let ids: Vec<&str> = report.candidates.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["data-vector", "params-mean", "random-vector", "ties", "dare", "shard-h0", "shard-h1", "shard-h2", "pretrained-restored", "full-training"]);
    assert_eq!(report.test_images, 18);
    for c in &report.candidates {
        assert!((0.0..=1.0).contains(&c.metrics.accuracy));
        assert_eq!(c.metrics.confusion.iter().flatten().sum::<u64>(), 18);
    }
    assert!(!report.similarity.is_empty() && report.similarity.iter().all(|s| s.with_full_training.is_some()));
    let releases: Vec<(&str, &str, &str)> = report.releases.iter().map(|r| (r.shard.as_str(), r.release.encoding.as_str(), if r.release.privacy.is_some() { "private" } else { "none" })).collect();
    assert_eq!(releases, [("h0", "float32", "none"), ("h1", "float32", "none"), ("h2", "float32", "none")], "how each vector left, in the report");
    let run = dir.path().join("out/runs/local/tiny/g1");
    assert!(run.join("eval/report.md").exists());
    for plot in ["results.png", "confusion.png", "similarity.png", "roc.png", "gradcam-00.png"] {
        let bytes = std::fs::read(run.join("eval").join(plot)).unwrap();
        assert_eq!(&bytes[1..4], b"PNG", "{plot} is a PNG");
    }
    for part in ["epoch/h0/model", "bn/h1/bn-stats", "head/h0/head-stats"] {
        assert!(run.join(restore_key(part)).exists(), "the default's rounds: {part}");
    }
    // The clinical view: ROC per class, the operating point, Grad-CAM for every model.
    let clinical = &report.clinical;
    assert_eq!(clinical.roc.iter().map(|r| r.class.as_str()).collect::<Vec<_>>(), report.classes.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(clinical.roc.iter().all(|r| r.points.first() == Some(&(0.0, 0.0)) && r.points.last() == Some(&(1.0, 1.0))));
    assert_eq!((clinical.operating_point, clinical.sensitivity.len()), (0.5, 3));
    assert!(!clinical.gallery.is_empty() && clinical.gallery.len() <= 8);
    let in_unit = |v: Option<f64>| v.is_some_and(|f| (0.0..=1.0).contains(&f));
    for c in &report.candidates {
        let h = &c.heat;
        assert!(in_unit(h.deletion_auc) && in_unit(h.insertion_auc) && h.deletion_gain.is_some(), "Grad-CAM curves for {}: {h:?}", c.id);
        // A model whose Grad-CAM is zero on every explained image has no heat to place: None.
        assert!(h.foreground_fraction.is_none_or(|f| (0.0..=1.0).contains(&f)), "foreground share of {}: {h:?}", c.id);
    }
    assert!(report.candidates.iter().any(|c| in_unit(c.heat.foreground_fraction)), "some model's heat is placed");
    let html = std::fs::read_to_string(run.join("eval/report.html")).unwrap();
    for id in medmerge_trainer::html::SECTIONS {
        assert!(html.contains(&format!("<section id=\"{id}\">")), "report.html lacks {id}");
    }
    assert!(!html.contains("was not drawn"), "every figure is embedded");
    // The merged model as ONNX beside the report, and its int8 edge variant scored.
    let export = report.export.as_ref().expect("the primary model is exported");
    for (file, bytes) in [(&export.float_file, export.float_bytes), (&export.int8_file, export.int8_bytes)] {
        assert_eq!(std::fs::metadata(run.join("eval").join(file)).unwrap().len(), bytes, "{file}");
    }
    assert!((export.int8_bytes as f64) < 0.3 * export.float_bytes as f64, "{export:?}");
    assert!((0.0..=1.0).contains(&export.int8_accuracy) && (0.0..=1.0).contains(&export.int8_macro_f1), "{export:?}");
    // What the operator reads back (crds::results) parses from what the stages wrote.
    let eval: EvaluationResults = serde_json::from_slice(&std::fs::read(run.join("eval/metrics.json")).unwrap()).unwrap();
    assert_eq!(eval.candidates.len(), report.candidates.len());
    assert_eq!((eval.candidates[0].id.as_str(), eval.candidates[0].metrics.accuracy), ("data-vector", report.candidates[0].metrics.accuracy));
    assert_eq!(eval.candidates[0].heat, report.candidates[0].heat);
    let shard: ShardTraining = serde_json::from_slice(&std::fs::read(run.join("shards/h0/metrics.json")).unwrap()).unwrap();
    assert!(shard.samples().is_some_and(|n| n > 0) && shard.best_epoch.is_some(), "{shard:?}");

    // Running again finds everything done and redoes nothing.
    let vector = run.join("shards/h0/vector.safetensors");
    let before = std::fs::metadata(&vector).unwrap().modified().unwrap();
    Runner::new(Job::load(&job).unwrap(), Device::Cpu).unwrap().run().unwrap();
    assert_eq!(std::fs::metadata(&vector).unwrap().modified().unwrap(), before);
}

#[test]
fn finetune_epoch_restoration_chains_through_every_shard() {
    let dir = tempfile::tempdir().unwrap();
    let job = tiny_local_job(dir.path(), "  restore: {mode: finetuneEpoch}\n  merge: {baselines: []}\n", 2).unwrap();
    let report = Runner::new(Job::load(&job).unwrap(), Device::Cpu).unwrap().run().unwrap();
    assert_eq!(report.candidates.len(), 1);
    let run = dir.path().join("out/runs/local/tiny/g1");
    assert!(run.join(restore_key("chain/h0/model")).exists());
    assert!(run.join(restore_key("chain/h1/model")).exists());
}

#[test]
fn every_parallel_restoration_mode_runs_its_rounds_and_publishes_a_valid_model() {
    for (mode, epochs, parts) in [
        ("closedFormHead", 1, &["bn/h0/bn-stats", "head/h1/head-stats"][..]),
        ("averagedEpoch", 1, &["epoch/h0/model", "epoch/model", "bn/h1/bn-stats"][..]),
        ("averagedEpochHead", 1, &["epoch/h1/model", "bn/model", "head/h0/head-stats"][..]),
        ("averagedEpochHead", 2, &["epoch/h0/model", "epoch/model", "epoch-2/h0/model", "epoch-2/h1/model", "epoch-2/model", "head/h1/head-stats"][..]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let job = tiny_local_job(dir.path(), &format!("  restore: {{mode: {mode}, epochs: {epochs}}}\n  merge: {{baselines: []}}\n"), 2).unwrap();
        let report = Runner::new(Job::load(&job).unwrap(), Device::Cpu).unwrap().run().unwrap();
        let description = &report.candidates[0].description;
        assert!(description.contains(medmerge_crds::RestoreMode::parse(&kebab(mode)).unwrap().as_str()), "{mode}: {description}");
        assert_eq!(description.contains("×2"), epochs == 2, "{description}");
        let run = dir.path().join("out/runs/local/tiny/g1");
        for part in parts {
            assert!(run.join(restore_key(part)).exists(), "{mode} × {epochs}: {part}");
        }
        let restored = medmerge_trainer::model::Network::load(&run.join("restored/data-vector/model.safetensors"), Device::Cpu).unwrap();
        restored.check_valid().unwrap();
    }
}

fn kebab(camel: &str) -> String {
    camel.chars().flat_map(|c| if c.is_uppercase() { vec!['-', c.to_ascii_lowercase()] } else { vec![c] }).collect()
}

#[test]
fn a_corrupt_image_fails_its_shard_by_name_and_keeps_earlier_artifacts() {
    let dir = tempfile::tempdir().unwrap();
    let job = tiny_local_job(dir.path(), "  merge: {baselines: []}\n", 2).unwrap();
    let manifest = std::fs::read_to_string(dir.path().join("s1.csv")).unwrap();
    let victim = manifest.lines().nth(1).unwrap().rsplit_once(',').unwrap().0.to_string();
    std::fs::write(&victim, b"this is not a png").unwrap();
    let err = Runner::new(Job::load(&job).unwrap(), Device::Cpu).unwrap().run().unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("finetune-h1") && msg.contains(&victim), "{msg}");
    let run = dir.path().join("out/runs/local/tiny/g1");
    assert!(run.join("base/model.safetensors").exists());
    assert!(run.join("shards/h0/vector.safetensors").exists(), "the healthy shard's vector survives");
    assert!(!run.join("shards/h1/vector.safetensors").exists(), "no vector for the failed shard");
    let leftovers: Vec<_> = walk(&run).into_iter().filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().contains(".tmp~"))).collect();
    assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
}

#[test]
fn an_invalid_job_lists_every_bad_field() {
    let dir = tempfile::tempdir().unwrap();
    let job = tiny_local_job(dir.path(), "  merge: {lambda: 9}\n", 2).unwrap();
    let text = std::fs::read_to_string(&job).unwrap().replace("batchSize: 8", "batchSize: 0");
    std::fs::write(&job, text).unwrap();
    let msg = format!("{:#}", Job::load(&job).err().unwrap());
    assert!(msg.contains("spec.merge.lambda") && msg.contains("spec.training.batchSize") && msg.contains("job.yaml"), "{msg}");
}

#[test]
fn missing_imagenet_weights_are_named_with_a_fix() {
    let dir = tempfile::tempdir().unwrap();
    let job = tiny_local_job(dir.path(), "  merge: {baselines: []}\n", 2).unwrap();
    let text = std::fs::read_to_string(&job).unwrap().replace("architecture: resnet18, weights: random", "architecture: resnet18, weights: file, weightsPath: nowhere.safetensors");
    std::fs::write(&job, text).unwrap();
    let msg = format!("{:#}", Runner::new(Job::load(&job).unwrap(), Device::Cpu).unwrap().run().unwrap_err());
    assert!(msg.contains("nowhere.safetensors") && msg.contains("does not exist"), "{msg}");
}

/// Where the default candidate's restoration `part` lies in a run: `<round>/<shard>/<file>` in
/// the shard's own prefix, `<round>/model` (a combined round) in the run's `restore/`.
fn restore_key(part: &str) -> String {
    match part.split('/').collect::<Vec<_>>()[..] {
        [round, shard, file] => format!("shards/{shard}/restore/data-vector/{round}/{file}.safetensors"),
        _ => format!("restore/data-vector/{part}.safetensors"),
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_multi_label_mergejob_trains_with_bce_and_reports_per_label_auroc() {
    let dir = tempfile::tempdir().unwrap();
    synth::generate(&dir.path().join("images"), 3, 16, 32, 5).unwrap();
    let ds = medmerge_trainer::data::Dataset::open(&dir.path().join("images"), None).unwrap();
    // Two labels per image from the shape classes (disc, square, stripes): round, striped.
    let row = |s: &medmerge_trainer::data::Sample| format!("{},{},{}\n", s.path.display(), (s.label == 0) as u8, (s.label == 2) as u8);
    let (train, test): (Vec<_>, Vec<_>) = ds.samples.iter().enumerate().partition(|(i, _)| i % 4 != 0);
    for (name, part) in [("s0.csv", &train[..train.len() / 2]), ("s1.csv", &train[train.len() / 2..]), ("test.csv", &test[..])] {
        let body: String = part.iter().map(|(_, s)| row(s)).collect();
        std::fs::write(dir.path().join(name), format!("path,round,striped\n{body}")).unwrap();
    }
    let yaml = "apiVersion: medmerge.io/v1alpha1\nkind: MergeJob\nmetadata: {name: ml}\nspec:\n  model: {architecture: resnet18, weights: random, imageSize: 32, multiLabel: true}\n  shards:\n    - {name: a, data: {path: s0.csv}}\n    - {name: b, data: {path: s1.csv}}\n  training: {epochs: 1, batchSize: 8, learningRate: 0.001}\n  merge: {baselines: [shardModels]}\n  evaluation: {data: {path: test.csv}}\n  storage: {local: {path: out}}\n";
    std::fs::write(dir.path().join("job.yaml"), yaml).unwrap();
    let report = Runner::new(Job::load(&dir.path().join("job.yaml")).unwrap(), Device::Cpu).unwrap().run().unwrap();
    assert_eq!(report.classes, vec!["round", "striped"]);
    let m = &report.primary().metrics;
    assert!(m.confusion.is_empty());
    assert_eq!(m.auroc.len(), 2);
    assert!(m.auroc.iter().all(|a| a.is_some_and(|v| (0.0..=1.0).contains(&v))));
    let restored = dir.path().join("out/runs/local/ml/g1/restored/data-vector/model.safetensors");
    assert!(Network::load(&restored, Device::Cpu).unwrap().multi_label, "the flag travels with the model");
}

#[test]
fn each_hospital_releases_its_vector_as_the_spec_says_and_the_merge_decodes_it() {
    let dir = tempfile::tempdir().unwrap();
    let job = tiny_local_job(dir.path(), "  merge: {baselines: []}\n  release: {encoding: int8}\n", 2).unwrap();
    let runner = Runner::new(Job::load(&job).unwrap(), Device::Cpu).unwrap();
    for stage in ["init", "finetune-h0", "finetune-h1", "merge-data-vector"] {
        runner.run_stage(stage).unwrap();
    }
    let run = dir.path().join("out/runs/local/tiny/g1");
    let summary: ShardTraining = serde_json::from_slice(&std::fs::read(run.join("shards/h0/metrics.json")).unwrap()).unwrap();
    let release = summary.release.expect("the summary says how the vector left");
    assert_eq!((release.encoding, release.privacy), (medmerge_crds::VectorEncoding::Int8, None));
    let vector = run.join("shards/h0/vector.safetensors");
    assert_eq!(release.bytes, Some(std::fs::metadata(&vector).unwrap().len()));
    let stored = medmerge_trainer::st::MappedFile::open(&vector).unwrap();
    assert!(stored.tensors().any(|t| t.dtype == safetensors::Dtype::I8), "weights stored as int8");
    assert!(Network::load(&run.join("merged/data-vector/model.safetensors"), Device::Cpu).is_ok(), "the merge decoded both vectors");
}

#[test]
fn a_private_release_is_recorded_and_a_merge_its_noise_breaks_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let spec = "  merge: {baselines: []}\n  release: {privacy: {epsilon: 1, delta: 1.0e-6, clipNorm: 10}}\n";
    let job = tiny_local_job(dir.path(), spec, 2).unwrap();
    let runner = Runner::new(Job::load(&job).unwrap(), Device::Cpu).unwrap();
    for stage in ["init", "finetune-h0", "finetune-h1"] {
        runner.run_stage(stage).unwrap();
    }
    let run = dir.path().join("out/runs/local/tiny/g1");
    let summary: ShardTraining = serde_json::from_slice(&std::fs::read(run.join("shards/h1/metrics.json")).unwrap()).unwrap();
    let privacy = summary.release.and_then(|r| r.privacy).expect("the summary states the guarantee");
    assert_eq!((privacy.epsilon, privacy.delta, privacy.clip_norm), (1.0, 1e-6, 10.0));
    let stored = medmerge_trainer::st::MappedFile::open(&run.join("shards/h1/vector.safetensors")).unwrap();
    assert_eq!(medmerge_trainer::release::recorded_release(stored.metadata()).unwrap().privacy, Some(privacy), "so does the vector");
    // σ ≈ 80 per entry: the merged network's logits overflow, and the refusal names the noise.
    let refused = format!("{:#}", runner.run_stage("merge-data-vector").unwrap_err());
    assert!(refused.contains("non-finite") && refused.contains("differential-privacy noise") && refused.contains("h0, h1"), "{refused}");
    assert!(!run.join("merged/data-vector/model.safetensors").exists());
}

#[test]
fn stages_run_one_at_a_time_and_refuse_to_run_early() {
    let dir = tempfile::tempdir().unwrap();
    let job = tiny_local_job(dir.path(), "  merge: {baselines: []}\n", 2).unwrap();
    let runner = Runner::new(Job::load(&job).unwrap(), Device::Cpu).unwrap();
    let early = format!("{:#}", runner.run_stage("merge-data-vector").unwrap_err());
    assert!(early.contains("cannot run yet") && early.contains("base/model.safetensors"), "{early}");
    assert!(format!("{:#}", runner.run_stage("finetune-nobody").unwrap_err()).contains("finetune-h0"));
    runner.run_stage("init").unwrap();
    runner.run_stage("finetune-h1").unwrap();
    let states: std::collections::BTreeMap<String, &str> = runner.status().unwrap().into_iter().collect();
    assert_eq!(states["init"], "done");
    assert_eq!(states["finetune-h1"], "done");
    assert_eq!(states["finetune-h0"], "ready");
    assert_eq!(states["merge-data-vector"], "waiting");
}

#[test]
fn a_collect_stage_waits_for_a_late_hospital_vector_and_names_it_when_it_never_comes() {
    let dir = tempfile::tempdir().unwrap();
    let job = tiny_local_job(dir.path(), "  merge: {baselines: []}\n", 2).unwrap();
    let yaml = std::fs::read_to_string(&job).unwrap().replace("  training:", "    - {name: h2, vector: incoming/h2.safetensors}\n  training:");
    std::fs::write(&job, yaml).unwrap();
    let runner = Runner::new(Job::load(&job).unwrap(), Device::Cpu).unwrap();
    runner.run_stage("init").unwrap();

    runner.wait_for_vector("collect-h2", std::time::Duration::from_millis(300)).unwrap();
    let missing = format!("{:#}", runner.run_stage("collect-h2").unwrap_err());
    assert!(missing.contains("shard h2") && missing.contains("incoming/h2.safetensors"), "{missing}");

    let incoming = dir.path().join("incoming");
    let upload = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(200));
        std::fs::create_dir_all(&incoming).unwrap();
        std::fs::write(incoming.join("h2.safetensors"), b"uploaded by the hospital").unwrap();
    });
    runner.wait_for_vector("collect-h2", std::time::Duration::from_secs(2)).unwrap();
    upload.join().unwrap();
    // What arrived is not a data vector of this base: refused, naming the shard and the file.
    let refused = format!("{:#}", runner.run_stage("collect-h2").unwrap_err());
    assert!(refused.contains("external vector incoming/h2.safetensors refused") && refused.contains("not a valid safetensors"), "{refused}");
    let collected = dir.path().join("out/runs/local/tiny/g1/shards/h2/vector.safetensors");
    assert!(!collected.exists(), "nothing is published");
    // The hospital fixes its upload (a real vector of this base); the retry collects it.
    runner.run_stage("finetune-h0").unwrap();
    let real = std::fs::read(dir.path().join("out/runs/local/tiny/g1/shards/h0/vector.safetensors")).unwrap();
    std::fs::write(dir.path().join("incoming/h2.safetensors"), &real).unwrap();
    runner.run_stage("collect-h2").unwrap();
    assert_eq!(std::fs::read(&collected).unwrap(), real);
}

#[test]
fn a_class_the_first_hospital_lacks_is_still_a_class_of_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let job = tiny_local_job(dir.path(), "  merge: {baselines: []}\n  restore: {mode: bnRecalibrate}\n", 2).unwrap();
    // Hospital h0 loses every image of the last class; h1 and the test set keep theirs.
    let s0 = dir.path().join("s0.csv");
    let text = std::fs::read_to_string(&s0).unwrap();
    let kept: Vec<&str> = text.lines().filter(|l| !l.ends_with(",stripes")).collect();
    assert!(kept.len() < text.lines().count(), "the fixture has the class to drop");
    std::fs::write(&s0, kept.join("\n") + "\n").unwrap();
    let runner = Runner::new(Job::load(&job).unwrap(), Device::Cpu).unwrap();
    let report = runner.run().unwrap();
    assert_eq!(report.classes, vec!["disc", "square", "stripes"]);
}

#[test]
fn a_mobilenet_v3_mergejob_runs_every_stage_like_the_other_architectures() {
    let dir = tempfile::tempdir().unwrap();
    let job = tiny_local_job(dir.path(), "  merge: {baselines: [paramsMean, shardModels]}\n", 2).unwrap();
    let yaml = std::fs::read_to_string(&job).unwrap().replace("architecture: resnet18", "architecture: mobilenet-v3-small");
    std::fs::write(&job, yaml).unwrap();
    let report = Runner::new(Job::load(&job).unwrap(), Device::Cpu).unwrap().run().unwrap();
    let ids: Vec<&str> = report.candidates.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["data-vector", "params-mean", "shard-h0", "shard-h1"]);
    let run = dir.path().join("out/runs/local/tiny/g1");
    let merged = Network::load(&run.join("restored/data-vector/model.safetensors"), Device::Cpu).unwrap();
    assert_eq!(merged.arch, medmerge_crds::Architecture::MobilenetV3Small);
    assert_eq!(merged.head_prefix(), "classifier.3.", "the new head is the last linear layer; classifier.0 is pretrained");
    assert!(report.export.as_ref().is_some_and(|e| e.int8_bytes > 0), "{:?}", report.export);
}

/// What hospitals `names` upload to a secure-sum run whose base is `base`: each its own
/// vector of that base (every tensor moved by its own seeded pattern, as training would), masked
/// for `session` into `incoming/<name>.masked.safetensors`. Returns the plain vectors (which
/// never leave the hospitals), the keys and the roster.
fn hospitals_upload(dir: &Path, base: &Path, names: &[&str], session: &str) -> (Vec<ShardVector>, Vec<HospitalKey>, Roster) {
    let keys: Vec<HospitalKey> = names.iter().map(|_| HospitalKey::generate()).collect();
    let roster = Roster::parse(&names.iter().zip(&keys).map(|(n, k)| format!("{n}: {}\n", k.public_hex())).collect::<String>()).unwrap();
    std::fs::create_dir_all(dir.join("incoming")).unwrap();
    let mut plain = Vec::new();
    for (i, (name, key)) in names.iter().zip(&keys).enumerate() {
        let tuned = Network::load(base, Device::Cpu).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
        for (_, mut var) in tuned.named_tensors() {
            let shift: Vec<f32> = (0..var.numel()).map(|_| rng.random_range(-1.0f32..1.0) * 1e-2).collect();
            tch::no_grad(|| var.f_add_(&tch::Tensor::from_slice(&shift).view(var.size().as_slice())).map(|_| ())).unwrap();
        }
        let vector = ShardVector { shard: name.to_string(), path: dir.join(format!("{name}-{session}.vector.safetensors")) };
        write_vector(&tuned, base, name, vec![4, 4, 4], &ReleaseSpec::default(), &vector.path).unwrap();
        mask_vector(base, &vector, &roster, name, key, session, &dir.join(format!("incoming/{name}.masked.safetensors"))).unwrap();
        plain.push(vector);
    }
    (plain, keys, roster)
}

/// A secure-sum MergeJob over `shards`' masked uploads, with the tiny job's images and classes.
fn secure_job(dir: &Path, name: &str, shards: &[&str]) -> std::path::PathBuf {
    // No shard has images here, so the classes come from the spec.
    let classes = medmerge_trainer::data::Dataset::open(&dir.join("images"), None).unwrap().classes.join(", ");
    let shard_yaml: String = shards.iter().map(|s| format!("    - {{name: {s}, vector: incoming/{s}.masked.safetensors}}\n")).collect();
    let yaml = format!(
        "apiVersion: medmerge.io/v1alpha1\nkind: MergeJob\nmetadata: {{name: {name}}}\nspec:\n  model: {{architecture: resnet18, weights: random, imageSize: 32, classes: [{classes}]}}\n  shards:\n{shard_yaml}  training: {{epochs: 2, batchSize: 8, learningRate: 0.001}}\n  evaluation: {{data: {{path: test.csv}}}}\n  storage: {{local: {{path: out}}}}\n  restore: {{mode: none}}\n  merge: {{baselines: [], secureSum: {{session: run-1}}}}\n"
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    path
}

fn max_difference(a: &Path, b: &Path) -> f32 {
    let (a, b) = (MappedFile::open(a).unwrap(), MappedFile::open(b).unwrap());
    a.tensors().map(|t| a.f32(&t.name).unwrap().iter().zip(b.f32(&t.name).unwrap()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)).fold(0f32, f32::max)
}

fn plain_merge(base: &Path, vectors: &[ShardVector], out: &Path) {
    let opts = MergeOptions { method: MergeMethod::DataVector, lambda: 2.0, heads: HeadStrategy::Mean, ties_density: 0.2, dare_drop_rate: 0.9, seed: 1, pretrained_only: false };
    merge_checked(base, vectors, &opts, out, Device::Cpu).unwrap();
}

#[test]
fn a_secure_sum_mergejob_merges_masked_uploads_as_the_plain_merge_and_a_dropout_waits_for_shares() {
    let dir = tempfile::tempdir().unwrap();
    tiny_local_job(dir.path(), "", 3).unwrap(); // the images and test set
    let names = ["h0", "h1", "h2"];
    // Each run's base comes from its init stage; the hospitals fine-tune from it and upload masks.
    let runner = Runner::new(Job::load(&secure_job(dir.path(), "secure", &names)).unwrap(), Device::Cpu).unwrap();
    runner.run_stage("init").unwrap();
    let secure = dir.path().join("out/runs/local/secure/g1");
    let base = secure.join("base/model.safetensors");
    let (plain, _, _) = hospitals_upload(dir.path(), &base, &names, "run-1");

    // The coordinator sees only masked uploads; its merge equals the plain one.
    let report = runner.run().unwrap();
    let expected = dir.path().join("plain-three.safetensors");
    plain_merge(&base, &plain, &expected);
    let diff = max_difference(&secure.join("merged/data-vector/model.safetensors"), &expected);
    assert!(diff < 1e-5, "secure and plain merge differ by {diff}");
    assert!(report.candidates[0].description.contains("(secure sum)"), "{}", report.candidates[0].description);
    assert!(report.similarity.is_empty() && report.releases.is_empty(), "nothing about one hospital's vector is reported");

    // A plain vector uploaded where a masked one belongs is refused at collection.
    std::fs::copy(&plain[0].path, dir.path().join("incoming/h0.masked.safetensors")).unwrap();
    let runner = Runner::new(Job::load(&secure_job(dir.path(), "refused", &names)).unwrap(), Device::Cpu).unwrap();
    runner.run_stage("init").unwrap();
    let refused = format!("{:#}", runner.run_stage("collect-h0").unwrap_err());
    assert!(refused.contains("incoming/h0.masked.safetensors refused") && refused.contains("not a masked vector"), "{refused}");

    // h2 drops out (the operator excludes it): the merge names the shares it waits for, waits
    // for them, and then equals the plain merge of h0 and h1.
    let mut job = Job::load(&secure_job(dir.path(), "dropout", &names)).unwrap();
    job.exclude_shards(&["h2".to_string()]).unwrap();
    let runner = Runner::new(job, Device::Cpu).unwrap();
    runner.run_stage("init").unwrap();
    let base = dir.path().join("out/runs/local/dropout/g1/base/model.safetensors");
    let (plain, keys, roster) = hospitals_upload(dir.path(), &base, &names, "run-1");
    for stage in ["collect-h0", "collect-h1"] {
        runner.run_stage(stage).unwrap();
    }
    let waiting = format!("{:#}", runner.run_stage("merge-data-vector").unwrap_err());
    assert!(
        waiting.contains("h2 dropped out") && waiting.contains("incoming/h0.masked.safetensors.dropout-h2.json") && waiting.contains("incoming/h1.masked.safetensors.dropout-h2.json"),
        "{waiting}"
    );
    // The survivors upload their shares while the merge waits (as its cluster Job does).
    let shares: Vec<(PathBuf, Vec<u8>)> = [0, 1]
        .into_iter()
        .map(|i| {
            (dir.path().join(format!("incoming/{}.masked.safetensors.dropout-h2.json", names[i])), serde_json::to_vec(&DropoutShare::new(&roster, names[i], &keys[i], "h2", "run-1").unwrap()).unwrap())
        })
        .collect();
    let upload = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        for (path, bytes) in shares {
            std::fs::write(path, bytes).unwrap();
        }
    });
    runner.wait_for_vector("merge-data-vector", std::time::Duration::from_secs(5)).unwrap();
    upload.join().unwrap();
    runner.run_stage("merge-data-vector").unwrap();
    let two = dir.path().join("plain-two.safetensors");
    plain_merge(&base, &plain[..2], &two);
    let diff = max_difference(&dir.path().join("out/runs/local/dropout/g1/merged/data-vector/model.safetensors"), &two);
    assert!(diff < 1e-5, "with h2's masks removed the merge is h0 + h1's: {diff}");
}
