//! Predicts classes for images and writes them as CSV.

use std::path::PathBuf;

use medmerge_trainer::evaluate::predict;
use medmerge_trainer::explain::{explain_images, ExplainOptions};
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
    /// Output CSV (stdout when omitted).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write a Grad-CAM heatmap per image into this directory (adds a `heatmap` column).
    #[arg(long)]
    explain: Option<PathBuf>,
}

/// Runs the subcommand.
pub fn run(Args { source, out, explain }: Args, dev: Device) -> anyhow::Result<()> {
    let (net, ds, _) = source.load(dev)?;
    let probs = predict(&net, &ds, 32, dev)?;
    let heatmaps = match &explain {
        Some(dir) => Some(explain_images(&net, &unlabelled(&ds), dir, &ExplainOptions::default(), dev)?),
        None => None,
    };
    let heat_column = heatmaps.as_ref().map(|_| "heatmap".to_string());
    let header = ["image".to_string(), "predicted".to_string()].into_iter().chain(net.classes.iter().map(|c| format!("p_{c}"))).chain(heat_column);
    let mut table = CsvTable::new(header);
    for (i, (s, p)) in ds.samples.iter().zip(&probs).enumerate() {
        let predicted = net.predicted(p);
        let heat = heatmaps.as_ref().map(|h| h[i].overlay.display().to_string());
        table.row([s.path.display().to_string(), predicted].into_iter().chain(p.iter().map(|v| format!("{v:.6}"))).chain(heat));
    }
    match out {
        Some(o) => table.write_atomic(&o)?,
        None => {
            let csv = String::from_utf8_lossy(&table.into_bytes()).into_owned();
            say!("{}", csv.strip_suffix('\n').unwrap_or(&csv))
        }
    }
    Ok(())
}
