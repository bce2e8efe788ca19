//! The `multi` scenario's set-up: pre-split the benchmark's key space into
//! N ranges at evenly spaced keys, so the workload that follows is served
//! by N shards (N Raft groups with their own leaders) instead of one.
//!
//! Key `user%08d` number `i·keys/N` starts range `i`. Splits run one after
//! the other, each followed to its end; a key that already starts a range
//! is skipped, so running the scenario twice does not split again.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cleave_client::{Client, Phase};

use crate::keys;

/// The keys that start ranges 1..n when `keys` keys are cut into `n` ranges.
pub fn split_keys(keys: u64, n: u64) -> Vec<String> {
    let mut out: Vec<String> = (1..n).map(|i| keys::key(i * keys / n)).collect();
    out.dedup();
    out.retain(|k| k != &keys::key(0));
    out
}

/// Splits the key space of `keys` keys into `n` ranges.
pub async fn presplit(client: &Client, keys: u64, n: u64, poll: Duration) -> Result<()> {
    for key in split_keys(keys, n) {
        let ranges = client.ranges().await.context("listing the ranges")?;
        if ranges.iter().any(|r| r.start == key) {
            eprintln!("a range already starts at {key}");
            continue;
        }
        let started = Instant::now();
        let id = client.split_at(&key).await.with_context(|| format!("splitting at {key}"))?;
        let view = client.follow_operation(id, poll, |_| {}).await.with_context(|| format!("following op {id}"))?;
        if view.op.phase != Phase::Done {
            bail!("the split at {key} (op {id}) ended {:?}: {}", view.op.phase, view.op.error.unwrap_or_default());
        }
        eprintln!("split at {key}: op {id} done in {:.2}s", started.elapsed().as_secs_f64());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keys_are_evenly_spaced() {
        assert_eq!(split_keys(1000, 4), ["user00000250", "user00000500", "user00000750"]);
        assert!(split_keys(1000, 1).is_empty());
        // more ranges than keys: no duplicate and no split at the very first key
        assert_eq!(split_keys(2, 4), ["user00000001"]);
    }
}
