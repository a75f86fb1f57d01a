//! `eval/report.html`: one self-contained page (figures embedded) with everything a clinician
//! or reviewer needs: every model's results, per-class numbers at the operating point, the
//! confusion matrix, ROC curves, vector similarity, the Grad-CAM gallery and the settings.

use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use maud::{html, Markup, PreEscaped, DOCTYPE};

use crate::report::EvalReport;

/// Section ids, in page order (the browser test checks each one renders).
pub const SECTIONS: [&str; 9] = ["results", "per-class", "confusion", "roc", "similarity", "vectors", "export", "gradcam", "settings"];

const STYLE: &str = "body{font-family:DejaVu Sans,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222}\
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 10px;text-align:right}\
th:first-child,td:first-child{text-align:left}tr.primary{background:#e8f0fb;font-weight:bold}\
section{border-top:2px solid #1e6ec8;margin-top:2em}img.plot{max-width:100%}\
.gallery{display:flex;flex-wrap:wrap;gap:12px}.gallery figure{margin:0;width:180px;font-size:12px}\
.gallery img{width:180px;height:180px;image-rendering:auto}.wrong{color:#b00}.right{color:#070}\
pre{background:#f5f5f5;padding:1em;overflow:auto;font-size:12px}";

const FIGURE_CHECK: &str = "<script>window.addEventListener('load',function(){var all=document.images,ok=0;\
for(var i=0;i<all.length;i++){if(all[i].complete&&all[i].naturalWidth>0){ok++;}}\
document.getElementById('figures').textContent=ok+' of '+all.length+' figures rendered';});</script>";

fn pct(v: f64) -> String {
    format!("{:.1} %", 100.0 * v)
}

fn auc(v: f64) -> String {
    format!("{v:.3}")
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "n/a".into(), f)
}

/// `<img>` with `file` (in `dir`) embedded as a data URI, or a note when it was not drawn.
fn embedded_png(dir: &Path, file: &str, alt: &str, class: &str) -> Markup {
    match std::fs::read(dir.join(file)) {
        Ok(bytes) => html! { img class=(class) alt=(alt) src={ "data:image/png;base64," (STANDARD.encode(bytes)) }; },
        Err(_) => html! { p { em { (file) " was not drawn on this machine." } } },
    }
}

/// The report as one HTML page; figures are read from `dir` (the evaluate stage's directory).
/// Every value is escaped by the template (maud); only the fixed style and script are not.
pub fn to_html(report: &EvalReport, dir: &Path) -> String {
    let spec = serde_json::to_string_pretty(&report.spec).unwrap_or_default();
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { "medmerge report: " (report.job) }
                style { (PreEscaped(STYLE)) }
            }
            body {
                h1 { "medmerge report: " (report.job) }
                p {
                    "Run " code { (report.run) } ": " (report.test_images) " held-out images, classes " (report.classes.join(", "))
                    ". The merged model is " strong { (report.primary().description) } "."
                }
                (results(report, dir))
                (per_class(report))
                (confusion(report, dir))
                section id="roc" { h2 { "ROC curves" } (embedded_png(dir, "roc.png", "ROC curve per class", "plot")) }
                (similarity(report, dir))
                (vectors(report))
                (export(report))
                (gradcam(report, dir))
                section id="settings" { h2 { "Settings that produced this run" } pre { (spec) } }
                footer { p id="figures" { "figures not checked (scripts disabled)" } }
                (PreEscaped(FIGURE_CHECK))
            }
        }
    }
    .into_string()
}

fn results(report: &EvalReport, dir: &Path) -> Markup {
    const COLUMNS: [&str; 9] = [
        "model",
        "accuracy",
        "balanced accuracy",
        "macro-F1",
        "macro AUROC",
        "Grad-CAM heat in foreground",
        "deletion AUC (lower is better)",
        "insertion AUC (higher is better)",
        "deletion gain (coldest-first − hottest-first)",
    ];
    html! {
        section id="results" {
            h2 { "Results of every model" }
            table {
                tr { @for column in COLUMNS { th { (column) } } }
                @for (i, r) in report.candidates.iter().enumerate() {
                    tr class=[(i == 0).then_some("primary")] {
                        td { (r.description) }
                        td { (pct(r.metrics.accuracy)) }
                        td { (pct(r.metrics.balanced_accuracy)) }
                        td { (auc(r.metrics.macro_f1)) }
                        td { (opt(r.metrics.macro_auroc, auc)) }
                        td { (opt(r.heat.foreground_fraction, pct)) }
                        td { (opt(r.heat.deletion_auc, auc)) }
                        td { (opt(r.heat.insertion_auc, auc)) }
                        td { (opt(r.heat.deletion_gain, auc)) }
                    }
                }
            }
            (embedded_png(dir, "results.png", "accuracy per model", "plot"))
        }
    }
}

fn per_class(report: &EvalReport) -> Markup {
    let (m, c) = (&report.primary().metrics, &report.clinical);
    let op = format!("{:.2}", c.operating_point);
    html! {
        section id="per-class" {
            h2 { "Per class" }
            p { "One class against the rest; the operating point counts a probability of at least " (op) " as positive." }
            table {
                tr {
                    th { "class" } th { "recall" } th { "specificity" } th { "F1" } th { "AUROC" }
                    th { "sensitivity at " (op) } th { "specificity at " (op) }
                }
                @for (i, class) in report.classes.iter().enumerate() {
                    tr {
                        td { (class) }
                        td { (opt(m.recall.get(i).copied(), pct)) }
                        td { (opt(m.specificity.get(i).copied(), pct)) }
                        td { (opt(m.f1.get(i).copied(), auc)) }
                        td { (opt(m.auroc.get(i).copied().flatten(), auc)) }
                        td { (opt(c.sensitivity.get(i).copied().flatten(), pct)) }
                        td { (opt(c.specificity.get(i).copied().flatten(), pct)) }
                    }
                }
            }
        }
    }
}

fn confusion(report: &EvalReport, dir: &Path) -> Markup {
    let confusion = &report.primary().metrics.confusion;
    html! {
        section id="confusion" {
            h2 { "Confusion matrix" }
            @if confusion.is_empty() {
                p { "Multi-label evaluation: no confusion matrix." }
            } @else {
                table {
                    tr { th { "true \\ predicted" } @for class in &report.classes { th { (class) } } }
                    @for (class, row) in report.classes.iter().zip(confusion) {
                        tr { td { (class) } @for count in row { td { (count) } } }
                    }
                }
                (embedded_png(dir, "confusion.png", "confusion matrix", "plot"))
            }
        }
    }
}

fn similarity(report: &EvalReport, dir: &Path) -> Markup {
    let layers = &report.similarity;
    html! {
        section id="similarity" {
            h2 { "Per-layer cosine similarity of the data vectors" }
            @if layers.is_empty() {
                p { "No vectors were compared in this run." }
            } @else {
                p {
                    "Mean between shard vectors: " (auc(layers.iter().map(|s| s.between_shards).sum::<f64>() / layers.len() as f64))
                    " over " (layers.len()) " weight tensors."
                }
                (embedded_png(dir, "similarity.png", "per-layer cosine similarity", "plot"))
            }
        }
    }
}

fn vectors(report: &EvalReport) -> Markup {
    html! {
        section id="vectors" {
            h2 { "How the vectors left the hospitals" }
            table {
                tr { th { "shard" } th { "encoding" } th { "size" } th { "privacy" } }
                @for r in &report.releases {
                    tr { td { (r.shard) } td { (r.encoding()) } td { (r.size()) } td { (r.privacy()) } }
                }
            }
            @if report.releases.iter().any(|r| r.release.privacy.is_some()) {
                p { (crate::report::PRIVACY_SCOPE) }
            }
        }
    }
}

fn export(report: &EvalReport) -> Markup {
    let p = &report.primary().metrics;
    html! {
        section id="export" {
            h2 { "The model for serving and edge devices" }
            @if let Some(e) = &report.export {
                table {
                    tr { th { "file" } th { "size" } th { "accuracy" } th { "macro F1" } }
                    @for row in e.rows(p.accuracy, p.macro_f1) {
                        tr { @for cell in row { td { (cell) } } }
                    }
                }
                p { (crate::report::EXPORT_NOTE) }
            } @else {
                p { "No ONNX export in this run." }
            }
        }
    }
}

fn gradcam(report: &EvalReport, dir: &Path) -> Markup {
    let (p, c) = (report.primary(), &report.clinical);
    html! {
        section id="gradcam" {
            h2 { "Grad-CAM: where the merged model looked" }
            @if c.gallery.is_empty() {
                p { "Grad-CAM was off for this run (evaluation.explainImages: 0) or the set is multi-label." }
            } @else {
                p {
                    "Heatmaps of the predicted class from layer " code { (c.explain_layer.as_deref().unwrap_or("?")) }
                    "; red is where the evidence was. Over the explained images: share of heat inside the image's foreground "
                    (opt(p.heat.foreground_fraction, pct))
                    "; as the hottest pixels are removed, the area under the probability curve is " (opt(p.heat.deletion_auc, auc))
                    " (deletion, lower is better), and as they are revealed on a blurred copy " (opt(p.heat.insertion_auc, auc))
                    " (insertion, higher is better); deleting the coldest pixels first keeps " (opt(p.heat.deletion_gain, auc))
                    " more area than deleting the hottest first (about 0: the maps are noise to the model)."
                }
                @for (title, correct) in [("Correct predictions", true), ("Wrong predictions", false)] {
                    h3 { (title) }
                    @let items: Vec<_> = c.gallery.iter().filter(|g| g.correct() == correct).collect();
                    @if items.is_empty() {
                        p { "None among the explained images." }
                    } @else {
                        div class="gallery" {
                            @for g in items {
                                figure {
                                    (embedded_png(dir, &g.overlay, &g.image, "cam"))
                                    figcaption {
                                        span class=(if correct { "right" } else { "wrong" }) { (g.predicted) " (" (format!("{:.0}", 100.0 * g.probability)) " %)" }
                                        br; "true: " (g.label)
                                        br; (g.image)
                                        br; "heat in foreground: " (opt(g.heat.foreground_fraction, pct))
                                        br; "deletion / insertion AUC: " (opt(g.heat.deletion_auc, auc)) " / " (opt(g.heat.insertion_auc, auc))
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::classification_metrics;
    use crate::report::{CandidateResult, Clinical, GalleryImage, HeatMeasures};

    fn report() -> EvalReport {
        let metrics = classification_metrics(&[vec![0.8, 0.2], vec![0.3, 0.7], vec![0.6, 0.4]], &[0, 1, 1], 2);
        let gallery = vec![GalleryImage {
            overlay: "gradcam-00.png".into(),
            image: "eye<1>.jpg".into(),
            label: "a".into(),
            predicted: "a".into(),
            probability: 0.8,
            heat: HeatMeasures { foreground_fraction: Some(0.9), deletion_auc: Some(0.2), insertion_auc: Some(0.7), deletion_gain: Some(0.1) },
        }];
        EvalReport {
            job: "retina".into(),
            run: "runs/x/g1".into(),
            classes: vec!["a".into(), "b".into()],
            test_images: 3,
            candidates: vec![CandidateResult {
                id: "data-vector".into(),
                description: "data vector λ=0.5".into(),
                metrics,
                heat: HeatMeasures { foreground_fraction: Some(0.9), deletion_auc: Some(0.25), insertion_auc: Some(0.75), deletion_gain: Some(0.125) },
            }],
            similarity: vec![],
            releases: vec![crate::report::ShardRelease {
                shard: "h1".into(),
                release: medmerge_crds::results::ReleaseRecord {
                    encoding: medmerge_crds::VectorEncoding::Int8,
                    density: None,
                    bytes: Some(3_800_000),
                    privacy: Some(medmerge_crds::results::PrivacyRecord { epsilon: 8.0, delta: 1e-6, clip_norm: 3.0, noise_stddev: 3.9 }),
                },
            }],
            spec: serde_json::json!({"merge": {"lambda": 0.5}}),
            export: Some(crate::report::EdgeExport {
                opset: 17,
                float_file: "model.onnx".into(),
                float_bytes: 14_000_000,
                int8_file: "model-int8.onnx".into(),
                int8_bytes: 3_900_000,
                int8_accuracy: 0.875,
                int8_macro_f1: 0.5,
            }),
            clinical: Clinical { operating_point: 0.5, sensitivity: vec![Some(1.0), Some(0.5)], specificity: vec![Some(0.5), Some(1.0)], gallery, ..Default::default() },
        }
    }

    #[test]
    fn every_section_is_present_and_text_is_escaped() {
        let dir = tempfile::tempdir().unwrap();
        let html = to_html(&report(), dir.path());
        for id in SECTIONS {
            assert!(html.contains(&format!("<section id=\"{id}\">")), "{id}");
        }
        assert!(html.contains("eye&lt;1&gt;.jpg") && !html.contains("eye<1>"));
        assert!(html.contains("data vector λ=0.5") && html.contains("90.0 %"));
        assert!(html.contains("<td>0.250</td><td>0.750</td><td>0.125</td>"), "deletion and insertion areas and the gain per model");
        assert!(html.contains("roc.png was not drawn"), "missing figures are said, not silently dropped");
        assert!(html.contains("&quot;lambda&quot;: 0.5"), "the settings are shown");
        assert!(html.contains("<td>h1</td><td>int8</td><td>3.8 MB</td><td>(ε 8, δ 0.000001)-DP, clip 3, σ 3.900e0</td>"), "each vector's release");
        assert!(html.contains("does not cover sample counts"), "and what the privacy covers");
        assert!(html.contains("<td>model-int8.onnx</td><td>3.9 MB</td><td>87.5 %</td><td>0.500</td>"), "the int8 edge model's size and accuracy");
    }

    #[test]
    fn names_from_the_job_cannot_inject_markup() {
        let mut r = report();
        r.job = "<script>alert(1)</script>".into();
        r.classes = vec!["<b>a</b>".into(), "b\"onload=\"x".into()];
        r.candidates[0].description = "<img src=x>".into();
        let html = to_html(&r, tempfile::tempdir().unwrap().path());
        for raw in ["<script>alert", "<b>a</b>", "\"onload", "<img src=x>"] {
            assert!(!html.contains(raw), "{raw} reached the page unescaped");
        }
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;") && html.contains("&lt;b&gt;a&lt;/b&gt;"));
    }

    #[test]
    fn figures_are_embedded() {
        let dir = tempfile::tempdir().unwrap();
        image::RgbImage::new(2, 2).save(dir.path().join("roc.png")).unwrap();
        let html = to_html(&report(), dir.path());
        assert!(html.contains("<img class=\"plot\" alt=\"ROC curve per class\" src=\"data:image/png;base64,iVBORw0KGgo"));
        assert!(!html.contains("src=\"roc.png\""), "self-contained");
    }
}
