//! Secure aggregation on real network vectors: the merge of masked vectors equals the plain
//! merge, a dropped hospital's masks come out with the survivors' shares, and one masked upload
//! looks like uniform noise.

use std::path::{Path, PathBuf};

use medmerge_crds::{Architecture, HeadStrategy, MergeMethod, ReleaseSpec};
use medmerge_trainer::checkpoint::{ArtifactKind, ArtifactMeta};
use medmerge_trainer::merge::{merge_checked, write_vector, MergeOptions, ShardVector};
use medmerge_trainer::model::Network;
use medmerge_trainer::secure::merge::{mask_vector, secure_merge};
use medmerge_trainer::secure::{DropoutShare, HospitalKey, Roster};
use medmerge_trainer::st::MappedFile;
use rand::{Rng, SeedableRng};
use tch::{Device, Tensor};

struct Fixture {
    dir: tempfile::TempDir,
    base: PathBuf,
    names: Vec<String>,
    keys: Vec<HospitalKey>,
    roster: Roster,
    plain: Vec<ShardVector>,
}

/// Four hospitals' vectors of a small ResNet-18 (each tensor moved by its own seeded pattern),
/// their keys and roster.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let classes: Vec<String> = ["x", "y"].iter().map(|c| c.to_string()).collect();
    let net = Network::new(Architecture::Resnet18, &classes, 32, Device::Cpu, 3);
    let meta = ArtifactMeta { kind: ArtifactKind::Model, arch: net.arch, classes, image_size: 32, base_digest: String::new(), shard: None, class_counts: vec![], multi_label: false };
    let base = dir.path().join("base.safetensors");
    net.save(&base, &meta).unwrap();
    let names: Vec<String> = ["h-a", "h-b", "h-c", "h-d"].iter().map(|n| n.to_string()).collect();
    let mut plain = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let tuned = Network::load(&base, Device::Cpu).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
        for (_, mut var) in tuned.named_tensors() {
            let shift: Vec<f32> = (0..var.numel()).map(|_| rng.random_range(-1.0f32..1.0) * 1e-2).collect();
            tch::no_grad(|| var.f_add_(&Tensor::from_slice(&shift).view(var.size().as_slice())).map(|_| ())).unwrap();
        }
        let path = dir.path().join(format!("{name}.safetensors"));
        write_vector(&tuned, &base, name, vec![5, 5], &ReleaseSpec::default(), &path).unwrap();
        plain.push(ShardVector { shard: name.clone(), path });
    }
    let keys: Vec<HospitalKey> = names.iter().map(|_| HospitalKey::generate()).collect();
    let roster = Roster::parse(&names.iter().zip(&keys).map(|(n, k)| format!("{n}: {}\n", k.public_hex())).collect::<String>()).unwrap();
    Fixture { dir, base, names, keys, roster, plain }
}

impl Fixture {
    fn masked(&self, i: usize, session: &str) -> ShardVector {
        let path = self.dir.path().join(format!("{}-{session}.masked.safetensors", self.names[i]));
        mask_vector(&self.base, &self.plain[i], &self.roster, &self.names[i], &self.keys[i], session, &path).unwrap();
        ShardVector { shard: self.names[i].clone(), path }
    }

    fn share(&self, from: usize, dropped: usize, session: &str) -> DropoutShare {
        DropoutShare::new(&self.roster, &self.names[from], &self.keys[from], &self.names[dropped], session).unwrap()
    }

    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.safetensors"))
    }
}

fn opts(method: MergeMethod) -> MergeOptions {
    MergeOptions { method, lambda: 2.0, heads: HeadStrategy::Mean, ties_density: 0.2, dare_drop_rate: 0.9, seed: 1, pretrained_only: false }
}

/// The largest difference between two models' float tensors.
fn max_difference(a: &Path, b: &Path) -> f32 {
    let (a, b) = (MappedFile::open(a).unwrap(), MappedFile::open(b).unwrap());
    a.tensors()
        .filter(|t| t.dtype == safetensors::Dtype::F32)
        .map(|t| a.f32(&t.name).unwrap().iter().zip(b.f32(&t.name).unwrap()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max))
        .fold(0f32, f32::max)
}

#[test]
fn the_merge_of_masked_vectors_equals_the_plain_merge_and_a_dropped_hospital_needs_the_survivors_shares() {
    let f = fixture();
    let masked: Vec<ShardVector> = (0..4).map(|i| f.masked(i, "run-1")).collect();
    for method in [MergeMethod::DataVector, MergeMethod::ParamsMean] {
        let (plain, secure) = (f.out(&format!("plain-{}", method.as_str())), f.out(&format!("secure-{}", method.as_str())));
        merge_checked(&f.base, &f.plain, &opts(method), &plain, Device::Cpu).unwrap();
        secure_merge(&f.base, &masked, &[], &opts(method), &secure, Device::Cpu).unwrap();
        let worst = max_difference(&plain, &secure);
        assert!(worst < 1e-5, "{}: secure sum within float tolerance of the plain merge, worst {worst}", method.as_str());
    }

    // h-c never uploads: the sum of the other three is the merge of their plain vectors once
    // each survivor's pair seed with h-c is known.
    let survivors = vec![masked[0].clone(), masked[1].clone(), masked[3].clone()];
    let stalled = secure_merge(&f.base, &survivors, &[f.share(0, 2, "run-1")], &opts(MergeMethod::DataVector), &f.out("stalled"), Device::Cpu).unwrap_err().to_string();
    assert!(stalled.contains("h-c did not upload") && stalled.contains("h-b about h-c") && stalled.contains("h-d about h-c"), "{stalled}");
    assert!(!f.out("stalled").exists(), "nothing is published without the shares");
    let shares = [f.share(0, 2, "run-1"), f.share(1, 2, "run-1"), f.share(3, 2, "run-1")];
    let (plain, secure) = (f.out("plain-3"), f.out("secure-3"));
    merge_checked(&f.base, &[f.plain[0].clone(), f.plain[1].clone(), f.plain[3].clone()], &opts(MergeMethod::DataVector), &plain, Device::Cpu).unwrap();
    secure_merge(&f.base, &survivors, &shares, &opts(MergeMethod::DataVector), &secure, Device::Cpu).unwrap();
    assert!(max_difference(&plain, &secure) < 1e-5);

    // h-c's upload arriving after its masks were revealed would be readable: refused.
    let late = secure_merge(&f.base, &masked, &shares, &opts(MergeMethod::DataVector), &f.out("late"), Device::Cpu).unwrap_err().to_string();
    assert!(late.contains("h-c's masks were revealed"), "{late}");
    let ties = secure_merge(&f.base, &masked, &[], &opts(MergeMethod::Ties), &f.out("ties"), Device::Cpu).unwrap_err().to_string();
    assert!(ties.contains("needs each vector"), "{ties}");
    let mixed = secure_merge(&f.base, &[masked[0].clone(), f.masked(1, "run-2")], &[], &opts(MergeMethod::DataVector), &f.out("mixed"), Device::Cpu).unwrap_err().to_string();
    assert!(mixed.contains("session"), "uploads of two sessions do not add up: {mixed}");
    let plain_merge = merge_checked(&f.base, &masked, &opts(MergeMethod::DataVector), &f.out("confused"), Device::Cpu).unwrap_err().to_string();
    assert!(plain_merge.contains("masked for secure aggregation"), "{plain_merge}");
}

#[test]
fn a_masked_upload_is_indistinguishable_from_uniform_noise_without_the_pair_seeds() {
    let f = fixture();
    let masked = MappedFile::open(&f.masked(0, "run-1").path).unwrap();
    let plain = MappedFile::open(&f.plain[0].path).unwrap();
    let tensor = "layer4.1.conv2.weight"; // 2.4 M entries
    let words: Vec<u64> = masked.bytes(tensor).unwrap().chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
    let values = plain.f32(tensor).unwrap();
    let n = words.len() as f64;
    assert!(n > 2e6);
    // Every bit is set half of the time (4.5 standard errors).
    for bit in 0..64 {
        let ones = words.iter().filter(|w| (*w >> bit) & 1 == 1).count() as f64;
        assert!((ones / n - 0.5).abs() < 4.5 * 0.5 / n.sqrt(), "bit {bit}: {}", ones / n);
    }
    // The top byte is uniform over its 256 values: chi-square with 255 degrees of freedom
    // (mean 255, sd 22.6) stays far below 400.
    let mut counts = [0f64; 256];
    words.iter().for_each(|w| counts[(w >> 56) as usize] += 1.0);
    let expected = n / 256.0;
    let chi2: f64 = counts.iter().map(|c| (c - expected).powi(2) / expected).sum();
    assert!(chi2 < 400.0, "chi-square {chi2}");
    // And carries nothing of the plain values: the correlation of the words with them is noise.
    let x: Vec<f64> = words.iter().map(|w| *w as i64 as f64).collect();
    let y: Vec<f64> = values.iter().map(|v| *v as f64).collect();
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let cov: f64 = x.iter().zip(&y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let corr = cov / (x.iter().map(|a| (a - mx).powi(2)).sum::<f64>().sqrt() * y.iter().map(|b| (b - my).powi(2)).sum::<f64>().sqrt());
    assert!(corr.abs() < 4.5 / n.sqrt(), "correlation with the plain vector {corr}");
}
