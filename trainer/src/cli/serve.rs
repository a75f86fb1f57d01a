//! Serves a model over the Open Inference Protocol (v2) REST API, as a KServe custom predictor.

use std::path::PathBuf;

use medmerge_trainer::model::Network;
use medmerge_trainer::serve::{serve, ServedModel};
use tch::Device;

use crate::stdout::say;

/// The subcommand's flags.
#[derive(clap::Args)]
pub struct Args {
    /// Model file (e.g. the restored merged model).
    #[arg(long)]
    model: PathBuf,
    /// Name in `/v2/models/{name}`.
    #[arg(long, default_value = "medmerge")]
    name: String,
    /// Address to listen on (KServe's containers listen on 8080).
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: String,
}

/// Runs the subcommand until the process is stopped.
pub fn run(a: Args, dev: Device) -> anyhow::Result<()> {
    let net = Network::load(&a.model, dev)?;
    let model = ServedModel::new(a.name, net, dev);
    let name = model.name.clone();
    serve(model, &a.listen, |address| say!("serving {name} on http://{address}/v2/models/{name}"))
}
