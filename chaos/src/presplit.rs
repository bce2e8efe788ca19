//! `--idle-shards N`: before the load starts, split the key space above
//! the workloads' keys into N more ranges, each its own shard, so the run's
//! faults hit a cluster where most groups are idle — quiet, with no ticks
//! and no Raft heartbeats — and the few busy ones sit among them.
//!
//! The split keys `~idle/0001` … sort after every workload key (which
//! start with a letter). They are issued in bisection order, up to
//! [`IN_FLIGHT`] at once (each on a different range, so none is refused as
//! busy; a refusal is retried), and each is followed until it is done.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::error::{Error, Result};
use crate::http::Api;

/// Splits in flight at once.
const IN_FLIGHT: usize = 4;

/// The split keys of `n` more shards, in bisection order (each level splits
/// ranges the previous level created).
pub fn keys(n: usize) -> Vec<String> {
    let mut order = Vec::with_capacity(n);
    let mut q = VecDeque::from([(1usize, n)]);
    while let Some((lo, hi)) = q.pop_front() {
        if lo > hi {
            continue;
        }
        let mid = (lo + hi) / 2;
        order.push(format!("~idle/{mid:04}"));
        q.push_back((lo, mid - 1));
        q.push_back((mid + 1, hi));
    }
    order
}

/// Makes `n` more shards through the node API at `base` within `timeout`.
pub async fn run(api: &Api, base: &str, n: usize, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    let mut pending: VecDeque<String> = keys(n).into();
    let mut inflight: BTreeMap<u64, String> = BTreeMap::new();
    let mut done = 0;
    while !pending.is_empty() || !inflight.is_empty() {
        if started.elapsed() > timeout {
            return Err(Error::Config(format!("--idle-shards: {done} of {n} splits done in {timeout:?}")));
        }
        let mut tries = 0;
        while inflight.len() < IN_FLIGHT && tries < 2 * IN_FLIGHT {
            let Some(key) = pending.pop_front() else { break };
            tries += 1;
            let answer = api.admin_post(base, "/admin/split", json!({ "key": key })).await;
            match answer.ok().filter(|a| a.status == 200).and_then(|a| a.json()) {
                Some(v) if v["operation_id"].is_u64() => {
                    inflight.insert(v["operation_id"].as_u64().unwrap_or_default(), key);
                }
                _ => pending.push_back(key), // busy or not ready: later
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        for (id, key) in inflight.clone() {
            let Ok(view) = api.operation(base, id).await else { continue };
            match view.get("phase").and_then(|p| p.as_str()) {
                Some("done") => {
                    inflight.remove(&id);
                    done += 1;
                }
                Some("aborted") => {
                    inflight.remove(&id);
                    pending.push_back(key);
                }
                _ => {}
            }
        }
    }
    tracing::info!("--idle-shards: {n} more shards in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_once_in_bisection_order() {
        let k = keys(7);
        assert_eq!(k[0], "~idle/0004");
        assert_eq!(&k[1..3], ["~idle/0002", "~idle/0006"]);
        let mut sorted = k.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 7);
        assert!(keys(0).is_empty());
        assert!(k.iter().all(|k| k.as_str() > "zzzz"), "above every workload key");
    }
}
