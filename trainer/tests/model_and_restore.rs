//! Networks on real libtorch: weight import, save/load round trips, and the exactness of
//! combining shards' batch-norm moments.

use medmerge_crds::Architecture;
use medmerge_trainer::checkpoint::{ArtifactKind, ArtifactMeta};
use medmerge_trainer::data::Dataset;
use medmerge_trainer::model::{tensor_to_vec, write_tensors, Network};
use medmerge_trainer::restore::{collect_moments, combine_moments, mean_var};
use medmerge_trainer::synth;
use tch::{Device, Kind, Tensor};

fn classes() -> Vec<String> {
    vec!["x".into(), "y".into(), "z".into()]
}

#[test]
fn torchvision_named_weights_import_everything_but_the_head() {
    let dir = tempfile::tempdir().unwrap();
    // A torchvision-style checkpoint: 1000-class head and integer num_batches_tracked counters.
    let donor = Network::new(Architecture::Resnet18, &(0..1000).map(|i| i.to_string()).collect::<Vec<_>>(), 32, Device::Cpu, 11);
    let mut tensors = donor.named_tensors();
    tensors.retain(|(n, _)| !n.starts_with("fc."));
    tensors.push(("fc.weight".into(), Tensor::zeros([1000, 512], (Kind::Float, Device::Cpu))));
    let path = dir.path().join("resnet18-torchvision.safetensors");
    write_tensors(&path, &tensors, &Default::default()).unwrap();

    let mut net = Network::new(Architecture::Resnet18, &classes(), 32, Device::Cpu, 99);
    let head_before = tensor_to_vec(&net.vs.variables()["fc.weight"]).unwrap();
    net.import_pretrained(&path).unwrap();
    let vars = net.vs.variables();
    let donor_vars = donor.vs.variables();
    for name in ["conv1.weight", "layer4.1.bn2.running_var", "layer2.0.downsample.0.weight"] {
        assert_eq!(tensor_to_vec(&vars[name]).unwrap(), tensor_to_vec(&donor_vars[name]).unwrap(), "{name}");
    }
    assert_eq!(tensor_to_vec(&vars["fc.weight"]).unwrap(), head_before, "the head stays new");
}

#[test]
fn importing_weights_of_another_architecture_names_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let donor = Network::new(Architecture::Resnet18, &classes(), 32, Device::Cpu, 1);
    let path = dir.path().join("r18.safetensors");
    write_tensors(&path, &donor.named_tensors(), &Default::default()).unwrap();
    let mut net = Network::new(Architecture::Resnet50, &classes(), 32, Device::Cpu, 1);
    let msg = net.import_pretrained(&path).unwrap_err().to_string();
    assert!(msg.contains("r18.safetensors") && msg.contains("resnet50"), "{msg}");
}

#[test]
fn a_saved_model_loads_back_identically() {
    let dir = tempfile::tempdir().unwrap();
    let net = Network::new(Architecture::EfficientnetLite0, &classes(), 32, Device::Cpu, 5);
    let meta = ArtifactMeta { kind: ArtifactKind::Model, arch: net.arch, classes: classes(), image_size: 32, base_digest: String::new(), shard: None, class_counts: vec![], multi_label: false };
    let path = dir.path().join("m.safetensors");
    net.save(&path, &meta).unwrap();
    let back = Network::load(&path, Device::Cpu).unwrap();
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let a = tensor_to_vec(&net.forward_t(&x, false)).unwrap();
    let b = tensor_to_vec(&back.forward_t(&x, false)).unwrap();
    assert_eq!(a, b);
}

#[test]
fn combining_shard_moments_equals_one_pass_over_all_shards() {
    let dir = tempfile::tempdir().unwrap();
    synth::generate(dir.path(), 3, 8, 32, 3).unwrap();
    let all = Dataset::open(dir.path(), None).unwrap();
    let net = Network::new(Architecture::Resnet18, &all.classes, 32, Device::Cpu, 2);
    // Shards of 8 images and batches of 4: the union pass sees exactly the shards' batches.
    let shard_a = all.subset(&(0..8).collect::<Vec<_>>());
    let shard_b = all.subset(&(8..24).collect::<Vec<_>>());
    let parts = [collect_moments(&net, &shard_a, 4, Device::Cpu).unwrap(), collect_moments(&net, &shard_b, 4, Device::Cpu).unwrap()];
    let combined = combine_moments(&parts);
    let pooled = collect_moments(&net, &all, 4, Device::Cpu).unwrap();
    assert_eq!(combined.len(), net.bns().len());
    for (layer, (n, s, q)) in &pooled {
        let (cn, cs, cq) = &combined[layer];
        assert_eq!(n, cn);
        let (m1, v1) = mean_var(*n, s, q);
        let (m2, v2) = mean_var(*cn, cs, cq);
        for (a, b) in m1.iter().zip(&m2).chain(v1.iter().zip(&v2)) {
            assert!((a - b).abs() <= 1e-9 * (1.0 + a.abs()), "{layer}: {a} vs {b}");
        }
    }
}

#[test]
fn architectures_have_torchvision_parameter_counts() {
    let imagenet: Vec<String> = (0..1000).map(|i| i.to_string()).collect();
    let cases = [
        (Architecture::Resnet18, 11_689_512i64),
        (Architecture::Resnet50, 25_557_032),
        (Architecture::MobilenetV2, 3_504_872),
        (Architecture::MobilenetV3Large, 5_483_032),
        (Architecture::MobilenetV3Small, 2_542_856),
        (Architecture::EfficientnetB0, 5_288_548),
        (Architecture::EfficientnetLite0, 4_652_008),
    ];
    for (arch, expected) in cases {
        let net = Network::new(arch, &imagenet, 64, Device::Cpu, 0);
        let params: i64 = net.vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
        assert_eq!(params, expected, "{}", arch.as_str());
        let out = net.forward_t(&Tensor::zeros([1, 3, 64, 64], (Kind::Float, Device::Cpu)), false);
        assert_eq!(out.size(), vec![1, 1000]);
    }
}

#[test]
fn the_shipped_imagenet_lite0_checkpoint_imports_completely() {
    // Installed by scripts/setup-torch.sh, which `make test` runs first.
    let path = medmerge_trainer::model::builtin_weights_path();
    let mut net = Network::new(Architecture::EfficientnetLite0, &classes(), 64, Device::Cpu, 0);
    net.import_pretrained(&path).unwrap_or_else(|e| panic!("{e}"));
    let file = medmerge_trainer::st::MappedFile::open(&path).unwrap();
    let stem = file.f32("_conv_stem.weight").unwrap();
    assert_eq!(tensor_to_vec(&net.vs.variables()["_conv_stem.weight"]).unwrap(), stem);
    assert_eq!(file.tensors().filter(|t| !t.name.starts_with("_fc.")).count(), net.named_tensors().len() - 2);
}

#[test]
fn a_model_with_a_negative_running_variance_or_a_nan_weight_is_refused_naming_the_layer() {
    let net = Network::new(Architecture::Resnet18, &classes(), 32, Device::Cpu, 5);
    net.check_valid().expect("a fresh network is valid");
    let vars = net.vs.variables();
    let var = vars["layer2.0.bn1.running_var"].shallow_clone();
    let _ = tch::no_grad(|| var.get(3).fill_(-0.5));
    let msg = net.check_valid().unwrap_err().to_string();
    assert!(msg.contains("layer2.0.bn1") && msg.contains("negative"), "{msg}");
    let _ = tch::no_grad(|| var.get(3).fill_(1.0));
    let w = vars["layer3.1.conv2.weight"].shallow_clone();
    let _ = tch::no_grad(|| w.get(0).fill_(f64::NAN));
    let msg = net.check_valid().unwrap_err().to_string();
    assert!(msg.contains("layer3.1.conv2.weight"), "{msg}");
    let _ = tch::no_grad(|| w.get(0).fill_(0.0));
    // The last element of a conv weight (last in memory too, channels-last or not),
    // and an infinity rather than a NaN: the check reads every element, whatever the layout.
    let last = vars["layer4.1.conv2.weight"].shallow_clone();
    let size = last.size();
    let _ = tch::no_grad(|| last.get(size[0] - 1).get(size[1] - 1).get(size[2] - 1).get(size[3] - 1).fill_(f64::INFINITY));
    let msg = net.check_valid().unwrap_err().to_string();
    assert!(msg.contains("layer4.1.conv2.weight"), "{msg}");
}

#[test]
fn shards_head_statistics_add_up_to_those_of_the_pooled_images_and_fit_a_head() {
    use medmerge_trainer::restore::head;
    let dir = tempfile::tempdir().unwrap();
    synth::generate(dir.path(), 3, 8, 32, 4).unwrap();
    let data = Dataset::open(dir.path(), None).unwrap();
    let net = Network::new(Architecture::Resnet18, &data.classes, 32, Device::Cpu, 2);
    let (a, b): (Vec<usize>, Vec<usize>) = (0..data.samples.len()).partition(|i| i % 3 == 0);
    let parts = vec![head::collect_class_features(&net, &data.subset(&a), 5, Device::Cpu).unwrap(), head::collect_class_features(&net, &data.subset(&b), 7, Device::Cpu).unwrap()];
    let path = dir.path().join("part.safetensors");
    let meta =
        ArtifactMeta { kind: ArtifactKind::Model, arch: net.arch, classes: data.classes.clone(), image_size: 32, base_digest: String::new(), shard: None, class_counts: vec![], multi_label: false };
    head::save(&path, &parts[0], &meta).unwrap();
    let first = head::load(&path).unwrap();
    let combined = head::combine(vec![first, parts.into_iter().nth(1).unwrap()]).unwrap();
    let pooled = head::collect_class_features(&net, &data, 4, Device::Cpu).unwrap();
    assert_eq!(combined.counts, pooled.counts);
    assert!(combined.sums.allclose(&pooled.sums, 1e-6, 1e-9, false));
    assert!(combined.gram.allclose(&pooled.gram, 1e-6, 1e-9, false));
    let (w, bias, present) = head::fit_lda(&combined, head::SHRINKAGE).unwrap();
    head::apply_head(&net, &w, &bias, &present).unwrap();
    assert_eq!(tensor_to_vec(&net.vs.variables()["fc.weight"]).unwrap(), tensor_to_vec(&w).unwrap());
    net.check_valid().unwrap();
}

#[test]
fn with_a_validation_hold_out_the_epoch_with_the_best_balanced_accuracy_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    synth::generate(dir.path(), 3, 12, 32, 6).unwrap();
    let data = Dataset::open(dir.path(), None).unwrap();
    let mut net = Network::new(Architecture::Resnet18, &data.classes, 32, Device::Cpu, 3);
    let spec = medmerge_crds::TrainingSpec { epochs: 4, batch_size: 6, learning_rate: 1e-3, validation_fraction: 0.3, ..Default::default() };
    let report = medmerge_trainer::train::train(&mut net, &data, &spec, Device::Cpu, "test").unwrap();
    let balanced: Vec<f64> = report.epochs.iter().map(|e| e.validation_balanced_accuracy.expect("every epoch is validated")).collect();
    let best = balanced.iter().copied().fold(f64::MIN, f64::max);
    // The first epoch reaching the best balanced accuracy is the one kept.
    let first_best = balanced.iter().position(|&b| b == best).unwrap() as u32 + 1;
    assert_eq!(report.best_epoch, first_best, "balanced accuracies per epoch: {balanced:?}");
    assert!(report.epochs.iter().all(|e| e.validation_accuracy.is_some()));
}
