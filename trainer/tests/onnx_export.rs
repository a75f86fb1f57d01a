//! The ONNX export checked by the tools that will load it: onnx's checker and onnxruntime (from
//! PyPI, installed by scripts/setup-torch.sh into the cache's venv), against medmerge's own
//! logits; and the MobileNetV3 layouts against torchvision itself.

use std::path::{Path, PathBuf};
use std::process::Command;

use medmerge_crds::Architecture;
use medmerge_trainer::export::{quantise_weights, write_onnx, Precision, OPSET};
use medmerge_trainer::model::{write_tensors, Network};
use medmerge_trainer::st::MappedFile;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

fn venv_python() -> PathBuf {
    let cache = std::env::var("MEDMERGE_CACHE").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/medmerge"));
    let python = cache.join("venv/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/setup-torch.sh (make test does)", python.display());
    python
}

fn python(script: &str, args: &[&str]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python").join(script);
    let out = Command::new(venv_python()).arg(path).args(args).output().expect("the venv's python runs");
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn classes(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("class{i}")).collect()
}

/// Batch-norm statistics and affine parameters away from their initial identity, so a wrong
/// epsilon or a mixed-up mean and variance would show in the logits.
fn perturb_batch_norms(net: &Network) {
    tch::manual_seed(11);
    tch::no_grad(|| {
        for bn in net.bns() {
            let b = &bn.inner;
            let c = b.running_mean.size()[0];
            let opts = (Kind::Float, Device::Cpu);
            b.running_mean.shallow_clone().copy_(&(Tensor::randn([c], opts) * 0.1));
            b.running_var.shallow_clone().copy_(&(Tensor::rand([c], opts) + 0.5));
            b.ws.as_ref().unwrap().shallow_clone().copy_(&(Tensor::rand([c], opts) + 0.5));
            b.bs.as_ref().unwrap().shallow_clone().copy_(&(Tensor::randn([c], opts) * 0.1));
        }
    });
}

/// Exports `net`, runs the file in onnxruntime on `pixels` (RGB in [0, 1]) and returns the
/// checker's report; `expected` are the logits onnxruntime must reproduce.
fn check_in_onnxruntime(net: &Network, precision: Precision, pixels: &Tensor, expected: &Tensor, dir: &Path) -> (Value, u64) {
    let onnx = dir.join(format!("{}-{}.onnx", net.arch.as_str(), precision.as_str().len()));
    let bytes = write_onnx(net, &onnx, precision).unwrap();
    let data = dir.join("data.safetensors");
    write_tensors(&data, &[("image".into(), pixels.shallow_clone()), ("logits".into(), expected.shallow_clone())], &Default::default()).unwrap();
    let report: Value = serde_json::from_str(&python("onnx_check.py", &[onnx.to_str().unwrap(), data.to_str().unwrap()])).unwrap();
    (report, bytes)
}

fn normalised(pixels: &Tensor) -> Tensor {
    let mean = Tensor::from_slice(&medmerge_trainer::data::MEAN).view([1, 3, 1, 1]);
    let std = Tensor::from_slice(&medmerge_trainer::data::STD).view([1, 3, 1, 1]);
    (pixels - mean) / std
}

#[test]
fn every_architecture_exports_to_onnx_that_onnxruntime_runs_with_medmerges_logits() {
    let dir = tempfile::tempdir().unwrap();
    for arch in Architecture::ALL {
        let net = Network::new(arch, &classes(3), 64, Device::Cpu, 3);
        perturb_batch_norms(&net);
        let pixels = Tensor::rand([2, 3, 64, 64], (Kind::Float, Device::Cpu));
        let logits = tch::no_grad(|| net.forward_t(&normalised(&pixels), false));
        let (report, _) = check_in_onnxruntime(&net, Precision::Float32, &pixels, &logits, dir.path());
        // Untrained deep networks reach logits in the thousands, where float32 rounding alone is
        // 1e-4; the bound is 1e-4 at logits of a trained model's size and relative above.
        let (diff, largest) = (report["max_abs_diff"].as_f64().unwrap(), report["max_abs_logit"].as_f64().unwrap());
        assert!(diff < 1e-4 * largest.max(1.0), "{}: onnxruntime's logits differ from medmerge's by {diff} (largest logit {largest})", arch.as_str());
        assert_eq!(report["opset"], OPSET, "{}", arch.as_str());
        assert_eq!(report["inputs"], serde_json::json!([["batch", 3, 64, 64]]));
        assert_eq!(report["shape"], serde_json::json!([2, 3]));
        assert_eq!(report["metadata"]["architecture"], arch.as_str());
        assert_eq!(report["metadata"]["classes"], r#"["class0","class1","class2"]"#);
        for s in report["probability_sums"].as_array().unwrap() {
            assert!((s.as_f64().unwrap() - 1.0).abs() < 1e-5, "{}: softmax sums to {s}", arch.as_str());
        }
    }
}

#[test]
fn the_int8_edge_model_computes_what_medmerge_measures_for_it_at_a_quarter_of_the_size() {
    let dir = tempfile::tempdir().unwrap();
    for arch in [Architecture::MobilenetV3Small, Architecture::Resnet18, Architecture::EfficientnetLite0] {
        let mut net = Network::new(arch, &classes(4), 64, Device::Cpu, 5);
        perturb_batch_norms(&net);
        let pixels = Tensor::rand([3, 3, 64, 64], (Kind::Float, Device::Cpu));
        let float_logits = tch::no_grad(|| net.forward_t(&normalised(&pixels), false));
        let (_, float_bytes) = check_in_onnxruntime(&net, Precision::Float32, &pixels, &float_logits, dir.path());
        quantise_weights(&mut net).unwrap();
        let int8_logits = tch::no_grad(|| net.forward_t(&normalised(&pixels), false));
        let (report, int8_bytes) = check_in_onnxruntime(&net, Precision::Int8Weights, &pixels, &int8_logits, dir.path());
        // The same bound as for float32 models: 1e-4, relative above logits of 1 (medmerge's CPU
        // convolutions run channels-last and round in another order than onnxruntime's).
        let (diff, largest) = (report["max_abs_diff"].as_f64().unwrap(), report["max_abs_logit"].as_f64().unwrap());
        assert!(diff < 1e-4 * largest.max(1.0), "{}: int8 model in onnxruntime vs medmerge's quantised network: {diff} (largest logit {largest})", arch.as_str());
        assert!((int8_bytes as f64) < 0.3 * float_bytes as f64, "{}: int8 {int8_bytes} B vs float32 {float_bytes} B", arch.as_str());
        let moved = (&int8_logits - &float_logits).abs().max().double_value(&[]);
        assert!(moved > 0.0, "{}: quantising changed no logit, so the int8 path was not exercised", arch.as_str());
        assert_eq!(report["metadata"]["weights"], Precision::Int8Weights.as_str());
    }
}

#[test]
fn mobilenet_v3_matches_torchvision_tensor_for_tensor_and_logit_for_logit() {
    let dir = tempfile::tempdir().unwrap();
    for (arch, name) in [(Architecture::MobilenetV3Large, "mobilenet_v3_large"), (Architecture::MobilenetV3Small, "mobilenet_v3_small")] {
        let file = dir.path().join(format!("{name}.safetensors"));
        python("torchvision_reference.py", &[name, "5", "96", file.to_str().unwrap()]);
        let reference = MappedFile::open(&file).unwrap();
        let mut net = Network::new(arch, &classes(5), 96, Device::Cpu, 0);
        // Every tensor medmerge's network has must be in torchvision's, with its shape.
        net.copy_from(&reference, |_| true).unwrap();
        let torchvision_names = reference.tensors().filter(|t| !t.name.starts_with("input.") && !t.name.starts_with("output.")).count();
        assert_eq!(net.named_tensors().len(), torchvision_names, "{name}: tensor count");
        let images = Tensor::from_slice(&reference.f32("input.images").unwrap()).view([2, 3, 96, 96]);
        let expected = Tensor::from_slice(&reference.f32("output.logits").unwrap()).view([2, 5]);
        let logits = tch::no_grad(|| net.forward_t(&images, false));
        let diff = (&logits - &expected).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "{name}: medmerge's logits differ from torchvision's by {diff}");
    }
}
