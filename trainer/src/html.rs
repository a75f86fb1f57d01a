//! `eval/report.html`: one self-contained page (figures embedded) with everything a clinician
//! or reviewer needs: every model's results, per-class numbers at the operating point, the
//! confusion matrix, ROC curves, vector similarity, the Grad-CAM gallery and the settings.

use std::fmt::Write;
use std::path::Path;

use base64::Engine;

use crate::report::EvalReport;

/// Section ids, in page order (the browser test checks each one renders).
pub const SECTIONS: [&str; 7] = ["results", "per-class", "confusion", "roc", "similarity", "gradcam", "settings"];

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

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

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
fn figure(dir: &Path, file: &str, alt: &str, class: &str) -> String {
    match std::fs::read(dir.join(file)) {
        Ok(bytes) => format!("<img class=\"{class}\" alt=\"{}\" src=\"data:image/png;base64,{}\">", escape(alt), base64::engine::general_purpose::STANDARD.encode(bytes)),
        Err(_) => format!("<p><em>{} was not drawn on this machine.</em></p>", escape(file)),
    }
}

/// The report as one HTML page; figures are read from `dir` (the evaluate stage's directory).
pub fn to_html(report: &EvalReport, dir: &Path) -> String {
    let mut h = String::new();
    let p = report.primary();
    let c = &report.clinical;
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>medmerge report: {job}</title><style>{STYLE}</style></head><body>\
         <h1>medmerge report: {job}</h1><p>Run <code>{run}</code>: {n} held-out images, classes {classes}. \
         The merged model is <strong>{desc}</strong>.</p>",
        job = escape(&report.job),
        run = escape(&report.run),
        n = report.test_images,
        classes = escape(&report.classes.join(", ")),
        desc = escape(&p.description),
    );

    h.push_str("<section id=\"results\"><h2>Results of every model</h2><table><tr><th>model</th><th>accuracy</th><th>balanced accuracy</th><th>macro-F1</th><th>macro AUROC</th><th>Grad-CAM heat in foreground</th><th>deletion AUC (lower is better)</th><th>insertion AUC (higher is better)</th><th>deletion gain (coldest-first − hottest-first)</th></tr>");
    for (i, r) in report.candidates.iter().enumerate() {
        let m = &r.metrics;
        let _ = write!(
            h,
            "<tr{}><td>{}</td><td>{}</td><td>{}</td><td>{:.3}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            if i == 0 { " class=\"primary\"" } else { "" },
            escape(&r.description),
            pct(m.accuracy),
            pct(m.balanced_accuracy),
            m.macro_f1,
            opt(m.macro_auroc, |a| format!("{a:.3}")),
            opt(r.heat.foreground_fraction, pct),
            opt(r.heat.deletion_auc, auc),
            opt(r.heat.insertion_auc, auc),
            opt(r.heat.deletion_gain, auc)
        );
    }
    h.push_str("</table>");
    h.push_str(&figure(dir, "results.png", "accuracy per model", "plot"));
    h.push_str("</section>");

    let _ = write!(
        h,
        "<section id=\"per-class\"><h2>Per class</h2><p>One class against the rest; the operating point counts a probability of at least {:.2} as positive.</p>\
         <table><tr><th>class</th><th>recall</th><th>specificity</th><th>F1</th><th>AUROC</th><th>sensitivity at {op:.2}</th><th>specificity at {op:.2}</th></tr>",
        c.operating_point,
        op = c.operating_point
    );
    for (i, class) in report.classes.iter().enumerate() {
        let m = &p.metrics;
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.3}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(class),
            pct(m.recall[i]),
            pct(m.specificity[i]),
            m.f1.get(i).copied().unwrap_or(f64::NAN),
            opt(m.auroc[i], |a| format!("{a:.3}")),
            opt(c.sensitivity.get(i).copied().flatten(), pct),
            opt(c.specificity.get(i).copied().flatten(), pct)
        );
    }
    h.push_str("</table></section>");

    h.push_str("<section id=\"confusion\"><h2>Confusion matrix</h2>");
    if p.metrics.confusion.is_empty() {
        h.push_str("<p>Multi-label evaluation: no confusion matrix.</p>");
    } else {
        h.push_str("<table><tr><th>true \\ predicted</th>");
        for class in &report.classes {
            let _ = write!(h, "<th>{}</th>", escape(class));
        }
        h.push_str("</tr>");
        for (class, row) in report.classes.iter().zip(&p.metrics.confusion) {
            let _ = write!(h, "<tr><td>{}</td>{}</tr>", escape(class), row.iter().map(|v| format!("<td>{v}</td>")).collect::<String>());
        }
        h.push_str("</table>");
        h.push_str(&figure(dir, "confusion.png", "confusion matrix", "plot"));
    }
    h.push_str("</section>");

    h.push_str("<section id=\"roc\"><h2>ROC curves</h2>");
    h.push_str(&figure(dir, "roc.png", "ROC curve per class", "plot"));
    h.push_str("</section>");

    h.push_str("<section id=\"similarity\"><h2>Per-layer cosine similarity of the data vectors</h2>");
    if report.similarity.is_empty() {
        h.push_str("<p>No vectors were compared in this run.</p>");
    } else {
        let mean = report.similarity.iter().map(|s| s.between_shards).sum::<f64>() / report.similarity.len() as f64;
        let _ = write!(h, "<p>Mean between shard vectors: {mean:.3} over {} weight tensors.</p>", report.similarity.len());
        h.push_str(&figure(dir, "similarity.png", "per-layer cosine similarity", "plot"));
    }
    h.push_str("</section>");

    h.push_str("<section id=\"gradcam\"><h2>Grad-CAM: where the merged model looked</h2>");
    if c.gallery.is_empty() {
        h.push_str("<p>Grad-CAM was off for this run (evaluation.explainImages: 0) or the set is multi-label.</p>");
    } else {
        let _ = write!(
            h,
            "<p>Heatmaps of the predicted class from layer <code>{}</code>; red is where the evidence was. Over the explained images: share of heat inside the image's foreground {}; as the hottest pixels are removed, the area under the probability curve is {} (deletion, lower is better), and as they are revealed on a blurred copy {} (insertion, higher is better); deleting the coldest pixels first keeps {} more area than deleting the hottest first (about 0: the maps are noise to the model).</p>",
            escape(c.explain_layer.as_deref().unwrap_or("?")),
            opt(p.heat.foreground_fraction, pct),
            opt(p.heat.deletion_auc, auc),
            opt(p.heat.insertion_auc, auc),
            opt(p.heat.deletion_gain, auc)
        );
        for (title, correct) in [("Correct predictions", true), ("Wrong predictions", false)] {
            let items: Vec<_> = c.gallery.iter().filter(|g| g.correct() == correct).collect();
            let _ = write!(h, "<h3>{title}</h3>");
            if items.is_empty() {
                h.push_str("<p>None among the explained images.</p>");
                continue;
            }
            h.push_str("<div class=\"gallery\">");
            for g in items {
                let _ = write!(
                    h,
                    "<figure>{}<figcaption><span class=\"{}\">{} ({:.0} %)</span><br>true: {}<br>{}<br>heat in foreground: {}<br>deletion / insertion AUC: {} / {}</figcaption></figure>",
                    figure(dir, &g.overlay, &g.image, "cam"),
                    if correct { "right" } else { "wrong" },
                    escape(&g.predicted),
                    100.0 * g.probability,
                    escape(&g.label),
                    escape(&g.image),
                    opt(g.heat.foreground_fraction, pct),
                    opt(g.heat.deletion_auc, auc),
                    opt(g.heat.insertion_auc, auc)
                );
            }
            h.push_str("</div>");
        }
    }
    h.push_str("</section>");

    let spec = serde_json::to_string_pretty(&report.spec).unwrap_or_default();
    let _ = write!(h, "<section id=\"settings\"><h2>Settings that produced this run</h2><pre>{}</pre></section>", escape(&spec));
    let _ = write!(h, "<footer><p id=\"figures\">figures not checked (scripts disabled)</p></footer>{FIGURE_CHECK}</body></html>");
    h
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
            spec: serde_json::json!({"merge": {"lambda": 0.5}}),
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
