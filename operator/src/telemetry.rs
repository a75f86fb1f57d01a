//! Health and Prometheus metrics: counters the controller updates and a small HTTP endpoint
//! serving `/healthz`, `/readyz` and `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, warn};

/// Upper bounds (seconds) of the reconcile duration histogram's buckets.
const BUCKETS: [f64; 8] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// What the operator has done, for `/metrics` and `/readyz`.
#[derive(Default)]
pub struct Metrics {
    reconciles: AtomicU64,
    errors: AtomicU64,
    stage_jobs_created: AtomicU64,
    durations: Mutex<Histogram>,
    phases: Mutex<BTreeMap<String, String>>,
    ready: AtomicBool,
}

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Metrics {
    /// Records one finished reconcile.
    pub fn reconciled(&self, took: Duration, failed: bool) {
        self.reconciles.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let seconds = took.as_secs_f64();
        let mut h = self.durations.lock().unwrap_or_else(|e| e.into_inner());
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += seconds;
    }

    /// Records stage Jobs created.
    pub fn jobs_created(&self, n: usize) {
        self.stage_jobs_created.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Records the phase of MergeJob `namespace/name` (or forgets it with `None`).
    pub fn set_phase(&self, key: &str, phase: Option<&str>) {
        let mut phases = self.phases.lock().unwrap_or_else(|e| e.into_inner());
        match phase {
            Some(p) => phases.insert(key.into(), p.into()),
            None => phases.remove(key),
        };
    }

    /// Marks the operator ready (it holds leadership and its controller is running).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter(&mut out, "medmerge_reconciles_total", "Reconciles run.", self.reconciles.load(Ordering::Relaxed));
        counter(&mut out, "medmerge_reconcile_errors_total", "Reconciles that failed and were retried.", self.errors.load(Ordering::Relaxed));
        counter(&mut out, "medmerge_stage_jobs_created_total", "Stage Jobs created.", self.stage_jobs_created.load(Ordering::Relaxed));
        let h = self.durations.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP medmerge_reconcile_duration_seconds Time per reconcile.\n# TYPE medmerge_reconcile_duration_seconds histogram");
        for (bound, count) in BUCKETS.iter().zip(h.counts) {
            let _ = writeln!(out, "medmerge_reconcile_duration_seconds_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "medmerge_reconcile_duration_seconds_bucket{{le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "medmerge_reconcile_duration_seconds_sum {}\nmedmerge_reconcile_duration_seconds_count {}", h.sum, h.count);
        let phases = self.phases.lock().unwrap_or_else(|e| e.into_inner());
        let mut by_phase: BTreeMap<&str, u64> = BTreeMap::new();
        for phase in phases.values() {
            *by_phase.entry(phase.as_str()).or_default() += 1;
        }
        let _ = writeln!(out, "# HELP medmerge_mergejobs MergeJobs by phase.\n# TYPE medmerge_mergejobs gauge");
        for phase in ["Pending", "Training", "Merging", "Restoring", "Evaluating", "Succeeded", "Failed", "Suspended"] {
            let _ = writeln!(out, "medmerge_mergejobs{{phase=\"{phase}\"}} {}", by_phase.get(phase).copied().unwrap_or(0));
        }
        out
    }
}

/// (status line, content type, body) for a request path.
fn respond(metrics: &Metrics, path: &str) -> (&'static str, &'static str, String) {
    match path {
        "/healthz" | "/livez" => ("200 OK", "text/plain", "ok\n".into()),
        "/readyz" if metrics.is_ready() => ("200 OK", "text/plain", "ready\n".into()),
        "/readyz" => ("503 Service Unavailable", "text/plain", "not ready: waiting for leadership or the first watch\n".into()),
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
        _ => ("404 Not Found", "text/plain", "not found; try /healthz, /readyz or /metrics\n".into()),
    }
}

/// Serves health and metrics on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let (mut socket, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(error) => {
                warn!(%error, "metrics endpoint: accept failed");
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let n = match tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/").split('?').next().unwrap_or("/").to_string();
            debug!(%peer, %path, "metrics endpoint request");
            let (status, content_type, body) = respond(&metrics, &path);
            let response = format!("HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_counters_histogram_and_phases_in_prometheus_text() {
        let m = Metrics::default();
        m.reconciled(Duration::from_millis(30), false);
        m.reconciled(Duration::from_secs(3), true);
        m.jobs_created(4);
        m.set_phase("ns/a", Some("Training"));
        m.set_phase("ns/b", Some("Training"));
        m.set_phase("ns/c", Some("Failed"));
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
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn readiness_follows_the_flag_and_unknown_paths_are_404() {
        let m = Metrics::default();
        assert_eq!(respond(&m, "/readyz").0, "503 Service Unavailable");
        m.set_ready(true);
        assert_eq!(respond(&m, "/readyz").0, "200 OK");
        assert_eq!(respond(&m, "/healthz").0, "200 OK");
        assert_eq!(respond(&m, "/nope").0, "404 Not Found");
    }

    #[tokio::test]
    async fn the_endpoint_answers_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::default());
        let server = tokio::spawn(serve(listener, metrics));
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK") && response.contains("medmerge_reconciles_total 0"), "{response}");
        server.abort();
    }
}
