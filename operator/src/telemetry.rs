//! Health and Prometheus metrics: counters the controller updates and a small HTTP endpoint
//! serving `/healthz`, `/readyz` and `/metrics`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use medmerge_crds::Phase;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, warn};

/// Upper bounds (seconds) of the reconcile duration histogram's buckets.
const BUCKETS: [f64; 8] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// The OpenMetrics text format's content type.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The `phase` label of `medmerge_mergejobs`.
type PhaseLabel = Vec<(&'static str, &'static str)>;

/// What the operator has done, for `/metrics` and `/readyz`, kept in a prometheus-client
/// registry.
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    errors: Counter,
    stage_jobs_created: Counter,
    durations: Histogram,
    mergejobs: Family<PhaseLabel, Gauge>,
    /// Each MergeJob's last phase, so a change moves it from one gauge to the other.
    phases: Mutex<BTreeMap<String, Phase>>,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let (reconciles, errors, stage_jobs_created) = (Counter::default(), Counter::default(), Counter::default());
        let durations = Histogram::new(BUCKETS);
        let mergejobs = Family::<PhaseLabel, Gauge>::default();
        registry.register("medmerge_reconciles", "Reconciles run", reconciles.clone());
        registry.register("medmerge_reconcile_errors", "Reconciles, and batches of Job changes, that failed and were retried", errors.clone());
        registry.register("medmerge_stage_jobs_created", "Stage Jobs created", stage_jobs_created.clone());
        registry.register("medmerge_reconcile_duration_seconds", "Time per reconcile", durations.clone());
        registry.register("medmerge_mergejobs", "MergeJobs by phase", mergejobs.clone());
        // Every phase is reported, at 0 until a MergeJob reaches it.
        for phase in Phase::ALL {
            mergejobs.get_or_create(&label(phase)).set(0);
        }
        Metrics { registry, reconciles, errors, stage_jobs_created, durations, mergejobs, phases: Mutex::default(), ready: AtomicBool::new(false) }
    }
}

fn label(phase: Phase) -> PhaseLabel {
    vec![("phase", phase.as_str())]
}

impl Metrics {
    /// Records one finished reconcile.
    pub fn reconciled(&self, took: Duration, failed: bool) {
        self.reconciles.inc();
        if failed {
            self.errors.inc();
        }
        self.durations.observe(took.as_secs_f64());
    }

    /// Records a batch of Job changes that failed (it is retried); it is no reconcile, so it
    /// adds neither to the reconcile count nor to their durations.
    pub fn job_changes_failed(&self) {
        self.errors.inc();
    }

    /// Records stage Jobs created.
    pub fn jobs_created(&self, n: usize) {
        self.stage_jobs_created.inc_by(n as u64);
    }

    /// Records the phase of MergeJob `namespace/name` (or forgets it with `None`).
    pub fn set_phase(&self, key: &str, phase: Option<Phase>) {
        let mut phases = self.phases.lock().unwrap_or_else(|e| e.into_inner());
        let previous = match phase {
            Some(p) => phases.insert(key.into(), p),
            None => phases.remove(key),
        };
        if let Some(p) = previous {
            self.mergejobs.get_or_create(&label(p)).dec();
        }
        if let Some(p) = phase {
            self.mergejobs.get_or_create(&label(p)).inc();
        }
    }

    /// Marks the operator ready (it holds leadership and its controller is running).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// (status, content type, body) for a request path.
fn respond(metrics: &Metrics, path: &str) -> (StatusCode, &'static str, String) {
    match path {
        "/healthz" | "/livez" => (StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if metrics.is_ready() => (StatusCode::OK, "text/plain", "ready\n".into()),
        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready: waiting for leadership or the first watch\n".into()),
        "/metrics" => (StatusCode::OK, OPENMETRICS, metrics.render()),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found; try /healthz, /readyz or /metrics\n".into()),
    }
}

async fn handle(metrics: Arc<Metrics>, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    debug!(path = request.uri().path(), "metrics endpoint request");
    let (status, content_type, body) = respond(&metrics, request.uri().path());
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    Ok(response)
}

/// Serves health and metrics over HTTP/1.1 (hyper) on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(error) => {
                warn!(%error, "metrics endpoint: accept failed");
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| handle(metrics.clone(), request));
            // A client that sends nothing is dropped after the header timeout.
            let connection =
                hyper::server::conn::http1::Builder::new().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(Duration::from_secs(5)).serve_connection(TokioIo::new(socket), service);
            if let Err(error) = connection.await {
                debug!(%peer, %error, "metrics endpoint: connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn a_failed_batch_of_job_changes_is_an_error_but_no_reconcile() {
        let m = Metrics::default();
        m.job_changes_failed();
        let text = m.render();
        for line in ["medmerge_reconciles_total 0", "medmerge_reconcile_errors_total 1", "medmerge_reconcile_duration_seconds_count 0"] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn metrics_render_counters_histogram_and_phases_in_prometheus_text() {
        let m = Metrics::default();
        m.reconciled(Duration::from_millis(30), false);
        m.reconciled(Duration::from_secs(3), true);
        m.jobs_created(4);
        m.set_phase("ns/a", Some(Phase::Training));
        m.set_phase("ns/b", Some(Phase::Pending));
        m.set_phase("ns/b", Some(Phase::Training));
        m.set_phase("ns/c", Some(Phase::Failed));
        m.set_phase("ns/c", None);
        let text = m.render();
        for line in [
            "medmerge_reconciles_total 2",
            "medmerge_reconcile_errors_total 1",
            "medmerge_stage_jobs_created_total 4",
            "medmerge_reconcile_duration_seconds_bucket{le=\"0.05\"} 1",
            "medmerge_reconcile_duration_seconds_bucket{le=\"+Inf\"} 2",
            "medmerge_mergejobs{phase=\"Training\"} 2",
            "medmerge_mergejobs{phase=\"Failed\"} 0",
            "medmerge_mergejobs{phase=\"Pending\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn readiness_follows_the_flag_and_unknown_paths_are_404() {
        let m = Metrics::default();
        assert_eq!(respond(&m, "/readyz").0, StatusCode::SERVICE_UNAVAILABLE);
        m.set_ready(true);
        assert_eq!(respond(&m, "/readyz").0, StatusCode::OK);
        assert_eq!(respond(&m, "/healthz").0, StatusCode::OK);
        assert_eq!(respond(&m, "/nope").0, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn the_endpoint_answers_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::default());
        let server = tokio::spawn(serve(listener, metrics));
        // A request split across writes, as slow clients send it.
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET /metr").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        conn.write_all(b"ics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK") && response.contains("medmerge_reconciles_total 0"), "{response}");
        assert!(response.contains("application/openmetrics-text"), "{response}");
        server.abort();
    }
}
