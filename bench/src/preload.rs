//! Preloading: write every key of a range of key numbers once, in
//! parallel, so reads find data and the data set has its full size.
//!
//! `concurrency` tasks take the next key number from a shared counter, so
//! the work stays balanced whatever the latencies. A key whose write fails
//! is tried a few more times (the client already retries transient
//! failures; this covers a deadline running out under load), then counted
//! as failed.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::SeedableRng;

use crate::keys::{self, Values};
use crate::progress;
use crate::target::Target;

/// Attempts per key before it counts as failed.
const ATTEMPTS: u32 = 3;

/// What a preload did.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    pub keys: u64,
    pub failed: u64,
    pub elapsed: Duration,
}

/// Writes keys `range` once each with `concurrency` tasks, showing a progress bar.
pub async fn preload(target: Arc<Target>, range: Range<u64>, values: Arc<Values>, concurrency: usize) -> Loaded {
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(range.start));
    let failed = Arc::new(AtomicU64::new(0));
    let bar = progress::bar(range.end.saturating_sub(range.start), "preload");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (target, values, next, failed, bar) =
            (target.clone(), values.clone(), next.clone(), failed.clone(), bar.clone());
        let end = range.end;
        tasks.spawn(async move {
            let mut rng = SmallRng::from_rng(&mut rand::rng());
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    break;
                }
                let key = keys::key(i);
                let mut ok = false;
                for _ in 0..ATTEMPTS {
                    if target.put(&key, values.pick(&mut rng)).await.is_ok() {
                        ok = true;
                        break;
                    }
                }
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                    bar.set_message(format!("{} failed", failed.load(Ordering::Relaxed)));
                }
                bar.inc(1);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    bar.finish_and_clear();
    Loaded {
        keys: range.end.saturating_sub(range.start),
        failed: failed.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
    }
}

impl std::fmt::Display for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rate = self.keys as f64 / self.elapsed.as_secs_f64().max(1e-3);
        write!(f, "preloaded {} keys in {:.1}s ({rate:.0} keys/s)", self.keys, self.elapsed.as_secs_f64())?;
        if self.failed > 0 {
            write!(f, ", {} FAILED", self.failed)?;
        }
        Ok(())
    }
}
