//! Differential privacy for one release of a data vector: clip its L2 norm to `C`, add Gaussian
//! noise of standard deviation `sigma` to every entry (output perturbation).
//!
//! Sensitivity: every clipped vector lies in the ball of radius `C`, so the vectors trained on
//! any two datasets differ by at most `2C`, whatever the training did. The guarantee is
//! therefore at the level of the hospital's whole training set (and so of any one patient), for
//! this one release. `sigma` comes from the analytic Gaussian mechanism (Balle and Wang, ICML
//! 2018, Theorem 8), which is exact for every epsilon, where the textbook
//! `sqrt(2 ln(1.25/δ)) Δ/ε` holds only below epsilon 1 and overshoots there.

use rand::Rng;
use rand_distr::{Distribution, Normal};

/// Standard normal cumulative distribution.
fn phi(x: f64) -> f64 {
    0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
}

/// The smallest delta for which Gaussian noise of `sigma` on a query of L2 sensitivity
/// `sensitivity` is (epsilon, delta)-DP (Balle and Wang, Theorem 8).
pub fn gaussian_delta(epsilon: f64, sensitivity: f64, sigma: f64) -> f64 {
    let a = sensitivity / (2.0 * sigma);
    let b = epsilon * sigma / sensitivity;
    // e^ε Φ(−a − b) underflows to 0 · ∞ for large ε; in logs it stays finite.
    let second = (epsilon + phi(-a - b).ln()).exp();
    (phi(a - b) - second).max(0.0)
}

/// The smallest noise standard deviation that makes a query of L2 sensitivity `sensitivity`
/// (epsilon, delta)-DP, to a relative precision of 1e-9 (bisection: the delta a sigma allows
/// falls as sigma grows).
pub fn calibrate_sigma(epsilon: f64, delta: f64, sensitivity: f64) -> f64 {
    let (mut low, mut high) = (0.0_f64, sensitivity);
    while gaussian_delta(epsilon, sensitivity, high) > delta {
        high *= 2.0;
    }
    while (high - low) > 1e-9 * high {
        let mid = 0.5 * (low + high);
        if gaussian_delta(epsilon, sensitivity, mid) > delta {
            low = mid;
        } else {
            high = mid;
        }
    }
    high
}

/// The L2 norm of several tensors taken as one vector.
pub fn l2_norm(tensors: &[&[f32]]) -> f64 {
    tensors.iter().flat_map(|t| t.iter()).map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt()
}

/// Scales the tensors, taken as one vector, down to L2 norm at most `clip_norm` (a vector
/// already inside is unchanged). Returns the factor applied.
pub fn clip(tensors: &mut [&mut [f32]], clip_norm: f64) -> f64 {
    let norm = l2_norm(&tensors.iter().map(|t| &**t).collect::<Vec<_>>());
    let factor = if norm > clip_norm { clip_norm / norm } else { 1.0 };
    if factor < 1.0 {
        for t in tensors.iter_mut() {
            t.iter_mut().for_each(|x| *x = (*x as f64 * factor) as f32);
        }
    }
    factor
}

/// Adds independent N(0, sigma²) noise to every entry.
pub fn add_noise(values: &mut [f32], sigma: f64, rng: &mut impl Rng) {
    let normal = Normal::new(0.0, sigma).expect("sigma is finite and positive");
    for x in values {
        *x = (*x as f64 + normal.sample(rng)) as f32;
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn the_calibrated_sigma_is_the_smallest_that_meets_delta() {
        for (epsilon, delta) in [(0.5, 1e-5), (1.0, 1e-5), (4.0, 1e-6), (8.0, 1e-5), (50.0, 1e-6)] {
            let sigma = calibrate_sigma(epsilon, delta, 2.0);
            assert!(gaussian_delta(epsilon, 2.0, sigma) <= delta, "ε {epsilon}: σ {sigma} meets δ");
            assert!(gaussian_delta(epsilon, 2.0, sigma * 0.999) > delta, "ε {epsilon}: σ {sigma} is the smallest");
        }
    }

    #[test]
    fn below_epsilon_one_the_analytic_sigma_is_under_the_textbook_one_and_scales_with_sensitivity() {
        for epsilon in [0.1, 0.5, 0.9] {
            let textbook = (2.0 * (1.25f64 / 1e-5).ln()).sqrt() / epsilon;
            let analytic = calibrate_sigma(epsilon, 1e-5, 1.0);
            assert!(analytic < textbook && analytic > 0.5 * textbook, "ε {epsilon}: {analytic} vs {textbook}");
        }
        let (one, three) = (calibrate_sigma(2.0, 1e-6, 1.0), calibrate_sigma(2.0, 1e-6, 3.0));
        assert!((three / one - 3.0).abs() < 1e-6, "σ is linear in the sensitivity: {one} {three}");
        assert!(calibrate_sigma(8.0, 1e-5, 1.0) < calibrate_sigma(4.0, 1e-5, 1.0), "more ε, less noise");
    }

    #[test]
    fn the_mechanism_at_epsilon_one_matches_balle_and_wangs_value() {
        // Balle and Wang (2018), Figure 2: at ε = 1, δ = 1e-5, Δ = 1 the analytic mechanism
        // needs σ ≈ 3.73 where the textbook bound gives 4.84. The figure is read to two digits.
        let sigma = calibrate_sigma(1.0, 1e-5, 1.0);
        assert!((sigma - 3.73).abs() < 0.05, "{sigma}");
    }

    #[test]
    fn clipping_scales_a_long_vector_to_the_norm_and_leaves_a_short_one() {
        let (mut a, mut b) = (vec![3.0f32, 0.0], vec![0.0f32, 4.0]);
        let factor = clip(&mut [&mut a, &mut b], 1.0);
        assert!((factor - 0.2).abs() < 1e-12);
        assert_eq!((a.clone(), b.clone()), (vec![0.6, 0.0], vec![0.0, 0.8]), "direction kept");
        assert!((l2_norm(&[&a, &b]) - 1.0).abs() < 1e-6);
        let mut short = vec![0.1f32, -0.2];
        assert_eq!(clip(&mut [&mut short], 1.0), 1.0);
        assert_eq!(short, vec![0.1, -0.2]);
    }

    #[test]
    fn the_noise_has_mean_zero_and_the_stated_standard_deviation() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut values = vec![0.5f32; 200_000];
        add_noise(&mut values, 0.3, &mut rng);
        let n = values.len() as f64;
        let mean = values.iter().map(|&x| x as f64).sum::<f64>() / n;
        let sd = (values.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        // Standard errors: 0.3/sqrt(n) ≈ 7e-4 for the mean, about half that for the sd.
        assert!((mean - 0.5).abs() < 4e-3, "{mean}");
        assert!((sd - 0.3).abs() < 3e-3, "{sd}");
    }
}
