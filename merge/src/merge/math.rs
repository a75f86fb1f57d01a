//! Merge arithmetic on one tensor at a time: pure functions over flat f32 slices, so the
//! streaming merge holds one tensor per shard in memory and the math can be tested exactly.

use rand::rngs::StdRng;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// `pre + lambda * sum(taus)` (the paper's data-vector merge).
pub fn data_vector(pre: &[f32], taus: &[&[f32]], lambda: f32) -> Vec<f32> {
    let mut out = pre.to_vec();
    for tau in taus {
        for (o, t) in out.iter_mut().zip(tau.iter()) {
            *o += lambda * t;
        }
    }
    out
}

/// `out += scale * tau`, entry by entry.
pub fn add_scaled(out: &mut [f32], tau: &[f32], scale: f32) {
    for (o, t) in out.iter_mut().zip(tau) {
        *o += scale * t;
    }
}

/// Whether every value is finite (no NaN, no infinity).
pub fn all_finite(values: &[f32]) -> bool {
    // Branch-free per chunk so it vectorises: a value is non-finite when its exponent is all ones.
    values.chunks(1024).all(|chunk| chunk.iter().fold(true, |ok, v| ok & (v.to_bits() & 0x7f80_0000 != 0x7f80_0000)))
}

/// `pre + r`, with `r` a Gaussian direction scaled to the norm of `lambda * sum(taus)`: a control
/// that moves as far as the data vector, in no meaningful direction.
pub fn random_vector(pre: &[f32], taus: &[&[f32]], lambda: f32, rng: &mut StdRng) -> Vec<f32> {
    let target_norm: f64 = {
        let sum = data_vector(&vec![0.0; pre.len()], taus, lambda);
        sum.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt()
    };
    let r: Vec<f32> = (0..pre.len()).map(|_| StandardNormal.sample(rng)).collect();
    let r_norm: f64 = r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
    let scale = if r_norm > 0.0 { (target_norm / r_norm) as f32 } else { 0.0 };
    pre.iter().zip(&r).map(|(p, v)| p + scale * v).collect()
}

/// TIES-merging: keep each vector's top `density` fraction by magnitude, elect a sign per entry
/// by the summed trimmed values, average the entries that agree with it, scale by `lambda`.
pub fn ties(pre: &[f32], taus: &[&[f32]], lambda: f32, density: f64) -> Vec<f32> {
    let trimmed: Vec<Vec<f32>> = taus.iter().map(|t| trim_top(t, density)).collect();
    let mut out = pre.to_vec();
    for (j, o) in out.iter_mut().enumerate() {
        let total: f32 = trimmed.iter().map(|t| t[j]).sum();
        let sign = total.signum();
        if total == 0.0 {
            continue;
        }
        let (mut sum, mut n) = (0.0f32, 0u32);
        for t in &trimmed {
            if t[j] != 0.0 && t[j].signum() == sign {
                sum += t[j];
                n += 1;
            }
        }
        if n > 0 {
            *o += lambda * sum / n as f32;
        }
    }
    out
}

/// Zeroes all but the `density` fraction of largest-magnitude entries (ties at the threshold kept).
pub fn trim_top(t: &[f32], density: f64) -> Vec<f32> {
    let k = ((t.len() as f64) * density).ceil() as usize;
    if k >= t.len() {
        return t.to_vec();
    }
    if k == 0 {
        return vec![0.0; t.len()];
    }
    let mut mags: Vec<f32> = t.iter().map(|v| v.abs()).collect();
    let (_, kth, _) = mags.select_nth_unstable_by(t.len() - k, |a, b| a.total_cmp(b));
    let threshold = *kth;
    t.iter().map(|&v| if v.abs() >= threshold { v } else { 0.0 }).collect()
}

/// DARE: drop each entry of each vector with probability `drop_rate`, rescale survivors by
/// `1 / (1 - drop_rate)`, then `pre + lambda * sum`.
pub fn dare(pre: &[f32], taus: &[&[f32]], lambda: f32, drop_rate: f64, rng: &mut StdRng) -> Vec<f32> {
    let keep_scale = (1.0 / (1.0 - drop_rate)) as f32;
    let mut out = pre.to_vec();
    for tau in taus {
        for (o, t) in out.iter_mut().zip(tau.iter()) {
            if !rng.random_bool(drop_rate) {
                *o += lambda * keep_scale * t;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const PRE: [f32; 4] = [1.0, 2.0, 3.0, 4.0];
    const T1: [f32; 4] = [0.5, -1.0, 0.0, 2.0];
    const T2: [f32; 4] = [1.5, 1.0, -0.25, 2.0];

    #[test]
    fn data_vector_adds_lambda_times_the_sum() {
        assert_eq!(data_vector(&PRE, &[&T1, &T2], 0.5), vec![2.0, 2.0, 2.875, 6.0]);
    }

    #[test]
    fn random_vector_keeps_the_norm_of_the_scaled_sum() {
        let mut rng = StdRng::seed_from_u64(7);
        let out = random_vector(&PRE, &[&T1, &T2], 0.5, &mut rng);
        let moved: f32 = out.iter().zip(PRE).map(|(o, p)| (o - p).powi(2)).sum::<f32>().sqrt();
        let expected: f32 = data_vector(&[0.0; 4], &[&T1, &T2], 0.5).iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((moved - expected).abs() < 1e-5, "{moved} vs {expected}");
        assert_ne!(out, data_vector(&PRE, &[&T1, &T2], 0.5));
    }

    #[test]
    fn trim_keeps_the_largest_magnitudes() {
        assert_eq!(trim_top(&[0.1, -3.0, 2.0, 0.5], 0.5), vec![0.0, -3.0, 2.0, 0.0]);
        assert_eq!(trim_top(&[1.0, 2.0], 1.0), vec![1.0, 2.0]);
    }

    #[test]
    fn ties_averages_only_entries_agreeing_with_the_elected_sign() {
        // density 1: no trimming. Entry 1: -1 and +1 sum to 0 -> nothing added.
        // Entry 2: 0 and -0.25 -> sign -, mean over the one agreeing entry = -0.25.
        let out = ties(&PRE, &[&T1, &T2], 1.0, 1.0);
        assert_eq!(out, vec![1.0 + 1.0, 2.0, 3.0 - 0.25, 4.0 + 2.0]);
    }

    #[test]
    fn dare_without_drops_is_the_data_vector() {
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(dare(&PRE, &[&T1, &T2], 0.5, 0.0, &mut rng), data_vector(&PRE, &[&T1, &T2], 0.5));
    }

    #[test]
    fn dare_rescales_the_survivors() {
        let mut rng = StdRng::seed_from_u64(3);
        let tau = vec![1.0f32; 10_000];
        let out = dare(&vec![0.0; 10_000], &[&tau], 1.0, 0.5, &mut rng);
        assert!(out.iter().all(|v| *v == 0.0 || *v == 2.0));
        let mean = out.iter().sum::<f32>() / 10_000.0;
        assert!((mean - 1.0).abs() < 0.05, "expected to be unbiased, mean {mean}");
    }

    #[test]
    fn all_finite_spots_nan_and_infinities_anywhere() {
        let mut v = vec![1.0f32; 3000];
        assert!(all_finite(&v));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            v[2500] = bad;
            assert!(!all_finite(&v), "{bad}");
        }
        assert!(all_finite(&[f32::MAX, f32::MIN_POSITIVE, -0.0]));
    }
}
