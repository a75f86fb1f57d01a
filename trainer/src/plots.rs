//! PNG plots of an evaluation: results per model, the confusion matrix of the merged model, and
//! per-layer cosine similarity of the data vectors (the paper's Figure 2).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;

use crate::report::EvalReport;

/// Errors drawing plots.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// No TrueType font was found to label the plots.
    #[error("no font for plot labels: install fonts-dejavu-core or set MEDMERGE_FONT to a .ttf file")]
    NoFont,
    /// Drawing or encoding failed.
    #[error("cannot draw {path}: {message}")]
    Draw { path: PathBuf, message: String },
}

const FONT_CANDIDATES: [&str; 3] = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf"];

fn ensure_font() -> Result<(), PlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        let from_env = std::env::var("MEDMERGE_FONT").ok();
        let path = from_env.into_iter().chain(FONT_CANDIDATES.iter().map(|s| s.to_string())).find(|p| Path::new(p).exists());
        let Some(bytes) = path.and_then(|p| std::fs::read(p).ok()) else { return false };
        // plotters keeps fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(PlotError::NoFont)
    }
}

fn draw_err(path: &Path) -> impl Fn(String) -> PlotError + '_ {
    move |message| PlotError::Draw { path: path.into(), message }
}

/// Writes `results.png`, `confusion.png`, `roc.png` and (with vectors) `similarity.png` into
/// `dir`.
pub fn write_all(report: &EvalReport, dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    ensure_font()?;
    std::fs::create_dir_all(dir).map_err(|x| draw_err(dir)(x.to_string()))?;
    let mut written = vec![dir.join("results.png")];
    results(report, &written[0])?;
    // Multi-label evaluations have no confusion matrix.
    if !report.primary().metrics.confusion.is_empty() {
        written.push(dir.join("confusion.png"));
        confusion(report, &dir.join("confusion.png"))?;
    }
    if !report.similarity.is_empty() {
        written.push(dir.join("similarity.png"));
        similarity(report, &dir.join("similarity.png"))?;
    }
    if report.clinical.roc.iter().any(|r| !r.points.is_empty()) {
        written.push(dir.join("roc.png"));
        roc(report, &dir.join("roc.png"))?;
    }
    Ok(written)
}

const PALETTE: [RGBColor; 6] = [RGBColor(30, 110, 200), RGBColor(220, 90, 30), RGBColor(40, 160, 70), RGBColor(170, 50, 170), RGBColor(200, 170, 20), RGBColor(20, 170, 180)];

fn roc(report: &EvalReport, path: &Path) -> Result<(), PlotError> {
    let e = draw_err(path);
    let root = BitMapBackend::new(path, (640, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("ROC per class: {}", report.primary().description), ("sans-serif", 18))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..1.0, 0.0..1.0)
        .map_err(|x| e(x.to_string()))?;
    chart.configure_mesh().x_desc("1 - specificity (false-positive rate)").y_desc("sensitivity").draw().map_err(|x| e(x.to_string()))?;
    chart.draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], BLACK.mix(0.3))).map_err(|x| e(x.to_string()))?;
    for (i, curve) in report.clinical.roc.iter().enumerate().filter(|(_, c)| !c.points.is_empty()) {
        let colour = PALETTE[i % PALETTE.len()];
        let auc = curve.auroc.map_or("n/a".into(), |a| format!("{a:.3}"));
        chart
            .draw_series(LineSeries::new(curve.points.iter().copied(), colour.stroke_width(2)))
            .map_err(|x| e(x.to_string()))?
            .label(format!("{} (AUROC {auc})", curve.class))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
    }
    chart.configure_series_labels().position(SeriesLabelPosition::LowerRight).background_style(WHITE.mix(0.9)).border_style(BLACK).draw().map_err(|x| e(x.to_string()))?;
    root.present().map_err(|x| e(x.to_string()))
}

fn results(report: &EvalReport, path: &Path) -> Result<(), PlotError> {
    let e = draw_err(path);
    let n = report.candidates.len();
    let root = BitMapBackend::new(path, (900, 80 + 34 * n as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Accuracy on the held-out set", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(330)
        .build_cartesian_2d(0.0..100.0, (0..n.saturating_sub(1)).into_segmented())
        .map_err(|x| e(x.to_string()))?;
    let labels: Vec<String> = report.candidates.iter().map(|c| c.description.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .x_desc("accuracy %")
        .draw()
        .map_err(|x| e(x.to_string()))?;
    let bars = |primary: bool| {
        let color = if primary { RGBColor(30, 110, 200) } else { RGBColor(150, 150, 150) };
        Histogram::horizontal(&chart)
            .style(color.filled())
            .margin(6)
            .data(report.candidates.iter().enumerate().filter(move |(i, _)| (*i == 0) == primary).map(|(i, c)| (i, 100.0 * c.metrics.accuracy)))
    };
    let (primary, others) = (bars(true), bars(false));
    chart.draw_series(primary).map_err(|x| e(x.to_string()))?;
    chart.draw_series(others).map_err(|x| e(x.to_string()))?;
    root.present().map_err(|x| e(x.to_string()))
}

fn confusion(report: &EvalReport, path: &Path) -> Result<(), PlotError> {
    let e = draw_err(path);
    let m = &report.primary().metrics.confusion;
    let k = m.len();
    let root = BitMapBackend::new(path, (700, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("Confusion matrix: {}", report.primary().description), ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(160)
        .build_cartesian_2d((0..k.saturating_sub(1)).into_segmented(), (0..k.saturating_sub(1)).into_segmented())
        .map_err(|x| e(x.to_string()))?;
    let names = report.classes.clone();
    // True classes run top to bottom, so the y axis counts from the last class.
    let label = |v: &SegmentValue<usize>, flip: bool| match v {
        SegmentValue::CenterOf(i) if *i < k => names[if flip { k - 1 - i } else { *i }].clone(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(k)
        .y_labels(k)
        .x_label_formatter(&|v| label(v, false))
        .y_label_formatter(&|v| label(v, true))
        .x_desc("predicted")
        .y_desc("true")
        .draw()
        .map_err(|x| e(x.to_string()))?;
    let max = m.iter().flatten().copied().max().unwrap_or(1).max(1) as f64;
    for (t, row) in m.iter().enumerate() {
        for (p, &count) in row.iter().enumerate() {
            let y = k - 1 - t;
            let shade = 255 - (200.0 * count as f64 / max) as u8;
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(SegmentValue::Exact(p), SegmentValue::Exact(y)), (SegmentValue::Exact(p + 1), SegmentValue::Exact(y + 1))],
                    RGBColor(shade, shade, 255).filled(),
                )))
                .map_err(|x| e(x.to_string()))?;
            chart.draw_series(std::iter::once(Text::new(count.to_string(), (SegmentValue::CenterOf(p), SegmentValue::CenterOf(y)), ("sans-serif", 20)))).map_err(|x| e(x.to_string()))?;
        }
    }
    root.present().map_err(|x| e(x.to_string()))
}

fn similarity(report: &EvalReport, path: &Path) -> Result<(), PlotError> {
    let e = draw_err(path);
    let s = &report.similarity;
    let root = BitMapBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let lo = s.iter().flat_map(|l| std::iter::once(l.between_shards).chain(l.with_full_training)).fold(0.0f64, f64::min);
    let mut chart = ChartBuilder::on(&root)
        .caption("Per-layer cosine similarity of data vectors", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0..s.len(), lo.min(0.0)..1.0)
        .map_err(|x| e(x.to_string()))?;
    chart.configure_mesh().x_desc("layer (input to output)").y_desc("cosine").draw().map_err(|x| e(x.to_string()))?;
    chart
        .draw_series(LineSeries::new(s.iter().enumerate().map(|(i, l)| (i, l.between_shards)), RGBColor(30, 110, 200).stroke_width(2)))
        .map_err(|x| e(x.to_string()))?
        .label("between shards")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RGBColor(30, 110, 200)));
    if s.iter().all(|l| l.with_full_training.is_some()) {
        chart
            .draw_series(LineSeries::new(s.iter().enumerate().filter_map(|(i, l)| l.with_full_training.map(|v| (i, v))), RGBColor(220, 90, 30).stroke_width(2)))
            .map_err(|x| e(x.to_string()))?
            .label("shard vs full training")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RGBColor(220, 90, 30)));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|x| e(x.to_string()))?;
    root.present().map_err(|x| e(x.to_string()))
}
