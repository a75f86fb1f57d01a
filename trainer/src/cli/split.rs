//! Cuts an ImageFolder into a held-out test set and shards (IID, label-, size- or class-skewed).

use std::path::PathBuf;

use medmerge_trainer::data::Dataset;
use medmerge_trainer::split;
use tch::Device;

use crate::stdout::say;

/// The subcommand's flags.
#[derive(clap::Args)]
pub struct Args {
    /// ImageFolder to split.
    #[arg(long)]
    data: PathBuf,
    /// Output directory for test.csv and shard-N.csv.
    #[arg(long)]
    out: PathBuf,
    /// Number of shards.
    #[arg(long, default_value_t = 4)]
    shards: usize,
    /// Fraction held out for testing (stratified).
    #[arg(long, default_value_t = 0.2)]
    test_fraction: f64,
    /// Seed.
    #[arg(long, default_value_t = 3315)]
    seed: u64,
    /// Label-skewed (non-IID) shards with this Dirichlet concentration instead of equal random ones.
    #[arg(long, conflicts_with = "sizes")]
    dirichlet: Option<f64>,
    /// Size-skewed shards with these relative sizes, comma-separated (one per shard, e.g. 50,25,15,10).
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<f64>,
    /// Before splitting, subsample the classes (in label order) to these relative
    /// proportions, comma-separated (e.g. 70,15,10,5): an imbalanced variant.
    #[arg(long, value_delimiter = ',')]
    class_fractions: Vec<f64>,
}

/// Runs the subcommand.
pub fn run(Args { data, out, shards, test_fraction, seed, dirichlet, sizes, class_fractions }: Args, _dev: Device) -> anyhow::Result<()> {
    anyhow::ensure!(shards >= 1, "--shards must be at least 1");
    anyhow::ensure!((0.0..1.0).contains(&test_fraction), "--test-fraction must be in [0, 1)");
    let positive = |v: &[f64]| v.iter().all(|x| x.is_finite() && *x >= 0.0) && v.iter().sum::<f64>() > 0.0;
    let skew = match (dirichlet, sizes.is_empty()) {
        (Some(a), _) => {
            anyhow::ensure!(a.is_finite() && a > 0.0, "--dirichlet must be positive");
            split::Skew::Dirichlet(a)
        }
        (None, false) => {
            anyhow::ensure!(sizes.len() == shards && positive(&sizes), "--sizes needs {shards} non-negative numbers (one per shard), not all 0");
            split::Skew::Sizes(sizes)
        }
        (None, true) => split::Skew::Equal,
    };
    let mut ds = Dataset::open(&data, None)?;
    if !class_fractions.is_empty() {
        let k = ds.classes.len();
        anyhow::ensure!(class_fractions.len() == k && positive(&class_fractions), "--class-fractions needs {k} non-negative numbers (one per class: {}), not all 0", ds.classes.join(", "));
        ds = ds.subset(&split::subsample_classes(&ds, &class_fractions, seed));
    }
    let s = split::split(&ds, shards, test_fraction, seed, &skew);
    ds.subset(&s.test).write_manifest(&out.join("test.csv"))?;
    for (i, idx) in s.shards.iter().enumerate() {
        let sub = ds.subset(idx);
        sub.write_manifest(&out.join(format!("shard-{}.csv", i + 1)))?;
        say!("shard-{}: {} images, per class {:?}", i + 1, idx.len(), sub.class_counts());
    }
    say!("test: {} images; manifests in {}", s.test.len(), out.display());
    Ok(())
}
