//! Evaluates models on a labelled set and prints a results table.

use std::path::PathBuf;

use clap::builder::TypedValueParser;
use medmerge_trainer::data::Dataset;
use medmerge_trainer::evaluate::evaluate;
use medmerge_trainer::export::quantise_weights;
use medmerge_trainer::model::Network;
use medmerge_trainer::report::{CandidateResult, EvalReport};
use medmerge_trainer::st::write_atomic;
use tch::Device;

use crate::stdout::say;

/// The subcommand's flags.
#[derive(clap::Args)]
pub struct Args {
    /// Model files (repeatable).
    #[arg(long = "model", required = true)]
    models: Vec<PathBuf>,
    /// Labelled images (ImageFolder or manifest).
    #[arg(long)]
    data: PathBuf,
    /// Also write the full metrics as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Images per batch.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
    batch_size: usize,
    /// Also score each model with its weights as the int8 ONNX export stores them (`export
    /// --int8`): what an edge device running that file gets.
    #[arg(long)]
    int8_weights: bool,
}

/// Runs the subcommand.
pub fn run(Args { models, data, json, batch_size, int8_weights }: Args, dev: Device) -> anyhow::Result<()> {
    let mut candidates = Vec::new();
    let mut classes = Vec::new();
    let mut n = 0;
    for m in &models {
        let mut net = Network::load(m, dev)?;
        let ds = Dataset::open(&data, Some(&net.classes))?;
        n = ds.samples.len();
        classes = net.classes.clone();
        let metrics = evaluate(&net, &ds, batch_size, dev)?;
        candidates.push(CandidateResult { id: m.display().to_string(), description: m.display().to_string(), metrics, heat: Default::default() });
        if int8_weights {
            quantise_weights(&mut net)?;
            let metrics = evaluate(&net, &ds, batch_size, dev)?;
            let id = format!("{} (int8 weights)", m.display());
            candidates.push(CandidateResult { id: id.clone(), description: id, metrics, heat: Default::default() });
        }
    }
    let report = EvalReport {
        job: String::new(),
        run: String::new(),
        classes,
        test_images: n,
        candidates,
        similarity: vec![],
        releases: vec![],
        spec: serde_json::Value::Null,
        clinical: Default::default(),
        export: None,
    };
    say!("{}", report.table());
    if let Some(j) = json {
        write_atomic(&j, &serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}
