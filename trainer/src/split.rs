//! Cutting one labelled set into a held-out test set and N shards: equal random shards (the
//! paper) or label-skewed shards drawn from a Dirichlet distribution (non-IID hospitals).

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_distr::{Distribution, Gamma};

use crate::data::Dataset;

/// Indices of the test set and of each shard.
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    /// Held-out test indices.
    pub test: Vec<usize>,
    /// Per-shard indices.
    pub shards: Vec<Vec<usize>>,
}

/// Splits `data`: a stratified `test_fraction` held out, the rest dealt into `shards` shards,
/// equally at random, or per class by Dirichlet(`alpha`) proportions when `dirichlet_alpha` is set.
pub fn split(data: &Dataset, shards: usize, test_fraction: f64, seed: u64, dirichlet_alpha: Option<f64>) -> Split {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); data.classes.len()];
    for (i, s) in data.samples.iter().enumerate() {
        by_class[s.label].push(i);
    }
    let mut test = Vec::new();
    let mut rest_by_class = Vec::new();
    for mut idx in by_class {
        idx.shuffle(&mut rng);
        let n_test = (idx.len() as f64 * test_fraction).round() as usize;
        test.extend_from_slice(&idx[..n_test]);
        rest_by_class.push(idx[n_test..].to_vec());
    }
    test.sort_unstable();
    let mut out = vec![Vec::new(); shards.max(1)];
    match dirichlet_alpha {
        None => {
            let mut rest: Vec<usize> = rest_by_class.concat();
            rest.shuffle(&mut rng);
            let n = out.len();
            for (k, i) in rest.into_iter().enumerate() {
                out[k % n].push(i);
            }
        }
        Some(alpha) => {
            let gamma = Gamma::new(alpha, 1.0).expect("alpha validated positive");
            for idx in rest_by_class {
                let w: Vec<f64> = (0..out.len()).map(|_| gamma.sample(&mut rng)).collect();
                let total: f64 = w.iter().sum();
                let mut start = 0;
                let mut acc = 0.0;
                let n = out.len();
                for (s, wi) in w.iter().enumerate() {
                    acc += wi / total;
                    let end = if s + 1 == n { idx.len() } else { ((acc * idx.len() as f64).round() as usize).min(idx.len()) };
                    out[s].extend_from_slice(&idx[start..end.max(start)]);
                    start = end.max(start);
                }
            }
        }
    }
    for s in &mut out {
        s.sort_unstable();
    }
    Split { test, shards: out }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Sample;

    fn data(per_class: usize) -> Dataset {
        let samples = (0..3 * per_class).map(|i| Sample { path: format!("{i}.png").into(), label: i % 3, targets: vec![] }).collect();
        Dataset { source: "x".into(), classes: vec!["a".into(), "b".into(), "c".into()], samples, multi_label: false }
    }

    fn check_partition(s: &Split, n: usize) {
        let mut all: Vec<usize> = s.test.iter().chain(s.shards.iter().flatten()).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>(), "every image in exactly one part");
    }

    #[test]
    fn equal_split_is_a_stratified_partition_with_equal_shards() {
        let d = data(50);
        let s = split(&d, 4, 0.2, 3315, None);
        check_partition(&s, 150);
        assert_eq!(s.test.len(), 30);
        for c in 0..3 {
            assert_eq!(s.test.iter().filter(|&&i| d.samples[i].label == c).count(), 10);
        }
        let sizes: Vec<usize> = s.shards.iter().map(Vec::len).collect();
        assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{sizes:?}");
    }

    #[test]
    fn the_same_seed_gives_the_same_split() {
        let d = data(20);
        assert_eq!(split(&d, 3, 0.2, 1, None), split(&d, 3, 0.2, 1, None));
        assert_ne!(split(&d, 3, 0.2, 1, None), split(&d, 3, 0.2, 2, None));
    }

    #[test]
    fn a_small_dirichlet_alpha_skews_labels_across_shards() {
        let d = data(200);
        let s = split(&d, 4, 0.1, 5, Some(0.1));
        check_partition(&s, 600);
        // With alpha 0.1, most shards are dominated by one class.
        let dominated = s.shards.iter().filter(|sh| !sh.is_empty()).filter(|sh| {
            let top = (0..3).map(|c| sh.iter().filter(|&&i| d.samples[i].label == c).count()).max().unwrap();
            top as f64 > 0.6 * sh.len() as f64
        });
        assert!(dominated.count() >= 2);
    }
}
