//! `medmerge-trainer`: every deep-learning stage of medmerge as a subcommand, plus `pipeline`,
//! which runs a whole MergeJob in process.

mod stdout;
mod store_cli;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::builder::TypedValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};
use medmerge_crds::{
    validate_merge, validate_model, validate_training, Architecture, AugmentSpec, HeadStrategy, MergeMethod, MergeSpec, ModelSpec, Optimizer, RestoreMode, Schedule, SpecError, TrainingSpec,
    WeightsSource,
};
use medmerge_trainer::checkpoint::{ArtifactKind, ArtifactMeta};
use medmerge_trainer::data::Dataset;
use medmerge_trainer::evaluate::{evaluate, predict};
use medmerge_trainer::explain::{explain_images, mean, ExplainOptions};
use medmerge_trainer::merge::{merge_checked, write_vector, MergeOptions, ShardVector};
use medmerge_trainer::metrics::argmax;
use medmerge_trainer::model::Network;
use medmerge_trainer::pipeline::{init_base, Job, Runner};
use medmerge_trainer::report::{CandidateResult, EvalReport, HeatMeasures};
use medmerge_trainer::restore::rounds::restore_in_process;
use medmerge_trainer::restore::{apply_moments, collect_moments, combine_moments, load_moments, save_moments};
use medmerge_trainer::st::{write_atomic, MappedFile};
use medmerge_trainer::table::CsvTable;
use medmerge_trainer::{split, synth, train};
use stdout::say;
use tch::Device;

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
    Pipeline {
        /// MergeJob YAML file.
        job: PathBuf,
        /// Run only this stage (e.g. `finetune-hospital-a`), as a cluster Job would.
        #[arg(long)]
        stage: Option<String>,
        /// Print every stage and whether it is done, ready or waiting; run nothing.
        #[arg(long, conflicts_with = "stage")]
        plan: bool,
        /// With `--stage collect-<shard>`: wait up to this many seconds for the hospital's
        /// vector to appear (looking every 10 s) instead of failing at once.
        #[arg(long, requires = "stage", default_value_t = 0)]
        wait_for_vector: u64,
        /// Leave this shard out (repeatable): the operator drops shards that failed or missed
        /// the straggler deadline, and later stages run without them.
        #[arg(long)]
        exclude_shard: Vec<String>,
    },
    /// List, upload and download artifacts (a hospital uploads its vector with `store put`).
    Store(store_cli::StoreArgs),
    /// Write the base model (pretrained weights plus a new seeded head).
    Init(InitArgs),
    /// Fine-tune the base on one shard's images and write the shard's data vector.
    Finetune(FinetuneArgs),
    /// Merge data vectors onto the base.
    Merge(MergeArgs),
    /// Compute a model's batch-norm moments on one shard (only aggregates leave the shard).
    BnStats {
        /// Model to restore.
        #[arg(long)]
        model: PathBuf,
        /// The shard's images (ImageFolder or manifest).
        #[arg(long)]
        data: PathBuf,
        /// Output moments file.
        #[arg(long)]
        out: PathBuf,
        /// Images per batch.
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
        batch_size: usize,
    },
    /// Restore a merged model's batch-norm state.
    Restore(RestoreArgs),
    /// Evaluate models on a labelled set and print a results table.
    Evaluate {
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
    },
    /// Predict classes for images; writes CSV (image, predicted class, per-class probabilities).
    Predict {
        /// Model file.
        #[arg(long)]
        model: PathBuf,
        /// An image, a folder of images (searched recursively) or a manifest.
        #[arg(long)]
        input: PathBuf,
        /// Output CSV (stdout when omitted).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also write a Grad-CAM heatmap per image into this directory (adds a `heatmap` column).
        #[arg(long)]
        explain: Option<PathBuf>,
    },
    /// Grad-CAM: writes each image with a heatmap of where the model looked, plus
    /// explanations.csv (prediction, explained class, share of heat inside the image's
    /// foreground, areas under the deletion and insertion curves).
    Explain {
        /// Model file.
        #[arg(long)]
        model: PathBuf,
        /// An image, a folder of images (searched recursively) or a manifest (labels kept).
        #[arg(long)]
        input: PathBuf,
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
    },
    /// Cut an ImageFolder into a held-out test set and N shards, as manifests.
    Split {
        /// ImageFolder to split.
        #[arg(long)]
        data: PathBuf,
        /// Output directory for test.csv and shard-N.csv.
        #[arg(long)]
        out: PathBuf,
        /// Number of shards.
        #[arg(long, default_value_t = 4)]
        shards: usize,
        /// Fraction held out for testing (stratified).
        #[arg(long, default_value_t = 0.2)]
        test_fraction: f64,
        /// Seed.
        #[arg(long, default_value_t = 3315)]
        seed: u64,
        /// Label-skewed (non-IID) shards with this Dirichlet concentration instead of equal random ones.
        #[arg(long, conflicts_with = "sizes")]
        dirichlet: Option<f64>,
        /// Size-skewed shards with these relative sizes, comma-separated (one per shard, e.g. 50,25,15,10).
        #[arg(long, value_delimiter = ',')]
        sizes: Vec<f64>,
        /// Before splitting, subsample the classes (in label order) to these relative
        /// proportions, comma-separated (e.g. 70,15,10,5): an imbalanced variant.
        #[arg(long, value_delimiter = ',')]
        class_fractions: Vec<f64>,
    },
    /// Generate a small labelled image set (shapes) for demos and tests.
    Synth {
        /// Output ImageFolder.
        #[arg(long)]
        out: PathBuf,
        /// Number of classes (2-4).
        #[arg(long, default_value_t = 3)]
        classes: usize,
        /// Images per class.
        #[arg(long, default_value_t = 60)]
        per_class: usize,
        /// Image side in pixels.
        #[arg(long, default_value_t = 64)]
        size: u32,
        /// Per-pixel noise, in grey levels (0-255).
        #[arg(long, default_value_t = 20)]
        noise: i16,
        /// Seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

#[derive(Args)]
struct InitArgs {
    /// Architecture.
    #[arg(long, default_value = "efficientnet-lite0")]
    arch: String,
    /// imagenet (efficientnet-lite0), random, or a .safetensors/.pth file.
    #[arg(long, default_value = "imagenet")]
    weights: String,
    /// Class names, comma-separated (or give --data to read them from an ImageFolder).
    #[arg(long, value_delimiter = ',')]
    classes: Vec<String>,
    /// An ImageFolder whose folder names are the classes.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Input resolution.
    #[arg(long, default_value_t = 128)]
    image_size: u32,
    /// Seed for new layers.
    #[arg(long, default_value_t = 3315)]
    seed: u64,
    /// Multi-label model (sigmoid per class, binary cross-entropy).
    #[arg(long)]
    multi_label: bool,
    /// Output base model.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct FinetuneArgs {
    /// Base model written by `init`.
    #[arg(long)]
    base: PathBuf,
    /// The shard's images (ImageFolder or manifest).
    #[arg(long)]
    data: PathBuf,
    /// Shard name recorded in the vector.
    #[arg(long)]
    shard: String,
    /// Output vector file.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    training: TrainingArgs,
}

#[derive(Args)]
struct TrainingArgs {
    /// Epochs.
    #[arg(long, default_value_t = 3)]
    epochs: u32,
    /// Batch size.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    batch_size: u32,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Optimiser: adam, adamW, sgd.
    #[arg(long, default_value = "adam")]
    optimizer: String,
    /// Schedule: constant, cosine.
    #[arg(long, default_value = "constant")]
    schedule: String,
    /// Weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Seed.
    #[arg(long, default_value_t = 3315)]
    seed: u64,
    /// Held-out fraction for picking the epoch with the best balanced accuracy (0: the last).
    #[arg(long, default_value_t = 0.0)]
    validation_fraction: f64,
    /// Disable class-weighted cross-entropy.
    #[arg(long)]
    no_class_weighting: bool,
    /// Disable random flips.
    #[arg(long)]
    no_flip: bool,
    /// On CUDA, train with float16 autocast and dynamic loss scaling.
    #[arg(long)]
    mixed_precision: bool,
}

/// Refuses flag values the spec would refuse, naming the flag (and the spec field with the same
/// rule): one set of bounds for the CLI and MergeJobs.
fn check_flags(errors: Vec<SpecError>, flags: &[(&str, &str)]) -> anyhow::Result<()> {
    let Some(first) = errors.first() else { return Ok(()) };
    let names = |field: &str| first.field == field || first.field.starts_with(&format!("{field}["));
    let flag = flags.iter().find(|(field, _)| names(field)).map_or("", |(_, flag)| flag);
    anyhow::bail!("{flag}: {} (the same rule as spec.{})", first.message, first.field)
}

impl TrainingArgs {
    fn spec(&self) -> anyhow::Result<TrainingSpec> {
        let spec = self.unchecked()?;
        let flags = [
            ("training.epochs", "--epochs"),
            ("training.batchSize", "--batch-size"),
            ("training.learningRate", "--lr"),
            ("training.weightDecay", "--weight-decay"),
            ("training.validationFraction", "--validation-fraction"),
        ];
        check_flags(validate_training(&spec), &flags)?;
        Ok(spec)
    }

    fn unchecked(&self) -> anyhow::Result<TrainingSpec> {
        Ok(TrainingSpec {
            epochs: self.epochs,
            batch_size: self.batch_size,
            optimizer: serde_yaml::from_str::<Optimizer>(&self.optimizer).with_context(|| format!("--optimizer {}", self.optimizer))?,
            learning_rate: self.lr,
            weight_decay: self.weight_decay,
            schedule: serde_yaml::from_str::<Schedule>(&self.schedule).with_context(|| format!("--schedule {}", self.schedule))?,
            seed: self.seed,
            class_weighting: !self.no_class_weighting,
            validation_fraction: self.validation_fraction,
            augment: AugmentSpec { flip: !self.no_flip, ..AugmentSpec::default() },
            mixed_precision: self.mixed_precision,
        })
    }
}

#[derive(Args)]
struct MergeArgs {
    /// Base model.
    #[arg(long)]
    base: PathBuf,
    /// Vectors as NAME=PATH (repeatable).
    #[arg(long = "vector", required = true)]
    vectors: Vec<String>,
    /// data-vector, params-mean, random-vector, ties, dare.
    #[arg(long, default_value = "data-vector")]
    method: String,
    /// Scale of the summed vectors.
    #[arg(long, default_value_t = 1.0)]
    lambda: f64,
    /// Weight heads by shard sample counts instead of a plain mean.
    #[arg(long)]
    sample_weighted_heads: bool,
    /// TIES density.
    #[arg(long, default_value_t = 0.2)]
    ties_density: f64,
    /// DARE drop rate.
    #[arg(long, default_value_t = 0.9)]
    dare_drop_rate: f64,
    /// Keep pretrained layers unchanged (average heads only): the restoration-alone control.
    #[arg(long)]
    pretrained_only: bool,
    /// Seed.
    #[arg(long, default_value_t = 3315)]
    seed: u64,
    /// Output model.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct RestoreArgs {
    /// Merged model.
    #[arg(long)]
    model: PathBuf,
    /// bn-recalibrate, closed-form-head, averaged-epoch, averaged-epoch-head, finetune-epoch, none.
    #[arg(long, default_value = "bn-recalibrate")]
    mode: String,
    /// Shard images, in order (repeatable).
    #[arg(long = "data")]
    data: Vec<PathBuf>,
    /// Pre-computed moments from `bn-stats` (repeatable; bn-recalibrate only, instead of --data).
    #[arg(long = "stats")]
    stats: Vec<PathBuf>,
    /// Output model.
    #[arg(long)]
    out: PathBuf,
    /// Training settings of the modes that train (one epoch per shard; --epochs is ignored).
    #[command(flatten)]
    training: TrainingArgs,
}

fn device(name: &str) -> anyhow::Result<Device> {
    match name {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        "cuda" => anyhow::bail!("--device cuda: no CUDA device is available to libtorch"),
        other => anyhow::bail!("--device {other}: expected auto, cpu or cuda"),
    }
}

fn model_meta(path: &std::path::Path) -> anyhow::Result<ArtifactMeta> {
    Ok(ArtifactMeta::from_map(path, MappedFile::open(path)?.metadata(), ArtifactKind::Model)?)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let sub = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => sub.json().init(),
        LogFormat::Text => sub.init(),
    }
    if let Some(n) = cli.threads {
        tch::set_num_threads(n);
    }
    let dev = device(&cli.device)?;
    match cli.command {
        Command::Pipeline { job, stage, plan, wait_for_vector, exclude_shard } => {
            let mut job = Job::load(&job)?;
            job.exclude_shards(&exclude_shard)?;
            let runner = Runner::new(job, dev)?;
            if plan {
                for (name, state) in runner.status()? {
                    say!("{state:8} {name}");
                }
            } else if let Some(stage) = stage {
                runner.wait_for_vector(&stage, std::time::Duration::from_secs(wait_for_vector))?;
                runner.run_stage(&stage)?;
            } else {
                let report = runner.run()?;
                say!("{}", report.table());
                say!("artifacts: {}", report.run);
            }
        }
        Command::Init(a) => {
            let arch = Architecture::parse(&a.arch).with_context(|| format!("--arch {}: unknown architecture", a.arch))?;
            let classes = match (&a.data, a.classes.is_empty()) {
                (Some(d), true) => Dataset::open(d, None)?.classes,
                (None, true) => anyhow::bail!("--classes or --data is required to know the classes"),
                _ => a.classes.clone(),
            };
            let (weights, weights_path) = match a.weights.as_str() {
                "imagenet" => (WeightsSource::Imagenet, None),
                "random" => (WeightsSource::Random, None),
                path => (WeightsSource::File, Some(path.to_string())),
            };
            let model = ModelSpec { architecture: arch, weights, weights_path: weights_path.clone(), classes: classes.clone(), image_size: a.image_size, seed: a.seed, multi_label: a.multi_label };
            check_flags(validate_model(&model), &[("model.imageSize", "--image-size"), ("model.classes", "--classes"), ("model.weights", "--weights")])?;
            let net = init_base(&model, &classes, dev, weights_path.map(PathBuf::from))?;
            let meta = ArtifactMeta { kind: ArtifactKind::Model, arch, classes, image_size: a.image_size, base_digest: String::new(), shard: None, class_counts: vec![], multi_label: a.multi_label };
            net.save(&a.out, &meta)?;
            say!("base model written to {}", a.out.display());
        }
        Command::Finetune(a) => {
            let training = a.training.spec()?;
            let mut net = Network::load(&a.base, dev)?;
            let data = Dataset::open(&a.data, Some(&net.classes))?;
            let report = train::train(&mut net, &data, &training, dev, &a.shard)?;
            write_vector(&net, &a.base, &a.shard, report.class_counts.clone(), &a.out)?;
            say!("data vector of shard {} written to {} (best epoch {})", a.shard, a.out.display(), report.best_epoch);
        }
        Command::Merge(a) => {
            let vectors = a
                .vectors
                .iter()
                .map(|v| v.split_once('=').map(|(s, p)| ShardVector { shard: s.into(), path: p.into() }).with_context(|| format!("--vector {v}: expected NAME=PATH")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let method = MergeMethod::parse(&a.method).with_context(|| format!("--method {}: unknown merge method", a.method))?;
            let bounds = MergeSpec { lambda: a.lambda, ties_density: a.ties_density, dare_drop_rate: a.dare_drop_rate, ..MergeSpec::default() };
            check_flags(validate_merge(&bounds), &[("merge.lambda", "--lambda"), ("merge.tiesDensity", "--ties-density"), ("merge.dareDropRate", "--dare-drop-rate")])?;
            let opts = MergeOptions {
                method,
                lambda: a.lambda,
                heads: if a.sample_weighted_heads { HeadStrategy::SampleWeighted } else { HeadStrategy::Mean },
                ties_density: a.ties_density,
                dare_drop_rate: a.dare_drop_rate,
                seed: a.seed,
                pretrained_only: a.pretrained_only,
            };
            merge_checked(&a.base, &vectors, &opts, &a.out, dev)?;
            say!("merged model written to {}", a.out.display());
        }
        Command::BnStats { model, data, out, batch_size } => {
            let net = Network::load(&model, dev)?;
            let ds = Dataset::open(&data, Some(&net.classes))?;
            let moments = collect_moments(&net, &ds, batch_size, dev)?;
            save_moments(&out, &moments, &model_meta(&model)?)?;
            say!("batch-norm moments written to {}", out.display());
        }
        Command::Restore(a) => {
            let modes: Vec<&str> = RestoreMode::ALL.iter().map(|m| m.as_str()).collect();
            let mode = RestoreMode::parse(&a.mode).with_context(|| format!("--mode {}: expected one of {}", a.mode, modes.join(", ")))?;
            if !a.stats.is_empty() {
                anyhow::ensure!(mode == RestoreMode::BnRecalibrate && a.data.is_empty(), "--stats goes with --mode bn-recalibrate and no --data");
                let net = Network::load(&a.model, dev)?;
                let parts = a.stats.iter().map(|s| load_moments(s)).collect::<Result<Vec<_>, _>>()?;
                apply_moments(&net, &combine_moments(&parts), &a.model.display().to_string())?;
                net.check_valid().with_context(|| format!("restored {}", a.out.display()))?;
                net.save(&a.out, &model_meta(&a.model)?)?;
            } else {
                anyhow::ensure!(mode == RestoreMode::None || !a.data.is_empty(), "--mode {}: needs --data (one per shard)", a.mode);
                let classes = Network::load(&a.model, dev)?.classes;
                let shards = a.data.iter().enumerate().map(|(i, d)| Ok((format!("shard-{}", i + 1), Dataset::open(d, Some(&classes))?))).collect::<anyhow::Result<Vec<_>>>()?;
                let mut work = a.out.as_os_str().to_owned();
                work.push(".parts");
                let work = PathBuf::from(work);
                let training = TrainingSpec { epochs: 1, validation_fraction: 0.0, ..a.training.spec()? };
                let result = restore_in_process(mode, &a.model, &shards, &training, dev, &work, &a.out);
                let _ = std::fs::remove_dir_all(&work);
                result.with_context(|| format!("restoring {} ({})", a.model.display(), mode.as_str()))?;
            }
            say!("restored model written to {}", a.out.display());
        }
        Command::Evaluate { models, data, json, batch_size } => {
            let mut candidates = Vec::new();
            let mut classes = Vec::new();
            let mut n = 0;
            for m in &models {
                let net = Network::load(m, dev)?;
                let ds = Dataset::open(&data, Some(&net.classes))?;
                n = ds.samples.len();
                classes = net.classes.clone();
                let metrics = evaluate(&net, &ds, batch_size, dev)?;
                candidates.push(CandidateResult { id: m.display().to_string(), description: m.display().to_string(), metrics, heat: Default::default() });
            }
            let report = EvalReport { job: String::new(), run: String::new(), classes, test_images: n, candidates, similarity: vec![], spec: serde_json::Value::Null, clinical: Default::default() };
            say!("{}", report.table());
            if let Some(j) = json {
                write_atomic(&j, &serde_json::to_vec_pretty(&report)?)?;
            }
        }
        Command::Store(args) => store_cli::run(args)?,
        Command::Predict { model, input, out, explain } => {
            let net = Network::load(&model, dev)?;
            let (ds, _) = prediction_inputs(&input, &net)?;
            let probs = predict(&net, &ds, 32, dev)?;
            let heatmaps = match &explain {
                Some(dir) => Some(explain_images(&net, &unlabelled(&ds), dir, &ExplainOptions::default(), dev)?),
                None => None,
            };
            let heat_column = heatmaps.as_ref().map(|_| "heatmap".to_string());
            let header = ["image".to_string(), "predicted".to_string()].into_iter().chain(net.classes.iter().map(|c| format!("p_{c}"))).chain(heat_column);
            let mut table = CsvTable::new(header);
            for (i, (s, p)) in ds.samples.iter().zip(&probs).enumerate() {
                let predicted =
                    if net.multi_label { net.classes.iter().zip(p).filter(|(_, &v)| v >= 0.5).map(|(c, _)| c.as_str()).collect::<Vec<_>>().join("|") } else { net.classes[argmax(p)].clone() };
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
        }
        Command::Explain { model, input, out, layer, class } => {
            let net = Network::load(&model, dev)?;
            let (ds, labelled) = prediction_inputs(&input, &net)?;
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
        }
        Command::Split { data, out, shards, test_fraction, seed, dirichlet, sizes, class_fractions } => {
            anyhow::ensure!(shards >= 1, "--shards must be at least 1");
            anyhow::ensure!((0.0..1.0).contains(&test_fraction), "--test-fraction must be in [0, 1)");
            let positive = |v: &[f64]| v.iter().all(|x| x.is_finite() && *x >= 0.0) && v.iter().sum::<f64>() > 0.0;
            let skew = match (dirichlet, sizes.is_empty()) {
                (Some(a), _) => {
                    anyhow::ensure!(a.is_finite() && a > 0.0, "--dirichlet must be positive");
                    split::Skew::Dirichlet(a)
                }
                (None, false) => {
                    anyhow::ensure!(sizes.len() == shards && positive(&sizes), "--sizes needs {shards} non-negative numbers (one per shard), not all 0");
                    split::Skew::Sizes(sizes)
                }
                (None, true) => split::Skew::Equal,
            };
            let mut ds = Dataset::open(&data, None)?;
            if !class_fractions.is_empty() {
                let k = ds.classes.len();
                anyhow::ensure!(class_fractions.len() == k && positive(&class_fractions), "--class-fractions needs {k} non-negative numbers (one per class: {}), not all 0", ds.classes.join(", "));
                ds = ds.subset(&split::subsample_classes(&ds, &class_fractions, seed));
            }
            let s = split::split(&ds, shards, test_fraction, seed, &skew);
            ds.subset(&s.test).write_manifest(&out.join("test.csv"))?;
            for (i, idx) in s.shards.iter().enumerate() {
                let sub = ds.subset(idx);
                sub.write_manifest(&out.join(format!("shard-{}.csv", i + 1)))?;
                say!("shard-{}: {} images, per class {:?}", i + 1, idx.len(), sub.class_counts());
            }
            say!("test: {} images; manifests in {}", s.test.len(), out.display());
        }
        Command::Synth { out, classes, per_class, size, noise, seed } => {
            synth::generate_noisy(&out, classes, per_class, size, seed, noise)?;
            say!("generated {} classes x {per_class} images of {size}px in {}", classes.clamp(2, 4), out.display());
        }
    }
    Ok(())
}

/// The images `predict` and `explain` read: one image, a folder (searched recursively, no
/// labels) or a manifest/ImageFolder dataset; the flag says whether labels are real.
fn prediction_inputs(input: &Path, net: &Network) -> anyhow::Result<(Dataset, bool)> {
    if input.is_file() && input.extension().is_some_and(|e| e != "csv") {
        let sample = medmerge_trainer::data::Sample { path: input.into(), label: 0, targets: vec![] };
        Ok((Dataset { source: input.into(), classes: net.classes.clone(), samples: vec![sample], multi_label: false }, false))
    } else if input.is_dir() {
        Ok((Dataset::unlabelled(input, &net.classes)?, false))
    } else {
        Ok((Dataset::open(input, Some(&net.classes))?, true))
    }
}

/// `data`'s image paths without labels.
fn unlabelled(data: &Dataset) -> Vec<(PathBuf, Option<usize>)> {
    data.samples.iter().map(|s| (s.path.clone(), None)).collect()
}
