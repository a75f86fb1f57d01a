//! Operator scale benchmark (bench/operator-scale.sh runs it against the real kube-apiserver of
//! the end-to-end harness, with the operator binary running as the chart's ServiceAccount).
//!
//! Creates MERGEJOBS MergeJobs of SHARDS shards (default 8), plays the Job controller for their
//! `init` and `finetune-*` Jobs (marks them complete as soon as they appear), and measures, per
//! MergeJob, the latency from its last finetune Job turning complete to its status showing all
//! shards ready (`8/8`), under that burst and then in steady state (STEADY more MergeJobs, default 20, created
//! one at a time once everything is quiet). Prints one JSON object with the numbers.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use medmerge_crds::MergeJob;
use serde_json::json;

const NS: &str = "scale";

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn mergejob(i: usize, shards: usize) -> MergeJob {
    let volume = |claim: &str| json!({"persistentVolumeClaim": {"claimName": claim}});
    let shards: Vec<_> = (0..shards).map(|s| json!({"name": format!("h{s}"), "data": {"path": "train.csv", "volume": volume(&format!("h{s}-data"))}})).collect();
    serde_json::from_value(json!({
        "apiVersion": "medmerge.io/v1alpha1", "kind": "MergeJob", "metadata": {"name": format!("mj-{i:04}"), "namespace": NS},
        "spec": {"model": {"architecture": "resnet18", "weights": "random", "imageSize": 32, "classes": ["x", "y"]}, "shards": shards,
                 "evaluation": {"data": {"path": "test.csv", "volume": volume("test-data")}}, "merge": {"baselines": []},
                 "storage": {"local": {"path": "runs", "persistentVolumeClaim": "artifacts"}}}
    }))
    .unwrap()
}

/// The operator's `medmerge_reconciles_total`, read from its metrics endpoint (METRICS_ADDR).
async fn reconciles(addr: &str) -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    let line = body.lines().find(|l| l.starts_with("medmerge_reconciles_total ")).ok_or_else(|| anyhow::anyhow!("no medmerge_reconciles_total at {addr}"))?;
    Ok(line.split_whitespace().nth(1).unwrap_or_default().parse()?)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let n = env_number("MERGEJOBS", 500);
    let shards = env_number("SHARDS", 8);
    let all_ready = format!("{shards}/{shards}");
    let metrics = std::env::var("METRICS_ADDR")?;
    let client = Client::try_default().await?;
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": NS}}))?).await?;
    let jobs: Api<Job> = Api::namespaced(client.clone(), NS);
    let mjs: Api<MergeJob> = Api::namespaced(client.clone(), NS);

    // MergeJob name -> finetune Jobs completed, and when the last one was.
    type Completions = HashMap<String, (usize, Option<Instant>)>;
    let finetunes_done: Arc<Mutex<Completions>> = Arc::default();
    // Job name -> when the driver's status patch returned, and how late the driver's own watch
    // (which does nothing else) then saw the Job complete: the API server's watch delivery lag,
    // apart from anything the operator does.
    let patched_at: Arc<Mutex<HashMap<String, Option<Instant>>>> = Arc::default();
    let watch_lag_ms: Arc<Mutex<Vec<f64>>> = Arc::default();
    let started = Instant::now();
    let reconciles_before = reconciles(&metrics).await?;

    // The Job controller: completes init and finetune Jobs as they appear.
    let driver = {
        let (jobs, done, patched_at, watch_lag_ms) = (jobs.clone(), finetunes_done.clone(), patched_at.clone(), watch_lag_ms.clone());
        tokio::spawn(async move {
            watcher(jobs.clone(), watcher::Config::default())
                .applied_objects()
                .for_each_concurrent(16, |event| {
                    let (jobs, done, patched_at, watch_lag_ms) = (jobs.clone(), done.clone(), patched_at.clone(), watch_lag_ms.clone());
                    async move {
                        let Ok(job) = event else { return };
                        let name = job.name_any();
                        let complete = job.status.as_ref().and_then(|s| s.succeeded).unwrap_or(0) > 0;
                        if complete {
                            // None: the watch was faster than the patch's response (marked as seen).
                            if let Some(Some(at)) = patched_at.lock().unwrap().insert(name.clone(), None) {
                                watch_lag_ms.lock().unwrap().push(at.elapsed().as_secs_f64() * 1000.0);
                            }
                        }
                        if complete || !(name.ends_with("-init") || name.contains("-finetune-")) {
                            return;
                        }
                        let now = Timestamp::now().to_string();
                        let status = json!({"status": {"startTime": now, "completionTime": now, "succeeded": 1, "conditions": [{"type": "Complete", "status": "True", "lastProbeTime": now, "lastTransitionTime": now}]}});
                        if let Err(e) = jobs.patch_status(&name, &PatchParams::default(), &Patch::Merge(status)).await {
                            eprintln!("completing {name}: {e}");
                            return;
                        }
                        if let Some(None) = patched_at.lock().unwrap().insert(name.clone(), Some(Instant::now())) {
                            watch_lag_ms.lock().unwrap().push(0.0);
                        }
                        if let Some((mj, _)) = name.split_once("-g1-finetune-") {
                            let mut done = done.lock().unwrap();
                            let entry = done.entry(mj.to_string()).or_insert((0, None));
                            entry.0 += 1;
                            if entry.0 == shards {
                                entry.1 = Some(Instant::now());
                            }
                        }
                    }
                })
                .await
        })
    };

    // Status watcher: when each MergeJob first shows all shards ready.
    let ready_at: Arc<Mutex<BTreeMap<String, Instant>>> = Arc::default();
    let watch_status = {
        let (mjs, ready_at, all_ready) = (mjs.clone(), ready_at.clone(), all_ready.clone());
        tokio::spawn(async move {
            let mut stream = watcher(mjs, watcher::Config::default()).applied_objects().boxed();
            while let Some(Ok(mj)) = stream.next().await {
                if mj.status.as_ref().and_then(|s| s.shards_ready.as_deref()) == Some(all_ready.as_str()) {
                    ready_at.lock().unwrap().entry(mj.name_any()).or_insert_with(Instant::now);
                }
            }
        })
    };

    futures::stream::iter(0..n)
        .map(|i| {
            let mjs = mjs.clone();
            async move { mjs.create(&PostParams::default(), &mergejob(i, shards)).await }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
    let created = started.elapsed();

    let deadline = Instant::now() + Duration::from_secs(900);
    while ready_at.lock().unwrap().len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all_ready_after = started.elapsed();
    let burst_reconciles = reconciles(&metrics).await? - reconciles_before;
    let burst_watch_lag = std::mem::take(&mut *watch_lag_ms.lock().unwrap());

    // Steady state: one MergeJob at a time on a quiet cluster, the operator's reaction time.
    let steady = env_number("STEADY", 20);
    for i in n..n + steady {
        mjs.create(&PostParams::default(), &mergejob(i, shards)).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready_at.lock().unwrap().contains_key(&format!("mj-{i:04}")) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    driver.abort();
    watch_status.abort();

    let done = finetunes_done.lock().unwrap();
    let ready = ready_at.lock().unwrap();
    let latencies = |range: std::ops::Range<usize>| -> anyhow::Result<serde_json::Value> {
        let mut named: Vec<(f64, String)> = range
            .filter_map(|i| {
                let name = format!("mj-{i:04}");
                let t0 = done.get(&name).and_then(|(_, t)| *t)?;
                Some((ready.get(&name)?.saturating_duration_since(t0).as_secs_f64() * 1000.0, name))
            })
            .collect();
        named.sort_by(|a, b| a.0.total_cmp(&b.0));
        let ms: Vec<f64> = named.iter().map(|(m, _)| *m).collect();
        anyhow::ensure!(!ms.is_empty(), "no MergeJob reached {all_ready} shards ready");
        let slowest: Vec<&str> = named.iter().rev().take(3).map(|(_, n)| n.as_str()).collect();
        Ok(json!({"count": ms.len(), "p50": percentile(&ms, 0.5), "p99": percentile(&ms, 0.99), "max": ms.last(), "slowest": slowest}))
    };
    let spread = |mut ms: Vec<f64>| {
        ms.sort_by(f64::total_cmp);
        if ms.is_empty() {
            return json!({"count": 0});
        }
        json!({"count": ms.len(), "p50": percentile(&ms, 0.5), "p99": percentile(&ms, 0.99), "max": ms.last()})
    };
    println!(
        "{}",
        json!({
            "mergejobs": n, "ready": (0..n).filter(|i| ready.contains_key(&format!("mj-{i:04}"))).count(),
            "create_seconds": created.as_secs_f64(), "shards": shards, "all_ready_seconds": all_ready_after.as_secs_f64(), "burst_reconciles": burst_reconciles,
            "latency_ms": latencies(0..n)?, "steady_latency_ms": latencies(n..n + steady)?,
            "burst_watch_lag_ms": spread(burst_watch_lag), "steady_watch_lag_ms": spread(std::mem::take(&mut *watch_lag_ms.lock().unwrap())),
        })
    );
    Ok(())
}
