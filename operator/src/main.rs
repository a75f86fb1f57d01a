//! `medmerge-operator`: watches MergeJobs and runs each stage as a batch Job.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use medmerge_crds::MergeJob;
use medmerge_operator::artifacts::ArtifactStore;
use medmerge_operator::controller::{self, Context};
use medmerge_operator::image_policy::ImagePolicy;
use medmerge_operator::job_cache::ManagedJob;
use medmerge_operator::leader::LeaderElector;
use medmerge_operator::telemetry::{self, Metrics};
use tracing::info;

/// Runs MergeJobs on Kubernetes: one batch Job per shard and stage, results in the status.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "MEDMERGE_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Log as JSON lines.
    #[arg(long, env = "MEDMERGE_LOG_JSON")]
    log_json: bool,
    /// Address of the /healthz, /readyz and /metrics endpoint.
    #[arg(long, env = "MEDMERGE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Take a Lease before reconciling, so only one replica acts at a time.
    #[arg(long, env = "MEDMERGE_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Namespace of the leader Lease (normally the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, env = "MEDMERGE_LEASE_NAME", default_value = "medmerge-operator")]
    lease_name: String,
    /// This replica's identity in the Lease (normally the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a leader Lease lasts without renewal.
    #[arg(long, env = "MEDMERGE_LEASE_SECONDS", default_value_t = 15)]
    lease_seconds: u64,
    /// Directory where the operator sees `storage.local` artifact stores (relative paths are
    /// resolved against it); results are copied from there into the status.
    #[arg(long, env = "MEDMERGE_LOCAL_ARTIFACTS")]
    local_artifacts: Option<PathBuf>,
    /// API calls at once in each of the operator's two lanes (statuses, and Job changes).
    /// Unbounded, a burst of hundreds flooded the API server and every status lagged by seconds;
    /// with 8, statuses stayed under a second at 1,000 MergeJobs x 8 shards on 2 cores
    /// (bench/results/operator-scale.md).
    #[arg(long, env = "MEDMERGE_CONCURRENCY", default_value_t = controller::DEFAULT_CONCURRENCY, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
    /// Trainer images MergeJobs may run (repeatable, or comma-separated in the variable): an
    /// exact reference, a repository (any tag of it) or a prefix ending in `/`. None: any image.
    #[arg(long = "allowed-image", env = "MEDMERGE_ALLOWED_IMAGES", value_delimiter = ',')]
    allowed_images: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    medmerge_operator::install_crypto_provider();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if args.log_json {
        tracing_subscriber::fmt().with_env_filter(filter).json().init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let client = Client::try_default().await?;
    let metrics = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(args.metrics_addr).await?;
    info!(addr = %args.metrics_addr, "serving /healthz, /readyz and /metrics");
    tokio::spawn(telemetry::serve(listener, metrics.clone()));

    let identity = args.identity.clone().unwrap_or_else(|| format!("medmerge-operator-{}", std::process::id()));
    let elector = args.leader_election.then(|| {
        let leases: Api<Lease> = Api::namespaced(client.clone(), &args.lease_namespace);
        Arc::new(LeaderElector::new(leases, &args.lease_name, &identity, Duration::from_secs(args.lease_seconds)))
    });
    if let Some(elector) = &elector {
        info!(lease = %args.lease_name, namespace = %args.lease_namespace, %identity, "waiting for leadership");
        tokio::select! {
            _ = elector.acquire() => {}
            _ = shutdown_signal() => return Ok(()),
        }
    }

    let artifacts = ArtifactStore::new(args.local_artifacts.clone());
    let (job_store, job_cache) = controller::job_cache();
    let ctx =
        Arc::new(Context::new(client.clone(), &identity, metrics.clone(), artifacts, job_store).with_image_policy(ImagePolicy::new(args.allowed_images.clone())).with_concurrency(args.concurrency));
    let (mjs, jobs): (Api<MergeJob>, Api<ManagedJob>) = match &args.namespace {
        Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client.clone(), ns)),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    // The controller's shutdown future must be Sync, which API calls are not: watch for
    // lost leadership and signals in a task of its own and tell the controller by channel.
    let (stopped, stop) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        match elector {
            Some(elector) => tokio::select! {
                _ = elector.keep() => {}
                _ = shutdown_signal() => {}
            },
            None => shutdown_signal().await,
        }
        let _ = stopped.send(());
    });
    let stop = async move {
        let _ = stop.await;
    };
    metrics.set_ready(true);
    info!(namespace = ?args.namespace, "medmerge-operator reconciling");
    controller::run(mjs, jobs, job_cache, ctx, stop).await;
    metrics.set_ready(false);
    info!("medmerge-operator stopped");
    Ok(())
}

/// Completes on SIGTERM (Kubernetes stopping the pod) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return ctrl_c.await.unwrap_or(()),
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await.unwrap_or(());
}
