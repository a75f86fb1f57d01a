//! Cutting one labelled set into a held-out test set and N shards: equal random shards (the
//! paper), label-skewed shards drawn from a Dirichlet distribution, or shards of unequal sizes
//! (non-IID hospitals); and subsampling classes to make an imbalanced variant of a balanced set.

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

/// How the images left after the test set are dealt to the shards.
#[derive(Clone, Debug, PartialEq)]
pub enum Skew {
    /// Equal random shards (IID).
    Equal,
    /// Per class, shard proportions drawn from Dirichlet(alpha): label skew.
    Dirichlet(f64),
    /// Random shards with these relative sizes (one per shard): size skew.
    Sizes(Vec<f64>),
}

/// Splits `data`: a stratified `test_fraction` held out, the rest dealt into `shards` shards as
/// `skew` says. The test set depends only on `data`, `test_fraction` and `seed`, so splits that
/// differ only in skew share it.
pub fn split(data: &Dataset, shards: usize, test_fraction: f64, seed: u64, skew: &Skew) -> Split {
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
    match skew {
        Skew::Equal => {
            let mut rest: Vec<usize> = rest_by_class.concat();
            rest.shuffle(&mut rng);
            let n = out.len();
            for (k, i) in rest.into_iter().enumerate() {
                out[k % n].push(i);
            }
        }
        Skew::Sizes(sizes) => {
            let mut rest: Vec<usize> = rest_by_class.concat();
            rest.shuffle(&mut rng);
            let weights: Vec<f64> = (0..out.len()).map(|s| sizes.get(s).copied().unwrap_or(0.0)).collect();
            deal_in_proportion(&rest, &weights, &mut out);
        }
        Skew::Dirichlet(alpha) => {
            let gamma = Gamma::new(*alpha, 1.0).expect("alpha validated positive");
            for idx in rest_by_class {
                let weights: Vec<f64> = (0..out.len()).map(|_| gamma.sample(&mut rng)).collect();
                deal_in_proportion(&idx, &weights, &mut out);
            }
        }
    }
    for s in &mut out {
        s.sort_unstable();
    }
    Split { test, shards: out }
}

/// Cuts `items` into consecutive runs in proportion to `weights` (one per part, summing to more
/// than 0) and appends run `s` to `parts[s]`; the last part takes what rounding leaves.
fn deal_in_proportion(items: &[usize], weights: &[f64], parts: &mut [Vec<usize>]) {
    let total: f64 = weights.iter().sum();
    let (n, last) = (items.len(), parts.len().saturating_sub(1));
    let (mut start, mut acc) = (0, 0.0);
    for (s, (part, w)) in parts.iter_mut().zip(weights).enumerate() {
        acc += w / total;
        let end = if s == last { n } else { ((acc * n as f64).round() as usize).min(n) }.max(start);
        part.extend_from_slice(&items[start..end]);
        start = end;
    }
}

/// Indices of a random subset of `data` whose classes (in label order) are in the proportions
/// `fractions` (relative; one per class), as large as the images allow: an imbalanced variant of
/// a balanced set.
pub fn subsample_classes(data: &Dataset, fractions: &[f64], seed: u64) -> Vec<usize> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_c1a5);
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); data.classes.len()];
    for (i, s) in data.samples.iter().enumerate() {
        by_class[s.label].push(i);
    }
    let total: f64 = fractions.iter().sum();
    let share = |c: usize| fractions.get(c).copied().unwrap_or(0.0) / total;
    // The largest total for which every class has enough images.
    let n = (0..by_class.len()).filter(|&c| share(c) > 0.0).map(|c| by_class[c].len() as f64 / share(c)).fold(f64::INFINITY, f64::min);
    let mut keep = Vec::new();
    for (c, mut idx) in by_class.into_iter().enumerate() {
        idx.shuffle(&mut rng);
        let k = ((n * share(c)).floor() as usize).min(idx.len());
        keep.extend_from_slice(&idx[..k]);
    }
    keep.sort_unstable();
    keep
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
        let s = split(&d, 4, 0.2, 3315, &Skew::Equal);
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
        assert_eq!(split(&d, 3, 0.2, 1, &Skew::Equal), split(&d, 3, 0.2, 1, &Skew::Equal));
        assert_ne!(split(&d, 3, 0.2, 1, &Skew::Equal), split(&d, 3, 0.2, 2, &Skew::Equal));
    }

    #[test]
    fn a_small_dirichlet_alpha_skews_labels_across_shards() {
        let d = data(200);
        let s = split(&d, 4, 0.1, 5, &Skew::Dirichlet(0.1));
        check_partition(&s, 600);
        // With alpha 0.1, most shards are dominated by one class.
        let dominated = s.shards.iter().filter(|sh| !sh.is_empty()).filter(|sh| {
            let top = (0..3).map(|c| sh.iter().filter(|&&i| d.samples[i].label == c).count()).max().unwrap();
            top as f64 > 0.6 * sh.len() as f64
        });
        assert!(dominated.count() >= 2);
    }

    #[test]
    fn size_skewed_shards_follow_the_sizes_and_share_the_test_set_of_the_equal_split() {
        let d = data(100);
        let s = split(&d, 4, 0.2, 9, &Skew::Sizes(vec![50.0, 25.0, 15.0, 10.0]));
        check_partition(&s, 300);
        let sizes: Vec<usize> = s.shards.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![120, 60, 36, 24]);
        assert_eq!(s.test, split(&d, 4, 0.2, 9, &Skew::Equal).test);
    }

    #[test]
    fn subsampled_classes_have_the_asked_proportions() {
        let d = data(100);
        let keep = subsample_classes(&d, &[70.0, 20.0, 10.0], 1);
        let per_class: Vec<usize> = (0..3).map(|c| keep.iter().filter(|&&i| d.samples[i].label == c).count()).collect();
        assert_eq!(per_class, vec![100, 28, 14]);
        assert!(keep.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
    }
}
