//! Operator scale benchmark (bench/operator-scale.sh runs it against the real kube-apiserver of
//! the end-to-end harness, with the operator binary running as the chart's ServiceAccount).
//!
//! Creates MERGEJOBS MergeJobs of 4 shards, plays the Job controller for their `init` and
//! `finetune-*` Jobs (marks them complete as soon as they appear), and measures, per MergeJob,
//! the latency from its last finetune Job turning complete to its status showing `4/4` shards
//! ready. Prints one JSON object with the numbers.

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
const SHARDS: usize = 4;

fn mergejob(i: usize) -> MergeJob {
    let shards: Vec<_> = (0..SHARDS).map(|s| json!({"name": format!("h{s}"), "data": {"path": format!("/data/h{s}.csv")}})).collect();
    serde_json::from_value(json!({
        "apiVersion": "medmerge.io/v1alpha1", "kind": "MergeJob", "metadata": {"name": format!("mj-{i:04}"), "namespace": NS},
        "spec": {"model": {"architecture": "resnet18", "weights": "random", "imageSize": 32}, "shards": shards,
                 "evaluation": {"data": {"path": "/data/test.csv"}}, "merge": {"baselines": []}}
    }))
    .unwrap()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let n: usize = std::env::var("MERGEJOBS").ok().and_then(|v| v.parse().ok()).unwrap_or(500);
    let client = Client::try_default().await?;
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": NS}}))?).await?;
    let jobs: Api<Job> = Api::namespaced(client.clone(), NS);
    let mjs: Api<MergeJob> = Api::namespaced(client.clone(), NS);

    // MergeJob name -> when its last finetune Job was marked complete.
    let finetunes_done: Arc<Mutex<HashMap<String, (usize, Option<Instant>)>>> = Arc::default();
    let started = Instant::now();

    // The Job controller: completes init and finetune Jobs as they appear.
    let driver = {
        let (jobs, done) = (jobs.clone(), finetunes_done.clone());
        tokio::spawn(async move {
            watcher(jobs.clone(), watcher::Config::default())
                .applied_objects()
                .for_each_concurrent(16, |event| {
                    let (jobs, done) = (jobs.clone(), done.clone());
                    async move {
                        let Ok(job) = event else { return };
                        let name = job.name_any();
                        let complete = job.status.as_ref().and_then(|s| s.succeeded).unwrap_or(0) > 0;
                        if complete || !(name.ends_with("-init") || name.contains("-finetune-")) {
                            return;
                        }
                        let now = Timestamp::now().to_string();
                        let status = json!({"status": {"startTime": now, "completionTime": now, "succeeded": 1, "conditions": [{"type": "Complete", "status": "True", "lastProbeTime": now, "lastTransitionTime": now}]}});
                        if let Err(e) = jobs.patch_status(&name, &PatchParams::default(), &Patch::Merge(status)).await {
                            eprintln!("completing {name}: {e}");
                            return;
                        }
                        if let Some((mj, _)) = name.split_once("-g1-finetune-") {
                            let mut done = done.lock().unwrap();
                            let entry = done.entry(mj.to_string()).or_insert((0, None));
                            entry.0 += 1;
                            if entry.0 == SHARDS {
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
        let (mjs, ready_at) = (mjs.clone(), ready_at.clone());
        tokio::spawn(async move {
            let mut stream = watcher(mjs, watcher::Config::default()).applied_objects().boxed();
            while let Some(Ok(mj)) = stream.next().await {
                if mj.status.as_ref().and_then(|s| s.shards_ready.as_deref()) == Some("4/4") {
                    ready_at.lock().unwrap().entry(mj.name_any()).or_insert_with(Instant::now);
                }
            }
        })
    };

    futures::stream::iter(0..n)
        .map(|i| {
            let mjs = mjs.clone();
            async move { mjs.create(&PostParams::default(), &mergejob(i)).await }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
    let created = started.elapsed();

    let deadline = Instant::now() + Duration::from_secs(900);
    while ready_at.lock().unwrap().len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all_ready = started.elapsed();
    driver.abort();
    watch_status.abort();

    let done = finetunes_done.lock().unwrap();
    let ready = ready_at.lock().unwrap();
    let mut latencies: Vec<f64> = ready.iter().filter_map(|(name, at)| done.get(name).and_then(|(_, t)| *t).map(|t0| at.saturating_duration_since(t0).as_secs_f64() * 1000.0)).collect();
    latencies.sort_by(f64::total_cmp);
    anyhow::ensure!(!latencies.is_empty(), "no MergeJob reached 4/4 shards ready");
    println!(
        "{}",
        json!({
            "mergejobs": n, "ready": ready.len(), "create_seconds": created.as_secs_f64(), "all_ready_seconds": all_ready.as_secs_f64(),
            "latency_ms": {"p50": percentile(&latencies, 0.5), "p99": percentile(&latencies, 0.99), "max": latencies.last()},
        })
    );
    Ok(())
}
