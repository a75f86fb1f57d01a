//! Vectors released from a real network: encodings decode within their stated error and merge
//! close to float32; a private vector is clipped, noised by its stated sigma and says so.

use std::path::{Path, PathBuf};

use medmerge_crds::{Architecture, HeadStrategy, MergeMethod, PrivacySpec, ReleaseSpec, VectorEncoding};
use medmerge_trainer::checkpoint::{ArtifactKind, ArtifactMeta};
use medmerge_trainer::merge::{merge_files, write_vector, MergeOptions, ShardVector};
use medmerge_trainer::model::Network;
use medmerge_trainer::release::encoding::VectorReader;
use medmerge_trainer::release::privacy::l2_norm;
use medmerge_trainer::release::recorded_release;
use medmerge_trainer::st::MappedFile;
use rand::{Rng, SeedableRng};
use tch::{Device, Tensor};

/// A base model, and a "fine-tuned" copy of it with every tensor moved by a seeded pattern of
/// about 1e-2 (a training run would give the same kind of vector, slower).
struct Fixture {
    dir: tempfile::TempDir,
    base: PathBuf,
    tuned: Network,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let classes: Vec<String> = ["x", "y", "z"].iter().map(|c| c.to_string()).collect();
    let net = Network::new(Architecture::Resnet18, &classes, 32, Device::Cpu, 21);
    let meta = ArtifactMeta { kind: ArtifactKind::Model, arch: net.arch, classes, image_size: 32, base_digest: String::new(), shard: None, class_counts: vec![], multi_label: false };
    let base = dir.path().join("base.safetensors");
    net.save(&base, &meta).unwrap();
    let tuned = Network::load(&base, Device::Cpu).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for (_, mut var) in tuned.named_tensors() {
        let shift: Vec<f32> = (0..var.numel()).map(|_| rng.random_range(-1.0f32..1.0) * 1e-2).collect();
        let shift = Tensor::from_slice(&shift).view(var.size().as_slice());
        tch::no_grad(|| var.f_add_(&shift).map(|_| ())).unwrap();
    }
    Fixture { dir, base, tuned }
}

impl Fixture {
    fn write(&self, name: &str, spec: &ReleaseSpec) -> (PathBuf, medmerge_crds::results::ReleaseRecord) {
        let path = self.dir.path().join(format!("{name}.safetensors"));
        let record = write_vector(&self.tuned, &self.base, name, vec![4, 4, 4], spec, &path).unwrap();
        (path, record)
    }

    fn merge(&self, vectors: &[(&str, &Path)]) -> MappedFile {
        let out = self.dir.path().join(format!("merged-{}.safetensors", vectors[0].0));
        let opts = MergeOptions { method: MergeMethod::DataVector, lambda: 1.0, heads: HeadStrategy::Mean, ties_density: 1.0, dare_drop_rate: 0.0, seed: 1, pretrained_only: false };
        let vectors: Vec<ShardVector> = vectors.iter().map(|(s, p)| ShardVector { shard: s.to_string(), path: p.to_path_buf() }).collect();
        merge_files(&self.base, &vectors, &opts, &out).unwrap();
        MappedFile::open(&out).unwrap()
    }
}

fn weight_tensors(reader: &VectorReader) -> Vec<String> {
    reader.tensors().into_iter().filter(|t| t.shape.len() >= 2 && !t.name.starts_with("fc.")).map(|t| t.name).collect()
}

#[test]
fn int8_and_top_k_vectors_decode_within_their_stated_error_shrink_the_upload_and_merge_like_float32() {
    let f = fixture();
    let (exact_path, exact_record) = f.write("exact", &ReleaseSpec::default());
    let (int8_path, int8_record) = f.write("int8", &ReleaseSpec { encoding: VectorEncoding::Int8, ..Default::default() });
    let (topk_path, topk_record) = f.write("topk", &ReleaseSpec { encoding: VectorEncoding::TopK, density: Some(0.1), ..Default::default() });
    let (exact, int8, topk) = (VectorReader::open(&exact_path).unwrap(), VectorReader::open(&int8_path).unwrap(), VectorReader::open(&topk_path).unwrap());
    assert_eq!(exact.tensors(), int8.tensors(), "an encoded vector reads as the same tensors");
    assert_eq!(exact.tensors(), topk.tensors());

    let weights = weight_tensors(&exact);
    assert!(weights.len() >= 20, "{weights:?}");
    for name in &weights {
        let (x, q, k) = (exact.values(name).unwrap(), int8.values(name).unwrap(), topk.values(name).unwrap());
        assert_eq!(int8.encoding_of(name), VectorEncoding::Int8);
        let shape = exact.tensors().into_iter().find(|t| &t.name == name).unwrap().shape;
        let per_channel = x.len() / shape[0];
        for (i, (a, b)) in x.iter().zip(q.iter()).enumerate() {
            let channel = &x[i / per_channel * per_channel..][..per_channel];
            let step = channel.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            assert!((a - b).abs() <= step / 2.0 * 1.0001, "{name}[{i}]: {a} decoded as {b}, step {step}");
        }
        let kept: Vec<usize> = (0..k.len()).filter(|&i| k[i] != 0.0).collect();
        assert_eq!(kept.len(), (x.len() as f64 * 0.1).ceil() as usize, "{name}: the stated share of entries");
        assert!(kept.iter().all(|&i| k[i] == x[i]), "{name}: kept entries are exact");
        let smallest_kept = kept.iter().map(|&i| x[i].abs()).fold(f32::INFINITY, f32::min);
        let largest_dropped = (0..x.len()).filter(|i| k[*i] == 0.0).map(|i| x[i].abs()).fold(0f32, f32::max);
        assert!(smallest_kept >= largest_dropped, "{name}: the largest entries are the ones kept");
    }
    for name in ["fc.weight", "bn1.running_var", "layer1.0.bn1.weight"] {
        assert_eq!(int8.values(name).unwrap(), exact.values(name).unwrap(), "{name} stays float32");
    }

    let (exact_bytes, int8_bytes, topk_bytes) = (exact_record.bytes.unwrap(), int8_record.bytes.unwrap(), topk_record.bytes.unwrap());
    assert_eq!(exact_bytes, std::fs::metadata(&exact_path).unwrap().len());
    assert!(int8_bytes * 10 < exact_bytes * 3, "int8: {int8_bytes} of {exact_bytes} bytes");
    assert!(topk_bytes * 10 < exact_bytes * 3, "top-k 0.1 (value and position): {topk_bytes} of {exact_bytes} bytes");
    assert_eq!(recorded_release(int8.file().metadata()).unwrap().encoding, VectorEncoding::Int8);

    // The streaming merge decodes them: int8 lands within the quantisation step of float32.
    let merged_exact = f.merge(&[("exact", &exact_path)]);
    let merged_int8 = f.merge(&[("int8", &int8_path)]);
    for name in &weights {
        let (a, b) = (merged_exact.f32(name).unwrap(), merged_int8.f32(name).unwrap());
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst <= 0.01 / 127.0, "{name}: merged int8 within one step of merged float32, worst {worst}");
    }
}

#[test]
fn a_private_vector_is_clipped_noised_by_its_stated_sigma_and_withholds_batch_norm_statistics() {
    let f = fixture();
    let (exact_path, _) = f.write("exact", &ReleaseSpec::default());
    let spec = ReleaseSpec { privacy: Some(PrivacySpec { epsilon: 8.0, delta: 1e-6, clip_norm: 1.0 }), ..Default::default() };
    let (private_path, record) = f.write("private", &spec);
    let privacy = record.privacy.expect("the record states the guarantee");
    assert_eq!((privacy.epsilon, privacy.delta, privacy.clip_norm), (8.0, 1e-6, 1.0));
    let (exact, private) = (VectorReader::open(&exact_path).unwrap(), VectorReader::open(&private_path).unwrap());
    assert_eq!(recorded_release(private.file().metadata()).unwrap().privacy, Some(privacy), "the vector itself says what it guarantees");

    let covered: Vec<String> = exact.tensors().into_iter().map(|t| t.name).filter(|n| !n.ends_with("running_mean") && !n.ends_with("running_var")).collect();
    let clean: Vec<Vec<f32>> = covered.iter().map(|n| exact.values(n).unwrap().into_owned()).collect();
    let norm = l2_norm(&clean.iter().map(Vec::as_slice).collect::<Vec<_>>());
    assert!(norm > 1.0, "the vector needs clipping: {norm}");
    let mut residuals = Vec::new();
    for (name, x) in covered.iter().zip(&clean) {
        let y = private.values(name).unwrap();
        residuals.extend(x.iter().zip(y.iter()).map(|(a, b)| *b as f64 - *a as f64 / norm));
    }
    let n = residuals.len() as f64;
    let mean = residuals.iter().sum::<f64>() / n;
    let sd = (residuals.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!((sd / privacy.noise_stddev - 1.0).abs() < 0.01, "noise around the clipped vector has the stated sigma: {sd} vs {}", privacy.noise_stddev);
    assert!(mean.abs() < 5.0 * privacy.noise_stddev / n.sqrt(), "and mean zero: {mean}");
    assert!(private.values("layer1.0.bn1.running_var").unwrap().iter().all(|v| *v == 0.0), "statistics are withheld");
}
