//! Grad-CAM heatmaps and their faithfulness measures for a model's predictions.

use std::path::PathBuf;

use medmerge_trainer::explain::{explain_images, mean, ExplainOptions};
use medmerge_trainer::report::HeatMeasures;
use medmerge_trainer::table::CsvTable;
use tch::Device;

use super::{unlabelled, ModelInputArgs};
use crate::stdout::say;

/// The subcommand's flags.
#[derive(clap::Args)]
pub struct Args {
    /// The model and its images.
    #[command(flatten)]
    source: ModelInputArgs,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Layer whose activations are explained (default: the last convolutional block;
    /// ResNet: layer1..layer4, EfficientNet/MobileNet: blocks.N or head).
    #[arg(long)]
    layer: Option<String>,
    /// Class to explain (default: the predicted class of each image).
    #[arg(long)]
    class: Option<String>,
}

/// Runs the subcommand.
pub fn run(Args { source, out, layer, class }: Args, dev: Device) -> anyhow::Result<()> {
    let (net, ds, labelled) = source.load(dev)?;
    let images: Vec<(PathBuf, Option<usize>)> = if labelled { ds.samples.iter().map(|s| (s.path.clone(), Some(s.label))).collect() } else { unlabelled(&ds) };
    let done = explain_images(&net, &images, &out, &ExplainOptions { layer, class }, dev)?;
    let mut table = CsvTable::new(["image", "label", "predicted", "probability", "explained", "foreground_fraction", "deletion_auc", "insertion_auc", "deletion_gain", "overlay"]);
    let cell = |v: Option<f64>| v.map(|f| format!("{f:.4}")).unwrap_or_default();
    for e in &done {
        let h = &e.heat;
        let fixed = [e.image.display().to_string(), e.label.clone().unwrap_or_default(), e.predicted.clone(), format!("{:.6}", e.probability), e.explained.clone()];
        let measures = [h.foreground_fraction, h.deletion_auc, h.insertion_auc, h.deletion_gain].map(cell);
        table.row(fixed.into_iter().chain(measures).chain([e.overlay.display().to_string()]));
    }
    table.write_atomic(&out.join("explanations.csv"))?;
    let summary = |pick: fn(&HeatMeasures) -> Option<f64>| mean(done.iter().filter_map(|e| pick(&e.heat)));
    let show = |v: Option<f64>, pct: bool| v.map_or("n/a".into(), |v| if pct { format!("{:.1} %", 100.0 * v) } else { format!("{v:.3}") });
    say!(
        "explained {} images into {}; heat inside the foreground: {}; deletion AUC: {}; insertion AUC: {}; deletion gain (coldest-first − hottest-first): {}",
        done.len(),
        out.display(),
        show(summary(|h| h.foreground_fraction), true),
        show(summary(|h| h.deletion_auc), false),
        show(summary(|h| h.insertion_auc), false),
        show(summary(|h| h.deletion_gain), false)
    );
    Ok(())
}
