//! Running a workload: `--concurrency` tokio tasks, each sending one
//! request at a time, until the clock says stop.
//!
//! Closed loop (the default): a task sends its next request as soon as the
//! previous one answers, and latency is measured from the send. Open loop
//! (`--rate`): requests are due at fixed times ([`Schedule`]), and latency
//! is measured from the due time, so a stall is charged to every request
//! that should have been sent during it.
//!
//! Requests due (or sent) before the end of the warmup are made but not
//! recorded. The end is an atomic deadline on the [`Clock`], so a scenario
//! can leave it open and set it later (the split scenario stops the
//! writers a while after the split finishes).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::keys::{self, KeyChooser, Values};
use crate::schedule::Schedule;
use crate::stats::{Live, Recorder};
use crate::target::Target;
use crate::workload::{OpType, Workload};

/// What the workers do.
pub struct Job {
    pub workload: Workload,
    pub chooser: KeyChooser,
    pub values: Values,
    pub scan_len: usize,
    pub concurrency: usize,
    /// Open loop at this many requests per second in total.
    pub rate: Option<f64>,
    /// Keep every successful write's completion (for pause analysis).
    pub keep_completions: bool,
    /// The number of the next key a `sequential` insert writes (past the
    /// loaded keys, shared by every worker).
    pub next_new_key: AtomicU64,
}

/// The run's time line: start, end of warmup, end.
pub struct Clock {
    pub start: Instant,
    /// Requests due before this are not recorded.
    pub measure_from: Instant,
    /// Microseconds after `start` at which no new request is sent.
    stop_at_us: AtomicU64,
}

impl Clock {
    /// A clock starting now; `run_for` (after the warmup) `None` leaves the end open.
    pub fn new(warmup: Duration, run_for: Option<Duration>) -> Clock {
        let start = Instant::now();
        let stop = run_for.map_or(u64::MAX, |d| (warmup + d).as_micros() as u64);
        Clock { start, measure_from: start + warmup, stop_at_us: AtomicU64::new(stop) }
    }

    /// Microseconds from the start to `t`.
    pub fn offset_us(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.start).as_micros() as u64
    }

    /// Stops sending requests from now on.
    pub fn stop_now(&self) {
        self.stop_at_us.store(self.offset_us(Instant::now()), Ordering::SeqCst);
    }

    /// Whether a request due at `t` is past the end.
    fn is_over(&self, t: Instant) -> bool {
        self.offset_us(t) >= self.stop_at_us.load(Ordering::Relaxed)
    }

    /// Seconds of measured time up to the end (or up to now if still open).
    pub fn measured_s(&self) -> f64 {
        let stop = self.stop_at_us.load(Ordering::SeqCst);
        let end = if stop == u64::MAX { self.offset_us(Instant::now()) } else { stop };
        end.saturating_sub(self.offset_us(self.measure_from)) as f64 / 1e6
    }
}

/// Runs the job's workers until the clock stops them; returns their merged measurements.
pub async fn run(target: Arc<Target>, job: Arc<Job>, clock: Arc<Clock>, live: Arc<Live>) -> Recorder {
    let workers = job.concurrency.max(1);
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let (target, job, clock, live) = (target.clone(), job.clone(), clock.clone(), live.clone());
        tasks.spawn(async move { worker(w, &target, &job, &clock, &live).await });
    }
    let mut total = Recorder::new(job.keep_completions);
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(rec) => total.merge(rec),
            Err(e) => tracing::error!("a worker failed: {e}"),
        }
    }
    total
}

async fn worker(w: usize, target: &Target, job: &Job, clock: &Clock, live: &Live) -> Recorder {
    let mut rng = SmallRng::from_rng(&mut rand::rng());
    let mut rec = Recorder::new(job.keep_completions);
    let schedule = job.rate.map(|r| Schedule::for_worker(r, w, job.concurrency.max(1)));
    for k in 0u64.. {
        let due = match schedule {
            Some(s) => {
                let due = clock.start + s.due(k);
                if clock.is_over(due) {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                due
            }
            None => {
                let now = Instant::now();
                if clock.is_over(now) {
                    break;
                }
                now
            }
        };
        let op = job.workload.pick(rng.random());
        let key = match job.workload {
            Workload::Sequential => keys::key(job.next_new_key.fetch_add(1, Ordering::Relaxed)),
            _ => keys::key(job.chooser.next(&mut rng)),
        };
        let result = match op {
            OpType::Read => target.get(&key).await.map(|found| (!found, false)),
            OpType::Update => target.put(&key, job.values.pick(&mut rng)).await.map(|_| (false, false)),
            OpType::Scan => target.scan(&key, job.scan_len).await.map(|_| (false, false)),
            OpType::Txn => {
                let other = keys::key(job.chooser.next(&mut rng));
                target.transfer(&key, &other).await.map(|conflict| (false, conflict))
            }
        };
        let done = Instant::now();
        live.count(result.is_ok());
        if due < clock.measure_from {
            continue;
        }
        match result {
            Ok((missed, conflict)) => {
                rec.misses += u64::from(missed);
                rec.conflicts += u64::from(conflict);
                rec.ok(op, done.duration_since(due).as_micros() as u64, clock.offset_us(done));
            }
            Err(kind) => rec.error(op, &kind),
        }
    }
    rec
}
