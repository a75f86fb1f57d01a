//! Is a heatmap faithful to the model that made it? Deletion and insertion curves (Petsiuk et
//! al., 2018, "RISE"): the explained class's probability as the hottest pixels are removed from
//! the image (deletion: a faithful map makes it fall fast, a low area under the curve) or
//! revealed on a blurred copy (insertion: it rises fast, a high area). Unlike "heat inside the
//! foreground", these ask the model itself, so they tell good maps from bad on any modality.
//! Both areas also grow with the model's confidence, so the same deletion in a random pixel order
//! is the yardstick: the deletion gain (random area − map area) is how much faster the map's
//! order removes the evidence than chance.

use image::RgbImage;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::{Kind, TchError, Tensor};

use crate::data::normalise;

/// Points on each curve after the start: every step changes 1/STEPS of the pixels.
pub const STEPS: usize = 16;
/// Gaussian blur of the insertion curve's start, as a fraction of the image side.
const BLUR_FRACTION: f32 = 0.1;
/// Seed of the random deletion order (the same for every image and model, so models compare).
const RANDOM_ORDER_SEED: u64 = 0x0dd5_eed;

/// One image's curves: the explained class's probability with 0, 1/STEPS, …, all of the
/// pixels deleted (replaced by the mean colour) or inserted (into a blurred copy), hottest first.
#[derive(Clone, Debug, PartialEq)]
pub struct Curves {
    /// Probability as the hottest pixels are deleted; STEPS + 1 points.
    pub deletion: Vec<f32>,
    /// Probability as the hottest pixels are revealed; STEPS + 1 points.
    pub insertion: Vec<f32>,
    /// Probability as pixels are deleted in a random order: the yardstick; STEPS + 1 points.
    pub random_deletion: Vec<f32>,
}

impl Curves {
    /// Area under the deletion curve (lower: the map found what the model uses).
    pub fn deletion_auc(&self) -> f64 {
        auc(&self.deletion)
    }

    /// Area under the insertion curve (higher: the map found what the model uses).
    pub fn insertion_auc(&self) -> f64 {
        auc(&self.insertion)
    }

    /// Random-order deletion area minus the map's (positive: the map's order removes the
    /// evidence faster than chance; about 0: the map is no better than noise).
    pub fn deletion_gain(&self) -> f64 {
        auc(&self.random_deletion) - auc(&self.deletion)
    }
}

/// Area under a curve sampled at evenly spaced points of [0, 1] (trapezoids); 0 without points.
pub fn auc(points: &[f32]) -> f64 {
    match points {
        [] => 0.0,
        [only] => f64::from(*only),
        [first, .., last] => {
            let sum: f64 = points.iter().map(|&p| f64::from(p)).sum();
            (sum - 0.5 * f64::from(*first) - 0.5 * f64::from(*last)) / (points.len() - 1) as f64
        }
    }
}

/// Each pixel's rank by heat, 0 for the hottest; equal heat keeps pixel order.
pub fn heat_ranks(cam: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..cam.len()).collect();
    order.sort_by(|&a, &b| cam[b].total_cmp(&cam[a]).then(a.cmp(&b)));
    let mut ranks = vec![0; cam.len()];
    for (rank, pixel) in order.into_iter().enumerate() {
        ranks[pixel] = rank;
    }
    ranks
}

/// A random rank for each of `n` pixels, the same for every call.
fn random_ranks(n: usize) -> Vec<usize> {
    let mut ranks: Vec<usize> = (0..n).collect();
    ranks.shuffle(&mut StdRng::seed_from_u64(RANDOM_ORDER_SEED));
    ranks
}

/// (STEPS + 1, 1, h, w) masks, 1 on the pixels changed at each step: the first k·n/STEPS by rank.
fn step_masks(ranks: &[usize], h: i64, w: i64) -> Tensor {
    let n = ranks.len();
    let masks: Vec<f32> = (0..=STEPS).flat_map(|k| ranks.iter().map(move |&r| if r < k * n / STEPS { 1.0 } else { 0.0 })).collect();
    Tensor::from_slice(&masks).view([STEPS as i64 + 1, 1, h, w])
}

/// The deletion and insertion curves of `picture` (as the network sees it) under `cam`, scored
/// by `probability`: a batch of normalised images to the explained class's probability of each.
pub fn curves(picture: &RgbImage, cam: &[f32], probability: impl Fn(&Tensor) -> Result<Tensor, TchError>) -> Result<Curves, TchError> {
    let (w, h) = picture.dimensions();
    let (w, h) = (i64::from(w), i64::from(h));
    let blurred = image::imageops::blur(picture, BLUR_FRACTION * w.min(h) as f32);
    let image = Tensor::from_slice(&normalise(picture)).view([1, 3, h, w]);
    let start = Tensor::from_slice(&normalise(&blurred)).view([1, 3, h, w]);
    let masks = step_masks(&heat_ranks(cam), h, w);
    let random = step_masks(&random_ranks(cam.len()), h, w);
    // Deletion replaces pixels by 0, the mean colour after normalisation.
    let deleted = &image * (1.0 - &masks);
    let inserted = &image * &masks + &start * (1.0 - &masks);
    let randomly_deleted = &image * (1.0 - &random);
    let scores = probability(&Tensor::cat(&[deleted, inserted, randomly_deleted], 0))?.to_kind(Kind::Float).to_device(tch::Device::Cpu);
    let scores: Vec<f32> = Vec::<f32>::try_from(scores.view([-1]))?;
    let curve = |i: usize| scores[i * (STEPS + 1)..(i + 1) * (STEPS + 1)].to_vec();
    Ok(Curves { deletion: curve(0), insertion: curve(1), random_deletion: curve(2) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn areas_are_trapezoids_over_the_unit_interval() {
        assert_eq!(auc(&[1.0, 1.0, 1.0]), 1.0);
        assert_eq!(auc(&[1.0, 0.0]), 0.5);
        assert_eq!(auc(&[0.0, 1.0, 1.0]), 0.75);
        assert_eq!(auc(&[]), 0.0);
    }

    #[test]
    fn ranks_put_the_hottest_pixel_first_and_keep_ties_in_order() {
        assert_eq!(heat_ranks(&[0.1, 0.9, 0.5, 0.5]), vec![3, 0, 1, 2]);
    }

    /// A "model" whose probability rises with the brightness of the left half: the evidence is
    /// there and nowhere else.
    fn left_half_brightness(batch: &Tensor) -> Result<Tensor, TchError> {
        let w = batch.size()[3];
        Ok((batch.narrow(3, 0, w / 2).mean_dim([1i64, 2, 3].as_slice(), false, Kind::Float) * 4.0).sigmoid())
    }

    #[test]
    fn a_map_on_the_evidence_deletes_fast_and_inserts_fast_and_one_off_it_does_neither() {
        // A bright left half on black: blurring bleeds the dark into the evidence.
        let picture = RgbImage::from_fn(16, 16, |x, y| if x < 8 && (x + y) % 3 != 0 { Rgb([250, 250, 250]) } else { Rgb([0, 0, 0]) });
        let on_left: Vec<f32> = (0..256).map(|i| if i % 16 < 8 { 1.0 } else { 0.0 }).collect();
        let on_right: Vec<f32> = on_left.iter().map(|v| 1.0 - v).collect();
        let good = curves(&picture, &on_left, left_half_brightness).unwrap();
        let bad = curves(&picture, &on_right, left_half_brightness).unwrap();
        assert_eq!((good.deletion.len(), good.insertion.len()), (STEPS + 1, STEPS + 1));
        // Both curves start at the untouched (deletion) or blurred (insertion) image and end at the
        // fully deleted or fully revealed one, whatever the map.
        assert_eq!(good.deletion[0], bad.deletion[0]);
        assert_eq!(good.deletion[STEPS], bad.deletion[STEPS]);
        assert_eq!(good.insertion[STEPS], good.deletion[0]);
        assert!(good.deletion[STEPS] < good.deletion[0], "deleting the evidence lowers the score");
        assert!(good.deletion_auc() < bad.deletion_auc(), "{} vs {}", good.deletion_auc(), bad.deletion_auc());
        assert!(good.insertion_auc() > bad.insertion_auc(), "{} vs {}", good.insertion_auc(), bad.insertion_auc());
        // Off the evidence, deletion does nothing until the map runs out of right-half pixels.
        assert_eq!(bad.deletion[STEPS / 2], bad.deletion[0]);
        // Chance removes left-half pixels at an even pace: the good map beats it, the bad one
        // trails it, and the random curve is the same whatever the map.
        assert_eq!(good.random_deletion, bad.random_deletion);
        assert!(good.deletion_gain() > 0.0 && bad.deletion_gain() < 0.0, "{} {}", good.deletion_gain(), bad.deletion_gain());
    }
}
