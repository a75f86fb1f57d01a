//! The clinical view of an evaluation: ROC curves and an operating point from the predicted
//! probabilities, and Grad-CAM over a sample of held-out images (the share of heat inside the
//! foreground, deletion and insertion areas, and a gallery of correct and wrong predictions).

use std::path::{Path, PathBuf};

use tch::Device;

use crate::data::Dataset;
use crate::evaluate::is_case;
use crate::explain::{faithfulness, for_each_heatmap, foreground_fraction, mean, write_overlay, ExplainError, ExplainOptions};
use crate::metrics::{at_threshold, binary_auroc, roc_curve};
use crate::model::Network;
use crate::report::{Clinical, GalleryImage, HeatMeasures, RocCurve};

/// Overlays of correct predictions, and as many of wrong ones, in the gallery.
pub const GALLERY_PER_KIND: usize = 4;

/// ROC curves per class and sensitivity/specificity at `threshold`, from `probs` on `data`.
pub fn roc_and_operating_point(probs: &[Vec<f32>], data: &Dataset, threshold: f64) -> Clinical {
    let mut clinical = Clinical { operating_point: threshold, ..Default::default() };
    for (c, class) in data.classes.iter().enumerate() {
        let scores: Vec<f32> = probs.iter().map(|p| p[c]).collect();
        let positive = is_case(data, c);
        let (sensitivity, specificity) = at_threshold(&scores, &positive, threshold);
        clinical.roc.push(RocCurve { class: class.clone(), auroc: binary_auroc(&scores, &positive), points: roc_curve(&scores, &positive) });
        clinical.sensitivity.push(sensitivity);
        clinical.specificity.push(specificity);
    }
    clinical
}

/// Up to `n` images of `data`, evenly spaced so every part of the set is represented, with
/// their labels (none for multi-label sets).
pub fn explain_sample(data: &Dataset, n: usize) -> Vec<(PathBuf, Option<usize>)> {
    let total = data.samples.len();
    let n = n.min(total);
    (0..n).map(|i| &data.samples[i * total / n]).map(|s| (s.path.clone(), (!data.multi_label).then_some(s.label))).collect()
}

/// What Grad-CAM found for one model over a sample.
#[derive(Debug, Default)]
pub struct HeatStudy {
    /// Means over the sample (the foreground share over images that have a foreground).
    pub measures: HeatMeasures,
    /// Overlays written (only when a gallery directory was given).
    pub gallery: Vec<GalleryImage>,
}

/// Grad-CAM of `net`'s predicted class on `sample`. With `gallery_dir`, the first
/// [`GALLERY_PER_KIND`] correct and wrong predictions are written there as `gradcam-NN.png`.
pub fn heat_study(net: &Network, sample: &[(PathBuf, Option<usize>)], gallery_dir: Option<&Path>, device: Device) -> Result<HeatStudy, ExplainError> {
    let (mut fractions, mut deletion, mut insertion, mut gain) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut gallery = Vec::new();
    let (mut correct, mut wrong) = (0, 0);
    for_each_heatmap(net, sample, &ExplainOptions::default(), device, |i, picture, map| {
        fractions.extend(foreground_fraction(picture, &map.cam));
        let curves = faithfulness(net, picture, &map, device)?;
        deletion.push(curves.deletion_auc());
        insertion.push(curves.insertion_auc());
        gain.push(curves.deletion_gain());
        let (Some(dir), Some(label)) = (gallery_dir, sample[i].1) else { return Ok(()) };
        let count = if label == map.predicted { &mut correct } else { &mut wrong };
        if *count < GALLERY_PER_KIND {
            *count += 1;
            let name = format!("gradcam-{:02}.png", gallery.len());
            let e = write_overlay(net, &sample[i], picture, &map, &curves, dir.join(&name))?;
            let image = e.image.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            gallery.push(GalleryImage { overlay: name, image, label: e.label.unwrap_or_default(), predicted: e.predicted, probability: e.probability, heat: e.heat });
        }
        Ok(())
    })?;
    let measures = HeatMeasures { foreground_fraction: mean(fractions), deletion_auc: mean(deletion), insertion_auc: mean(insertion), deletion_gain: mean(gain) };
    Ok(HeatStudy { measures, gallery })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Sample;

    fn dataset(labels: &[usize]) -> Dataset {
        let samples = labels.iter().enumerate().map(|(i, &label)| Sample { path: PathBuf::from(format!("{i}.png")), label, targets: vec![] }).collect();
        Dataset { source: PathBuf::from("test.csv"), classes: vec!["a".into(), "b".into()], samples, multi_label: false }
    }

    #[test]
    fn operating_point_and_roc_per_class_one_against_the_rest() {
        let data = dataset(&[0, 0, 1, 1]);
        let probs = vec![vec![0.9, 0.1], vec![0.4, 0.6], vec![0.3, 0.7], vec![0.2, 0.8]];
        let c = roc_and_operating_point(&probs, &data, 0.5);
        assert_eq!(c.roc.len(), 2);
        assert_eq!(c.roc[1].class, "b");
        assert_eq!(c.roc[0].auroc, Some(1.0));
        // Class a: positives score 0.9 and 0.4 -> one of two above 0.5; both negatives below.
        assert_eq!((c.sensitivity[0], c.specificity[0]), (Some(0.5), Some(1.0)));
        // Class b: both positives above, one of two negatives (0.6) above.
        assert_eq!((c.sensitivity[1], c.specificity[1]), (Some(1.0), Some(0.5)));
    }

    #[test]
    fn the_sample_spans_the_whole_set() {
        let data = dataset(&[0; 10]);
        let s: Vec<String> = explain_sample(&data, 4).iter().map(|(p, _)| p.display().to_string()).collect();
        assert_eq!(s, ["0.png", "2.png", "5.png", "7.png"]);
        assert_eq!(explain_sample(&data, 50).len(), 10);
    }
}
