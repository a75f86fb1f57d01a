//! The HTML report opens in a real headless browser (Debian's chromium): every section is in
//! the rendered page, every embedded figure decodes, and the full-page screenshot has content.
//! Run by `make test` after scripts/setup-chromium.sh; MEDMERGE_REPORT_SCREENSHOT keeps the
//! screenshot.

use std::path::Path;
use std::process::Command;

use medmerge_trainer::pipeline::{Job, Runner};
use medmerge_trainer::synth::tiny_local_job;
use tch::Device;

fn chromium(args: &[&str], page: &Path) -> std::process::Output {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(std::env::var("MEDMERGE_CHROMIUM").unwrap_or_else(|_| "chromium".into()))
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("chromium runs (scripts/setup-chromium.sh installs it)");
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
#[ignore = "needs chromium: run `make test` (scripts/setup-chromium.sh)"]
fn the_report_renders_in_chromium_with_every_section_and_figure() {
    tch::set_num_threads(2);
    let dir = tempfile::tempdir().unwrap();
    let job = tiny_local_job(dir.path(), "  merge: {baselines: [paramsMean, shardModels]}\n", 3).unwrap();
    let report = Runner::new(Job::load(&job).unwrap(), Device::Cpu).unwrap().run().unwrap();
    let page = dir.path().join("out/runs/local/tiny/g1/eval/report.html");

    let dom = String::from_utf8(chromium(&["--virtual-time-budget=5000", "--dump-dom"], &page).stdout).unwrap();
    for id in medmerge_trainer::html::SECTIONS {
        assert!(dom.contains(&format!("<section id=\"{id}\">")), "the rendered page lacks section {id}");
    }
    // results, confusion, ROC and similarity plots plus the Grad-CAM gallery.
    let figures = 4 + report.clinical.gallery.len();
    assert!(dom.contains(&format!("{figures} of {figures} figures rendered")), "not every figure decoded: {}", dom.lines().rev().take(3).collect::<Vec<_>>().join("\n"));

    let shot = dir.path().join("report.png");
    chromium(&["--window-size=1200,5200", &format!("--screenshot={}", shot.display())], &page);
    let img = image::open(&shot).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (1200, 5200));
    // Content down the page: each fifth of the screenshot has ink (text, tables or figures).
    for band in 0..5 {
        let rows = band * 1040..(band + 1) * 1040;
        let ink = rows.clone().flat_map(|y| (0..1200).map(move |x| (x, y))).filter(|&(x, y)| img.get_pixel(x, y).0.iter().any(|&c| c < 200)).count();
        assert!(ink > 2000, "rows {rows:?} of the screenshot are blank ({ink} dark pixels)");
    }
    if let Ok(keep) = std::env::var("MEDMERGE_REPORT_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }
}
