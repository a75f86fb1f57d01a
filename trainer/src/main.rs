//! `medmerge-trainer`: every deep-learning stage of medmerge as a subcommand, plus `pipeline`,
//! which runs a whole MergeJob in process. Each subcommand lives in `cli/`; this file is the table.

mod cli;
mod stdout;

use clap::{Parser, Subcommand, ValueEnum};
use cli::{bn_stats, device, evaluate, explain, export, finetune, init, merge, pipeline, predict, release, restore, secure, serve, split, store, synth};

/// Fine-tune, merge, restore and evaluate image classifiers from data vectors.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Compute device: auto (CUDA when available), cpu, cuda.
    #[arg(long, global = true, env = "MEDMERGE_DEVICE", default_value = "auto")]
    device: String,
    /// CPU threads for libtorch (default: all cores).
    #[arg(long, global = true, env = "MEDMERGE_THREADS", value_parser = clap::value_parser!(i32).range(1..))]
    threads: Option<i32>,
    /// Log format.
    #[arg(long, global = true, env = "MEDMERGE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a whole MergeJob (YAML) in process against its local artifact directory.
    Pipeline(pipeline::Args),
    /// List, upload and download artifacts (a hospital uploads its vector with `store put`).
    Store(store::StoreArgs),
    /// Write the base model (pretrained weights plus a new seeded head).
    Init(init::Args),
    /// Fine-tune the base on one shard's images and write the shard's data vector.
    Finetune(finetune::Args),
    /// Release a written vector again before upload: differential-privacy noise and/or a
    /// compact encoding (int8, top-k).
    Release(release::Args),
    /// Secure aggregation, a hospital's side: its key, its masked vector, its dropout shares.
    #[command(subcommand)]
    Secure(secure::Action),
    /// Merge data vectors (or masked ones, from their sum alone) onto the base.
    Merge(merge::Args),
    /// Compute a model's batch-norm moments on one shard (only aggregates leave the shard).
    BnStats(bn_stats::Args),
    /// Restore a merged model: batch-norm statistics, a closed-form head or training passes.
    Restore(restore::Args),
    /// Evaluate models on a labelled set and print a results table.
    Evaluate(evaluate::Args),
    /// Predict classes for images; writes CSV (image, predicted class, per-class probabilities).
    Predict(predict::Args),
    /// Grad-CAM: writes each image with a heatmap of where the model looked, plus
    /// explanations.csv (prediction, explained class, share of heat inside the image's
    /// foreground, areas under the deletion and insertion curves).
    Explain(explain::Args),
    /// Write a model as ONNX (opset 17; float32, or int8 weights for edge devices).
    Export(export::Args),
    /// Serve a model over the Open Inference Protocol (v2: KServe, Triton) with dynamic batching
    /// and Prometheus metrics.
    Serve(serve::Args),
    /// Cut an ImageFolder into a held-out test set and N shards, as manifests.
    Split(split::Args),
    /// Generate a small labelled image set (shapes) for demos and tests.
    Synth(synth::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let sub = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => sub.json().init(),
        LogFormat::Text => sub.init(),
    }
    // Before libtorch allocates anything: every stage trains or runs batches through a model.
    medmerge_trainer::allocator::reuse_freed_memory();
    if let Some(n) = cli.threads {
        tch::set_num_threads(n);
    }
    let dev = device(&cli.device)?;
    match cli.command {
        Command::Pipeline(args) => pipeline::run(args, dev),
        Command::Store(args) => store::run(args),
        Command::Init(args) => init::run(args, dev),
        Command::Finetune(args) => finetune::run(args, dev),
        Command::Release(args) => release::run(args),
        Command::Secure(action) => secure::run(action),
        Command::Merge(args) => merge::run(args, dev),
        Command::BnStats(args) => bn_stats::run(args, dev),
        Command::Restore(args) => restore::run(args, dev),
        Command::Evaluate(args) => evaluate::run(args, dev),
        Command::Predict(args) => predict::run(args, dev),
        Command::Explain(args) => explain::run(args, dev),
        Command::Export(args) => export::run(args),
        Command::Serve(args) => serve::run(args, dev),
        Command::Split(args) => split::run(args, dev),
        Command::Synth(args) => synth::run(args, dev),
    }
}
