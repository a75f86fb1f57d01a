//! Classification metrics from predicted probabilities: pure functions, checked against
//! hand-computed values.

use serde::{Deserialize, Serialize};

/// Metrics of one model on one labelled set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Fraction of images whose top class is the label.
    pub accuracy: f64,
    /// Mean per-class recall.
    pub balanced_accuracy: f64,
    /// Mean per-class F1.
    pub macro_f1: f64,
    /// Mean one-vs-rest AUROC over classes that have both positives and negatives.
    pub macro_auroc: Option<f64>,
    /// Per-class recall (sensitivity).
    pub recall: Vec<f64>,
    /// Per-class specificity.
    pub specificity: Vec<f64>,
    /// Per-class F1.
    pub f1: Vec<f64>,
    /// Per-class one-vs-rest AUROC (None when a class has no positives or no negatives).
    pub auroc: Vec<Option<f64>>,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<u64>>,
    /// Images evaluated.
    pub n: usize,
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Index of the largest value (first on ties).
pub fn argmax(p: &[f32]) -> usize {
    p.iter().enumerate().fold(0, |best, (i, v)| if *v > p[best] { i } else { best })
}

/// Computes every metric from per-image class probabilities and true labels.
pub fn classification_metrics(probs: &[Vec<f32>], labels: &[usize], classes: usize) -> Metrics {
    let mut confusion = vec![vec![0u64; classes]; classes];
    for (p, &y) in probs.iter().zip(labels) {
        confusion[y][argmax(p)] += 1;
    }
    let n = labels.len() as u64;
    let mut recall = Vec::new();
    let mut specificity = Vec::new();
    let mut f1 = Vec::new();
    let mut auroc = Vec::new();
    for c in 0..classes {
        let tp = confusion[c][c];
        let actual: u64 = confusion[c].iter().sum();
        let predicted: u64 = confusion.iter().map(|row| row[c]).sum();
        let fp = predicted - tp;
        let fn_ = actual - tp;
        let tn = n - tp - fp - fn_;
        recall.push(ratio(tp, actual));
        specificity.push(ratio(tn, tn + fp));
        f1.push(ratio(2 * tp, 2 * tp + fp + fn_));
        let scores: Vec<f32> = probs.iter().map(|p| p[c]).collect();
        let positive: Vec<bool> = labels.iter().map(|&y| y == c).collect();
        auroc.push(binary_auroc(&scores, &positive));
    }
    let correct: u64 = (0..classes).map(|c| confusion[c][c]).sum();
    let present: Vec<usize> = (0..classes).filter(|&c| confusion[c].iter().sum::<u64>() > 0).collect();
    let mean_over = |v: &[f64], idx: &[usize]| if idx.is_empty() { 0.0 } else { idx.iter().map(|&i| v[i]).sum::<f64>() / idx.len() as f64 };
    let defined: Vec<f64> = auroc.iter().flatten().copied().collect();
    Metrics {
        accuracy: ratio(correct, n),
        balanced_accuracy: mean_over(&recall, &present),
        macro_f1: mean_over(&f1, &(0..classes).collect::<Vec<_>>()),
        macro_auroc: (!defined.is_empty()).then(|| defined.iter().sum::<f64>() / defined.len() as f64),
        recall,
        specificity,
        f1,
        auroc,
        confusion,
        n: labels.len(),
    }
}

/// Multi-label metrics: every class is a separate yes/no question at threshold 0.5. `accuracy`
/// is the mean per-label accuracy, `balancedAccuracy` the mean of (recall + specificity) / 2,
/// `macroF1` and `macroAuroc` per-label means; there is no confusion matrix.
pub fn multilabel_metrics(probs: &[Vec<f32>], targets: &[Vec<u8>], classes: usize) -> Metrics {
    let mut recall = Vec::new();
    let mut specificity = Vec::new();
    let mut f1 = Vec::new();
    let mut auroc = Vec::new();
    let mut accuracy = Vec::new();
    for c in 0..classes {
        let (mut tp, mut fp, mut fn_, mut tn) = (0u64, 0u64, 0u64, 0u64);
        for (p, t) in probs.iter().zip(targets) {
            match (p[c] >= 0.5, t[c] == 1) {
                (true, true) => tp += 1,
                (true, false) => fp += 1,
                (false, true) => fn_ += 1,
                (false, false) => tn += 1,
            }
        }
        recall.push(ratio(tp, tp + fn_));
        specificity.push(ratio(tn, tn + fp));
        f1.push(ratio(2 * tp, 2 * tp + fp + fn_));
        accuracy.push(ratio(tp + tn, tp + tn + fp + fn_));
        let scores: Vec<f32> = probs.iter().map(|p| p[c]).collect();
        let positive: Vec<bool> = targets.iter().map(|t| t[c] == 1).collect();
        auroc.push(binary_auroc(&scores, &positive));
    }
    let mean = |v: &[f64]| if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 };
    let balanced: Vec<f64> = recall.iter().zip(&specificity).map(|(r, s)| (r + s) / 2.0).collect();
    let defined: Vec<f64> = auroc.iter().flatten().copied().collect();
    Metrics {
        accuracy: mean(&accuracy),
        balanced_accuracy: mean(&balanced),
        macro_f1: mean(&f1),
        macro_auroc: (!defined.is_empty()).then(|| mean(&defined)),
        recall,
        specificity,
        f1,
        auroc,
        confusion: vec![],
        n: targets.len(),
    }
}

/// Area under the ROC curve by the rank statistic (ties count one half). None without both
/// positives and negatives.
pub fn binary_auroc(scores: &[f32], positive: &[bool]) -> Option<f64> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Average ranks over tied scores.
    let mut ranks = vec![0f64; scores.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for k in i..=j {
            ranks[idx[k]] = avg;
        }
        i = j + 1;
    }
    let n_pos = positive.iter().filter(|&&p| p).count() as f64;
    let n_neg = positive.len() as f64 - n_pos;
    if n_pos == 0.0 || n_neg == 0.0 {
        return None;
    }
    let rank_sum: f64 = ranks.iter().zip(positive).filter(|(_, &p)| p).map(|(r, _)| r).sum();
    Some((rank_sum - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * n_neg))
}

/// The ROC curve as (false-positive rate, true-positive rate) points from (0, 0) to (1, 1), one
/// per distinct score (tied scores move both rates at once). Empty without both positives and
/// negatives.
pub fn roc_curve(scores: &[f32], positive: &[bool]) -> Vec<(f64, f64)> {
    let n_pos = positive.iter().filter(|&&p| p).count() as f64;
    let n_neg = positive.len() as f64 - n_pos;
    if n_pos == 0.0 || n_neg == 0.0 {
        return vec![];
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut points = vec![(0.0, 0.0)];
    let (mut tp, mut fp) = (0.0, 0.0);
    for (k, &i) in idx.iter().enumerate() {
        if positive[i] {
            tp += 1.0;
        } else {
            fp += 1.0;
        }
        if idx.get(k + 1).is_none_or(|&next| scores[next] != scores[i]) {
            points.push((fp / n_neg, tp / n_pos));
        }
    }
    points
}

/// Sensitivity and specificity when scores at or above `threshold` count as positive; `None`
/// for a rate without cases (no positives or no negatives).
pub fn at_threshold(scores: &[f32], positive: &[bool], threshold: f64) -> (Option<f64>, Option<f64>) {
    let (mut tp, mut fn_, mut tn, mut fp) = (0u64, 0u64, 0u64, 0u64);
    for (&s, &p) in scores.iter().zip(positive) {
        match (f64::from(s) >= threshold, p) {
            (true, true) => tp += 1,
            (false, true) => fn_ += 1,
            (false, false) => tn += 1,
            (true, false) => fp += 1,
        }
    }
    let rate = |hit: u64, miss: u64| (hit + miss > 0).then(|| hit as f64 / (hit + miss) as f64);
    (rate(tp, fn_), rate(tn, fp))
}

/// Cosine similarity of two vectors (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        dot += (*x as f64) * (*y as f64);
        na += (*x as f64).powi(2);
        nb += (*y as f64).powi(2);
    }
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na.sqrt() * nb.sqrt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn metrics_match_a_hand_computed_three_class_example() {
        // labels:    0 0 0 1 1 2
        // predicted: 0 0 1 1 2 2
        let probs = vec![vec![0.8, 0.1, 0.1], vec![0.6, 0.3, 0.1], vec![0.3, 0.5, 0.2], vec![0.1, 0.7, 0.2], vec![0.2, 0.3, 0.5], vec![0.1, 0.1, 0.8]];
        let labels = vec![0, 0, 0, 1, 1, 2];
        let m = classification_metrics(&probs, &labels, 3);
        assert_eq!(m.confusion, vec![vec![2, 1, 0], vec![0, 1, 1], vec![0, 0, 1]]);
        assert!(close(m.accuracy, 4.0 / 6.0));
        // recalls 2/3, 1/2, 1 -> balanced 13/18
        assert!(close(m.balanced_accuracy, (2.0 / 3.0 + 0.5 + 1.0) / 3.0));
        // class 0: tp2 fp0 fn1 -> f1 4/5; class 1: tp1 fp1 fn1 -> 1/2; class 2: tp1 fp1 fn0 -> 2/3
        assert!(close(m.macro_f1, (0.8 + 0.5 + 2.0 / 3.0) / 3.0));
        // class 1 specificity: negatives are 4 (three 0s, one 2); one predicted 1 -> 3/4
        assert!(close(m.specificity[1], 0.75));
        // class 0 AUROC: positives scores .8 .6 .3, negatives .1 .2 .1 -> every pair ordered -> 1
        assert_eq!(m.auroc[0], Some(1.0));
    }

    #[test]
    fn multilabel_metrics_treat_each_label_separately() {
        // label 0: scores .9 .2 .7 for targets 1 0 0 -> tp1 fp1 tn1; AUROC: .9 beats .2 and .7 -> 1
        // label 1: scores .1 .8 .6 for targets 0 1 1 -> tp2 tn1; AUROC 1
        let probs = vec![vec![0.9, 0.1], vec![0.2, 0.8], vec![0.7, 0.6]];
        let targets = vec![vec![1, 0], vec![0, 1], vec![0, 1]];
        let m = multilabel_metrics(&probs, &targets, 2);
        assert!(close(m.accuracy, (2.0 / 3.0 + 1.0) / 2.0));
        assert!(close(m.f1[0], 2.0 / 3.0) && close(m.f1[1], 1.0));
        assert!(close(m.specificity[0], 0.5));
        assert_eq!(m.auroc, vec![Some(1.0), Some(1.0)]);
        assert!(m.confusion.is_empty());
    }

    #[test]
    fn roc_curves_step_per_distinct_score_and_ties_move_diagonally() {
        // Scores 0.9 (pos), 0.8 (neg), 0.8 (pos), 0.3 (neg): 2 positives, 2 negatives.
        let pts = roc_curve(&[0.9, 0.8, 0.8, 0.3], &[true, false, true, false]);
        assert_eq!(pts, vec![(0.0, 0.0), (0.0, 0.5), (0.5, 1.0), (1.0, 1.0)]);
        assert!(roc_curve(&[0.1, 0.2], &[true, true]).is_empty());
    }

    #[test]
    fn sensitivity_and_specificity_at_a_threshold() {
        let scores = [0.9, 0.6, 0.4, 0.7, 0.2];
        let positive = [true, true, true, false, false];
        let (sens, spec) = at_threshold(&scores, &positive, 0.5);
        assert_eq!((sens, spec), (Some(2.0 / 3.0), Some(0.5)));
        assert_eq!(at_threshold(&scores, &[true; 5], 0.5).1, None);
    }

    #[test]
    fn auroc_counts_ties_as_half() {
        assert_eq!(binary_auroc(&[0.5, 0.5], &[true, false]), Some(0.5));
        assert_eq!(binary_auroc(&[0.1, 0.9, 0.4], &[true, false, false]), Some(0.0));
        assert_eq!(binary_auroc(&[0.2, 0.3], &[true, true]), None);
    }

    #[test]
    fn cosine_of_parallel_and_orthogonal_vectors() {
        assert!(close(cosine(&[1.0, 2.0], &[2.0, 4.0]), 1.0));
        assert!(close(cosine(&[1.0, 0.0], &[0.0, 3.0]), 0.0));
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
    }
}
