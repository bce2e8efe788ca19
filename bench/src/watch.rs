//! The `watch` scenario (issue 17's figures): how long a change takes to
//! reach a watcher, and what watchers cost the writers.
//!
//! 1. **Latency**: one watcher of a prefix (`Client::watch`);
//!    `--samples` puts one after the other (through the client, to the
//!    leader); each event's arrival is timed from its put's
//!    acknowledgement. A negative figure (the event before the answer)
//!    counts as zero.
//! 2. **Cost**: for each count of `--watchers`, that many watchers of the
//!    whole key space on the first endpoint (each drained as fast as it
//!    comes, by tasks of this process — on the same box, their CPU counts
//!    against the cluster too), then `--concurrency` writers for
//!    `--duration`: puts per second and their latency.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cleave_client::Client;

/// Opens a raw watch of `[start, end)` at `base`; answers its response.
async fn open(http: &reqwest::Client, base: &str, query: &str) -> Result<reqwest::Response> {
    let resp = http.get(format!("{base}/v1/watch?{query}")).send().await.context("opening a watch")?;
    if !resp.status().is_success() {
        bail!("watch answered {}", resp.status());
    }
    Ok(resp)
}

fn base(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.trim_end_matches('/').to_string()
    } else {
        format!("http://{endpoint}")
    }
}

/// Ack → event latency over `samples` sequential puts: (p50, p99, max) in µs.
pub async fn latency(client: &Client, samples: usize) -> Result<(u64, u64, u64)> {
    use futures::StreamExt;
    let arrived: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let seen = arrived.clone();
    let mut events = Box::pin(client.watch(cleave_client::WatchRequest::prefix("wbench/")));
    let reader = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        while let Some(Ok(event)) = events.next().await {
            match event {
                cleave_client::WatchEvent::Put { value, .. } => {
                    if let Some(i) = value.as_u64() {
                        seen.lock().expect("lock").insert(i, Instant::now());
                    }
                }
                _ => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(30), ready_rx).await.context("the watch was not established")??;
    let mut hist = crate::stats::histogram();
    for i in 0..samples as u64 {
        client.put(&format!("wbench/{}", i % 16), &i, None).await.context("a put")?;
        let acked = Instant::now();
        let deadline = acked + Duration::from_secs(10);
        let at = loop {
            if let Some(t) = arrived.lock().expect("lock").get(&i).copied() {
                break t;
            }
            if Instant::now() > deadline {
                bail!("the change of put {i} did not arrive within 10 s");
            }
            tokio::time::sleep(Duration::from_micros(100)).await;
        };
        hist.record(at.saturating_duration_since(acked).as_micros() as u64).ok();
    }
    reader.abort();
    Ok((hist.value_at_quantile(0.5), hist.value_at_quantile(0.99), hist.max()))
}

/// Opens `n` watchers of everything at `endpoint`, each drained by a task;
/// they stop when `stop` is set. Answers once all are established.
pub async fn watchers(endpoint: &str, n: usize, stop: Arc<AtomicBool>) -> Result<Arc<AtomicU64>> {
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().context("an HTTP client")?;
    let bytes = Arc::new(AtomicU64::new(0));
    let mut opened = Vec::new();
    for _ in 0..n {
        let mut resp = open(&http, &base(endpoint), "start=").await?;
        let (stop, bytes) = (stop.clone(), bytes.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut tx = Some(tx);
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_millis(500), resp.chunk()).await {
                    Ok(Ok(Some(c))) => {
                        bytes.fetch_add(c.len() as u64, Ordering::Relaxed);
                        if let Some(t) = tx.take() {
                            let _ = t.send(());
                        }
                    }
                    Ok(_) => return,
                    Err(_) => {}
                }
            }
        });
        opened.push(rx);
    }
    for rx in opened {
        tokio::time::timeout(Duration::from_secs(60), rx).await.context("a watcher was not established")??;
    }
    Ok(bytes)
}
