//! Is a heatmap faithful to the model that made it? Deletion and insertion curves (Petsiuk et
//! al., 2018, "RISE"): the explained class's probability as the hottest pixels are removed from
//! the image (deletion: a faithful map makes it fall fast, a low area under the curve) or
//! revealed on a blurred copy (insertion: it rises fast, a high area). Unlike "heat inside the
//! foreground", these ask the model itself, so they tell good maps from bad on any modality.
//! Both areas also grow with the model's confidence, so the same deletion in the reverse order
//! (coldest pixels first) is the yardstick: the deletion gain, the area between the two curves
//! (ABPC, Schulz et al. 2020), is how much more the map's hottest pixels matter to the model than
//! its coldest. A random pixel order is not a fair yardstick: scattered single pixels of mean
//! colour destroy a convolutional network's input faster than the contiguous regions a heatmap
//! deletes (measured: every model's maps "lost" to random order on eye-fundus).

use image::RgbImage;
use tch::{Kind, TchError, Tensor};

use crate::data::normalise;

/// Points on each curve after the start: every step changes 1/STEPS of the pixels.
pub const STEPS: usize = 16;
/// Gaussian blur of the insertion curve's start, as a fraction of the image side.
const BLUR_FRACTION: f32 = 0.1;

/// One image's curves: the explained class's probability with 0, 1/STEPS, …, all of the
/// pixels deleted (replaced by the mean colour) or inserted (into a blurred copy), hottest first.
#[derive(Clone, Debug, PartialEq)]
pub struct Curves {
    /// Probability as the hottest pixels are deleted; STEPS + 1 points.
    pub deletion: Vec<f32>,
    /// Probability as the hottest pixels are revealed; STEPS + 1 points.
    pub insertion: Vec<f32>,
    /// Probability as the coldest pixels are deleted first: the yardstick; STEPS + 1 points.
    pub reverse_deletion: Vec<f32>,
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

    /// Coldest-first deletion area minus hottest-first (positive: the map's hot pixels matter
    /// more to the model than its cold ones; about 0: the map is noise to the model).
    pub fn deletion_gain(&self) -> f64 {
        auc(&self.reverse_deletion) - auc(&self.deletion)
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
    let ranks = heat_ranks(cam);
    let masks = step_masks(&ranks, h, w);
    let reverse = step_masks(&ranks.iter().map(|r| ranks.len() - 1 - r).collect::<Vec<_>>(), h, w);
    // Deletion replaces pixels by 0, the mean colour after normalisation.
    let deleted = &image * (1.0 - &masks);
    let inserted = &image * &masks + &start * (1.0 - &masks);
    let reverse_deleted = &image * (1.0 - &reverse);
    let scores = probability(&Tensor::cat(&[deleted, inserted, reverse_deleted], 0))?.to_kind(Kind::Float).to_device(tch::Device::Cpu);
    let scores: Vec<f32> = Vec::<f32>::try_from(scores.view([-1]))?;
    let curve = |i: usize| scores[i * (STEPS + 1)..(i + 1) * (STEPS + 1)].to_vec();
    Ok(Curves { deletion: curve(0), insertion: curve(1), reverse_deletion: curve(2) })
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
        // Coldest-first is the yardstick: a map on the evidence gains over it, one off it loses.
        assert!(good.deletion_gain() > 0.0 && bad.deletion_gain() < 0.0, "{} {}", good.deletion_gain(), bad.deletion_gain());
        // Half way, coldest-first has deleted exactly what the other map deletes hottest-first.
        assert_eq!(good.reverse_deletion[STEPS / 2], bad.deletion[STEPS / 2]);
    }
}
