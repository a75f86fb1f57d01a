//! A small generated, labelled image set for demos and tests, so neither needs patient data.

use std::path::Path;

use image::{Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Class names of the generated set, in order.
pub const CLASSES: [&str; 4] = ["disc", "square", "stripes", "cross"];

/// Writes `per_class` PNG images of `size` pixels per class (the first `classes` of
/// [`CLASSES`]) as an ImageFolder under `out`. Each class is a shape drawn with random position,
/// size, colour and noise, so a model has to learn shape, not a constant colour.
pub fn generate(out: &Path, classes: usize, per_class: usize, size: u32, seed: u64) -> std::io::Result<()> {
    generate_noisy(out, classes, per_class, size, seed, 20)
}

/// [`generate`] with per-pixel noise of up to ±`noise` grey levels (20 in [`generate`]); more
/// noise makes the shapes harder to tell apart, so small hospitals stay well below 100 %.
pub fn generate_noisy(out: &Path, classes: usize, per_class: usize, size: u32, seed: u64, noise: i16) -> std::io::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    for (c, name) in CLASSES.iter().take(classes.clamp(2, CLASSES.len())).enumerate() {
        let dir = out.join(name);
        std::fs::create_dir_all(&dir)?;
        for i in 0..per_class {
            let img = draw(c, size, noise.clamp(0, 255), &mut rng);
            img.save(dir.join(format!("{name}-{i:04}.png"))).map_err(std::io::Error::other)?;
        }
    }
    Ok(())
}

fn draw(class: usize, size: u32, noise: i16, rng: &mut StdRng) -> RgbImage {
    let s = size as f32;
    let (cx, cy) = (rng.random_range(0.35..0.65) * s, rng.random_range(0.35..0.65) * s);
    let r = rng.random_range(0.18..0.3) * s;
    let fg = [rng.random_range(150..255u8), rng.random_range(60..200u8), rng.random_range(40..160u8)];
    let bg = rng.random_range(10..60u8);
    let mut img = RgbImage::new(size, size);
    for (x, y, p) in img.enumerate_pixels_mut() {
        let (dx, dy) = (x as f32 - cx, y as f32 - cy);
        let inside = match class {
            0 => dx * dx + dy * dy <= r * r,
            1 => dx.abs() <= r && dy.abs() <= r,
            2 => dx.abs() <= r * 1.2 && dy.abs() <= r * 1.2 && ((y as f32 / (r / 2.5)) as i32) % 2 == 0,
            _ => (dx.abs() <= r / 3.0 && dy.abs() <= r * 1.2) || (dy.abs() <= r / 3.0 && dx.abs() <= r * 1.2),
        };
        let jitter = |rng: &mut StdRng| rng.random_range(-noise..=noise);
        let base = if inside { fg } else { [bg, bg, bg] };
        *p = Rgb([0, 1, 2].map(|i| (base[i] as i16 + jitter(rng)).clamp(0, 255) as u8));
    }
    img
}

/// A tiny MergeJob for tests and first tries: ResNet-18 from random weights at 32 px over
/// generated images (3 classes, 24 per class) cut into `shards` equal hospitals and a test
/// set, two training epochs, its spec extended by `extra_spec` (YAML lines indented under
/// `spec:`) and storing artifacts in `storage` (a YAML flow mapping, e.g. `{local: {path: out}}`).
/// Writes the images, manifests (`s<i>.csv`, `test.csv`) and `job.yaml` into `dir`; returns the
/// job's path.
pub fn tiny_job(dir: &Path, extra_spec: &str, shards: usize, storage: &str) -> anyhow::Result<std::path::PathBuf> {
    let data = dir.join("images");
    generate(&data, 3, 24, 32, 7)?;
    let ds = crate::data::Dataset::open(&data, None)?;
    let s = crate::split::split(&ds, shards, 0.25, 1, &crate::split::Skew::Equal);
    ds.subset(&s.test).write_manifest(&dir.join("test.csv"))?;
    let mut shard_yaml = String::new();
    for (i, idx) in s.shards.iter().enumerate() {
        ds.subset(idx).write_manifest(&dir.join(format!("s{i}.csv")))?;
        shard_yaml.push_str(&format!("    - {{name: h{i}, data: {{path: s{i}.csv}}}}\n"));
    }
    let yaml = format!(
        "apiVersion: medmerge.io/v1alpha1\nkind: MergeJob\nmetadata: {{name: tiny}}\nspec:\n  model: {{architecture: resnet18, weights: random, imageSize: 32}}\n  shards:\n{shard_yaml}  training: {{epochs: 2, batchSize: 8, learningRate: 0.001}}\n  evaluation: {{data: {{path: test.csv}}}}\n  storage: {storage}\n{extra_spec}"
    );
    let job = dir.join("job.yaml");
    std::fs::write(&job, yaml)?;
    Ok(job)
}

/// [`tiny_job`] storing artifacts on the local disk, under `dir/out`.
pub fn tiny_local_job(dir: &Path, extra_spec: &str, shards: usize) -> anyhow::Result<std::path::PathBuf> {
    tiny_job(dir, extra_spec, shards, "{local: {path: out}}")
}
