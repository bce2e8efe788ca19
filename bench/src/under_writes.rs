//! What the `split` and `move` scenarios share: one admin operation run
//! while writers hammer the shard it changes, and what the writers saw.
//!
//! 1. [`Load::fill`]: preload keys `user00000000…` until the shard holding
//!    them has `--fill-mb` of data (skipped if it already does).
//! 2. [`Load::measure`]: start `--concurrency` writers updating those keys
//!    uniformly; after `--before`, start the operation and follow it to the
//!    end; keep writing for `--after`, then stop.
//! 3. The [`OpRun`] it returns holds, from the completion time of every
//!    successful write (see [`crate::pause`]): the longest gap between two
//!    writes and the slowest write, with the operation's phase they fell
//!    in; throughput and latency before, during and after the operation;
//!    and the operation's own per-phase durations. A good run has no client
//!    errors and an operation that finished.
//!
//! Phase boundaries come from the operation's history (wall-clock
//! milliseconds of the metadata leader); on one machine, or with
//! synchronised clocks, they line up with the benchmark's own clock.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use cleave_client::{Client, OpId, OperationView, Phase, RangeDescriptor};
use serde::Serialize;

use crate::keys::{self, KeyChooser, Values};
use crate::pause;
use crate::report::{errors_line, fmt_latency, fmt_rate, latency_cells, table, Latency};
use crate::runner::{self, Clock, Job};
use crate::stats::{histogram, Completion, Live};
use crate::target::Target;
use crate::workload::Workload;
use crate::{preload, progress};

/// Settings of a scenario.
#[derive(Debug, Clone)]
pub struct Settings {
    pub fill_mb: u64,
    pub value_size: usize,
    pub concurrency: usize,
    pub rate: Option<f64>,
    pub before: Duration,
    pub after: Duration,
    pub poll: Duration,
    /// Give up if the operation has not finished after this long.
    pub op_timeout: Duration,
}

/// One window of the run (before, during or after the operation).
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    pub name: String,
    pub from_s: f64,
    pub to_s: f64,
    pub writes: u64,
    pub writes_per_s: f64,
    pub latency: Option<Latency>,
}

/// The longest gap or the slowest write, placed in time.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub ms: f64,
    /// Seconds from the start of the writers to its end.
    pub at_s: f64,
    /// The operation's phase at that moment, if it was running.
    pub phase: Option<Phase>,
}

/// What the writers saw of one operation.
#[derive(Debug, Clone, Serialize)]
pub struct OpRun {
    pub config: serde_json::Value,
    pub operation: OperationView,
    /// Phase durations from the operation, in milliseconds.
    pub phase_ms: BTreeMap<String, u64>,
    /// Seconds from asking for the operation to seeing it end (client clock).
    pub client_op_s: f64,
    /// Longest gap between consecutive successful writes (all writers).
    pub longest_gap: Option<Event>,
    /// Longest gap among those overlapping the operation.
    pub longest_gap_during_op: Option<Event>,
    /// The slowest single write.
    pub slowest_write: Option<Event>,
    /// before, during, after, all.
    pub windows: Vec<Window>,
    /// Successful writes per second, second by second.
    pub timeline: Vec<u64>,
    pub errors: BTreeMap<String, u64>,
    pub errors_total: u64,
    /// Other operations (automatic splits or moves) that ran meanwhile.
    pub interference: Vec<u64>,
}

impl OpRun {
    /// Whether the run is a success: the operation finished and no write failed.
    pub fn ok(&self) -> bool {
        self.operation.op.phase == Phase::Done && self.errors_total == 0
    }
}

/// The data set: keys `0..keys`, written through `target`.
pub struct Load {
    pub keys: u64,
    target: Arc<Target>,
    values: Arc<Values>,
}

impl Load {
    /// The keys that make `--fill-mb` of `--value-size` values.
    pub fn new(client: &Client, s: &Settings) -> Load {
        Load {
            keys: keys::keys_for_bytes(s.fill_mb << 20, s.value_size),
            target: Arc::new(Target::Cleave { client: client.clone(), consistency: cleave_client::Consistency::Stale }),
            values: Arc::new(Values::new(s.value_size, 64, &mut rand::rng())),
        }
    }

    /// The range holding the keys (the one holding the middle key if they
    /// span several); fails if an operation holds it.
    pub async fn home_range(&self, client: &Client) -> Result<RangeDescriptor> {
        let (first, last, middle) = (keys::key(0), keys::key(self.keys - 1), keys::key(self.keys / 2));
        let ranges = client.ranges().await.context("listing the ranges")?;
        let range = ranges.iter().find(|r| r.contains(&middle)).cloned().context("no range holds the keys")?;
        if !(range.contains(&first) && range.contains(&last)) {
            eprintln!(
                "warning: keys {first}..{last} span several ranges; using range {} (it holds {middle})",
                range.range_id
            );
        }
        if let cleave_client::cleave_metadata::RangeState::Busy { op_id } = range.state {
            bail!("range {} is busy with operation {op_id}", range.range_id);
        }
        Ok(range)
    }

    /// Preloads the keys unless `range`'s shard already holds `--fill-mb`;
    /// returns the shard's reported size.
    pub async fn fill(&self, client: &Client, s: &Settings, range: &RangeDescriptor) -> Result<u64> {
        let (shard, fill) = (range.shard_id, s.fill_mb << 20);
        let size = shard_size(client, shard).await?;
        if size >= fill {
            eprintln!("shard {shard} already holds {} MiB; no preload", size >> 20);
            return Ok(size);
        }
        eprintln!(
            "preloading {} keys of {} bytes ({} MiB) into range {}",
            self.keys, s.value_size, s.fill_mb, range.range_id
        );
        let loaded =
            preload::preload(self.target.clone(), 0..self.keys, self.values.clone(), s.concurrency.max(32)).await;
        eprintln!("{loaded}");
        if loaded.failed > 0 {
            bail!("{} keys could not be written", loaded.failed);
        }
        let size = wait_for_size(client, shard, fill, Duration::from_secs(10)).await?;
        if size < fill {
            eprintln!(
                "warning: shard {shard} reports {} MiB, less than --fill-mb {} (an earlier split? use a fresh cluster)",
                size >> 20,
                s.fill_mb
            );
        } else {
            eprintln!("shard {shard} holds {} MiB", size >> 20);
        }
        Ok(size)
    }

    /// Writes continuously; after `--before` starts the operation (`start`
    /// is only polled then) and follows it, showing `note` of each view on
    /// the progress line; writes on for `--after`; returns what was seen.
    pub async fn measure(
        &self,
        client: &Client,
        s: &Settings,
        config: serde_json::Value,
        what: &str,
        start: impl Future<Output = Result<OpId>>,
        note_of: impl Fn(&OperationView) -> String,
    ) -> Result<OpRun> {
        let job = Arc::new(Job {
            workload: Workload::Write,
            chooser: KeyChooser::Uniform(self.keys),
            values: (*self.values).clone(),
            scan_len: 0,
            concurrency: s.concurrency,
            rate: s.rate,
            keep_completions: true,
            next_new_key: std::sync::atomic::AtomicU64::new(self.keys),
        });
        let clock = Arc::new(Clock::new(Duration::ZERO, None));
        let start_unix_ms = unix_ms();
        let live = Arc::new(Live::default());
        let note = Arc::new(Mutex::new(String::new()));
        let ticker = progress::Ticker::start(clock.clone(), None, live.clone(), note.clone());
        let writers = tokio::spawn(runner::run(self.target.clone(), job, clock.clone(), live.clone()));

        tokio::time::sleep(s.before).await;
        let requested_us = clock.offset_us(Instant::now());
        let followed = async {
            let op_id = start.await.with_context(|| format!("starting the {what}"))?;
            set(&note, format!("| {what} op {op_id}: requested"));
            let follow = client.follow_operation(op_id, s.poll, |v| {
                set(&note, format!("| {what} op {op_id}: {}", note_of(v)));
            });
            tokio::time::timeout(s.op_timeout, follow)
                .await
                .with_context(|| format!("operation {op_id} did not finish within {:?}", s.op_timeout))?
                .with_context(|| format!("following operation {op_id}"))
        }
        .await;
        let finished_us = clock.offset_us(Instant::now());
        let view = match followed {
            Ok(v) => v,
            Err(e) => {
                clock.stop_now();
                let _ = writers.await;
                drop(ticker);
                return Err(e);
            }
        };
        set(&note, format!("| {what} op {}: {}, writing on", view.op.op_id, phase_name(view.op.phase)));
        tokio::time::sleep(s.after).await;
        clock.stop_now();
        let rec = writers.await.context("the writers failed")?;
        drop(ticker);
        let stopped_us = clock.offset_us(Instant::now());

        let interference = client
            .operations()
            .await
            .unwrap_or_default()
            .iter()
            .filter(|o| o.op.op_id != view.op.op_id && overlaps(o, start_unix_ms, unix_ms()))
            .map(|o| o.op.op_id)
            .collect();
        let completions = rec.sorted_completions();
        let phases = phase_windows(&view, start_unix_ms);
        let event = |gap: Option<pause::Gap>| {
            gap.map(|g| Event {
                ms: g.len_us() as f64 / 1e3,
                at_s: g.to_us as f64 / 1e6,
                phase: phase_at(&phases, g.from_us, g.to_us),
            })
        };
        let slowest = pause::slowest(&completions, 0, u64::MAX).map(|c| Event {
            ms: c.latency_us as f64 / 1e3,
            at_s: c.at_us as f64 / 1e6,
            phase: phase_at(&phases, c.at_us.saturating_sub(c.latency_us), c.at_us),
        });
        Ok(OpRun {
            config,
            phase_ms: view.phase_durations_ms.iter().map(|(ph, ms)| (phase_name(*ph), *ms)).collect(),
            client_op_s: finished_us.saturating_sub(requested_us) as f64 / 1e6,
            longest_gap: event(pause::longest_gap(&completions, 0, u64::MAX)),
            longest_gap_during_op: event(pause::longest_gap(&completions, requested_us, finished_us)),
            slowest_write: slowest,
            windows: [window("before", &completions, 0, requested_us)]
                .into_iter()
                .chain([window("during", &completions, requested_us, finished_us)])
                // The phases of the operation that lasted long enough to
                // say something on their own (where "during" went).
                .chain(phases.iter().filter(|(_, from, to)| to.min(&finished_us).saturating_sub(*from) >= 200_000).map(
                    |(p, from, to)| {
                        window(&format!("  {}", phase_name(*p)), &completions, *from, *to.min(&finished_us))
                    },
                ))
                .chain([
                    window("after", &completions, finished_us, stopped_us),
                    window("all", &completions, 0, stopped_us),
                ])
                .collect(),
            timeline: pause::timeline(&completions, 1_000_000, stopped_us),
            errors: rec.error_kinds.clone(),
            errors_total: rec.total_errors(),
            interference,
            operation: view,
        })
    }
}

/// The scenario's options as JSON (the report's `config`), plus `extra`.
pub fn config(scenario: &str, endpoints: &[String], s: &Settings, extra: serde_json::Value) -> serde_json::Value {
    let mut c = serde_json::json!({
        "scenario": scenario, "endpoints": endpoints, "fill_mb": s.fill_mb, "value_size": s.value_size,
        "concurrency": s.concurrency, "rate": s.rate, "before_s": s.before.as_secs_f64(),
        "after_s": s.after.as_secs_f64(),
    });
    if let (Some(c), serde_json::Value::Object(extra)) = (c.as_object_mut(), extra) {
        c.extend(extra);
    }
    c
}

fn set(note: &Mutex<String>, text: String) {
    if let Ok(mut n) = note.lock() {
        *n = text;
    }
}

/// The reported size of `shard` in bytes (0 if not reported yet).
async fn shard_size(client: &Client, shard: u64) -> Result<u64> {
    let shards = client.shards().await.context("listing the shards")?;
    Ok(shards.iter().find(|s| s.shard_id == shard).and_then(|s| s.size_bytes).unwrap_or(0))
}

/// Polls the shard's size (it comes with heartbeats) until it reaches `bytes` or `patience` runs out.
async fn wait_for_size(client: &Client, shard: u64, bytes: u64, patience: Duration) -> Result<u64> {
    let until = Instant::now() + patience;
    loop {
        let size = shard_size(client, shard).await?;
        if size >= bytes || Instant::now() >= until {
            return Ok(size);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub fn phase_name(p: Phase) -> String {
    serde_json::to_value(p).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_else(|| format!("{p:?}"))
}

/// Milliseconds the operation spent in `phase` (server clock).
pub fn phase_ms(v: &OperationView, phase: Phase) -> Option<u64> {
    v.phase_durations_ms.iter().find(|(p, _)| *p == phase).map(|(_, ms)| *ms)
}

/// MiB per second of `bytes` over `ms` milliseconds, if both are positive.
pub fn mib_per_s(bytes: u64, ms: u64) -> Option<f64> {
    (ms > 0 && bytes > 0).then(|| bytes as f64 / (1u64 << 20) as f64 / (ms as f64 / 1e3))
}

/// Whether operation `o` was running at some point in `[from_ms, to_ms]` (unix ms).
fn overlaps(o: &OperationView, from_ms: u64, to_ms: u64) -> bool {
    let began = o.op.history.first().map_or(u64::MAX, |(_, t)| *t);
    let ended = if o.op.phase.is_terminal() { o.op.history.last().map_or(0, |(_, t)| *t) } else { u64::MAX };
    began <= to_ms && ended >= from_ms
}

/// Each phase's span in µs from the start of the writers (`start_unix_ms`).
pub fn phase_windows(v: &OperationView, start_unix_ms: u64) -> Vec<(Phase, u64, u64)> {
    let to_us = |ms: u64| ms.saturating_sub(start_unix_ms) * 1000;
    let h = &v.op.history;
    h.iter()
        .enumerate()
        .filter(|(_, (p, _))| !p.is_terminal())
        .map(|(i, (p, at))| (*p, to_us(*at), h.get(i + 1).map_or(u64::MAX, |(_, next)| to_us(*next))))
        .collect()
}

/// The phase an interval `[from_us, to_us]` overlaps the most, if any.
pub fn phase_at(windows: &[(Phase, u64, u64)], from_us: u64, to_us: u64) -> Option<Phase> {
    if from_us >= to_us {
        return windows.iter().find(|(_, a, b)| (*a..*b).contains(&from_us)).map(|(p, _, _)| *p);
    }
    windows
        .iter()
        .map(|(p, a, b)| (*p, to_us.min(*b).saturating_sub(from_us.max(*a))))
        .filter(|(_, overlap)| *overlap > 0)
        .max_by_key(|(_, overlap)| *overlap)
        .map(|(p, _)| p)
}

/// Writes and their latency within `[from_us, to_us)`.
pub fn window(name: &str, sorted: &[Completion], from_us: u64, to_us: u64) -> Window {
    let mut h = histogram();
    let lo = sorted.partition_point(|c| c.at_us < from_us);
    let hi = sorted.partition_point(|c| c.at_us < to_us).max(lo);
    for c in &sorted[lo..hi] {
        h.saturating_record(c.latency_us.max(1));
    }
    Window {
        name: name.to_owned(),
        from_s: from_us as f64 / 1e6,
        to_s: to_us as f64 / 1e6,
        writes: h.len(),
        writes_per_s: (pause::rate(sorted, from_us, to_us) * 10.0).round() / 10.0,
        latency: Latency::of(&h),
    }
}

/// `planned 8ms, created 10ms, ... (total 1234ms)`.
pub fn phases_line(v: &OperationView) -> String {
    let phases: Vec<String> = v.phase_durations_ms.iter().map(|(p, ms)| format!("{} {ms}ms", phase_name(*p))).collect();
    let total: u64 = v.phase_durations_ms.iter().map(|(_, ms)| ms).sum();
    format!("{} (total {total}ms)", phases.join(", "))
}

/// The report as text: `header`, the operation's error and phases,
/// `details`, the writers' pauses, the window table, the errors,
/// `trailer`, and the verdict.
pub fn render(r: &OpRun, what: &str, header: String, details: &[String], trailer: &[String]) -> String {
    let mut out = vec![header];
    if let Some(e) = &r.operation.op.error {
        out.push(format!("  error: {e}"));
    }
    out.push(format!("  phases:        {}", phases_line(&r.operation)));
    out.extend(details.iter().cloned());
    let ev = |e: &Option<Event>| match e {
        None => "-".to_owned(),
        Some(e) => format!(
            "{} (ending at +{:.2}s{})",
            fmt_latency((e.ms * 1e3) as u64),
            e.at_s,
            e.phase.map(|p| format!(", in {}", phase_name(p))).unwrap_or_default()
        ),
    };
    out.push(format!("  client pause:  longest gap between successful writes {}", ev(&r.longest_gap)));
    out.push(format!("                 longest gap while the {what} ran {}", ev(&r.longest_gap_during_op)));
    out.push(format!("                 slowest single write {}", ev(&r.slowest_write)));
    if let Some(rate) = r.config.get("rate").and_then(|v| v.as_f64()) {
        out.push(format!(
            "                 (open loop at {rate} writes/s: latency counts from when each write was due)"
        ));
    }
    out.push(String::new());
    let rows: Vec<Vec<String>> = r
        .windows
        .iter()
        .map(|w| {
            // A phase's row sits under "during".
            let phase = !["before", "during", "after", "all"].contains(&w.name.as_str());
            let mut row = vec![
                if phase { format!("  {}", w.name) } else { w.name.clone() },
                format!("{:.1}s", w.to_s - w.from_s),
                w.writes.to_string(),
                fmt_rate(w.writes_per_s),
            ];
            row.extend(latency_cells(w.latency.as_ref()));
            row
        })
        .collect();
    out.push(table(&["WRITES", "TIME", "COUNT", "OPS/S", "P50", "P99", "P99.9", "MAX"], &rows));
    out.push(String::new());
    out.push(format!("client errors: {}", errors_line(&r.errors)));
    out.extend(trailer.iter().cloned());
    if !r.interference.is_empty() {
        out.push(format!(
            "warning: other operations ran meanwhile ({:?}); start the nodes with --max-splits 0 \
             (and --balance false) for a clean measurement",
            r.interference
        ));
    }
    out.push(if r.ok() { "RESULT: ok".into() } else { format!("RESULT: FAILED ({what} not done, or client errors)") });
    out.join("\n")
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A finished operation of `kind` with the given history and durations.
    pub fn view(kind: serde_json::Value, history: serde_json::Value, durations: serde_json::Value) -> OperationView {
        serde_json::from_value(serde_json::json!({
            "op_id": 3,
            "kind": kind,
            "phase": "done",
            "history": history,
            "progress": {"keys_copied": 5000, "bytes_copied": 10485760, "keys_total": 5000, "bytes_total": 10485760,
                         "forward_backlog": 0},
            "write_pause_ms": 14, "error": null, "cleaned": false,
            "phase_durations_ms": durations,
        }))
        .unwrap()
    }

    /// A move of shard 1 from node 1 to node 4.
    pub fn move_view() -> OperationView {
        view(
            serde_json::json!({"move": {"shard_id": 1, "from": {"replica_id": 1, "node_id": 1},
                                        "to": {"replica_id": 7, "node_id": 4}, "reason": "admin"}}),
            serde_json::json!([
                ["planned", 10_000],
                ["created", 10_100],
                ["learning", 10_300],
                ["joint", 12_300],
                ["committed", 12_320],
                ["done", 12_400]
            ]),
            serde_json::json!([
                ["planned", 100],
                ["created", 200],
                ["learning", 2000],
                ["joint", 20],
                ["committed", 80],
                ["done", 0]
            ]),
        )
    }

    /// A run with ten writes a tenth of a second apart and no errors.
    pub fn op_run(operation: OperationView) -> OpRun {
        let c: Vec<Completion> = (0..10).map(|i| Completion { at_us: i * 100_000, latency_us: 500 }).collect();
        OpRun {
            config: serde_json::json!({}),
            operation,
            phase_ms: BTreeMap::new(),
            client_op_s: 2.5,
            longest_gap: Some(Event { ms: 25.5, at_s: 10.32, phase: Some(Phase::Joint) }),
            longest_gap_during_op: None,
            slowest_write: None,
            windows: vec![window("before", &c, 0, 1_000_000)],
            timeline: vec![10],
            errors: BTreeMap::new(),
            errors_total: 0,
            interference: vec![],
        }
    }

    #[test]
    fn phases_are_placed_on_the_benchmark_clock() {
        let w = phase_windows(&move_view(), 2_000);
        assert_eq!(w.len(), 5, "done is a point, not a span");
        assert_eq!(w[0], (Phase::Planned, 8_000_000, 8_100_000));
        assert_eq!(w[3], (Phase::Joint, 10_300_000, 10_320_000));
        assert_eq!(phase_at(&w, 10_305_000, 10_315_000), Some(Phase::Joint));
        // mostly in joint, a little in committed
        assert_eq!(phase_at(&w, 10_301_000, 10_325_000), Some(Phase::Joint));
        assert_eq!(phase_at(&w, 10_318_000, 10_390_000), Some(Phase::Committed));
        assert_eq!(phase_at(&w, 1_000, 2_000), None, "before the operation");
        assert_eq!(phase_at(&w, 9_000_000, 9_000_000), Some(Phase::Learning), "an instant");
    }

    #[test]
    fn phase_durations_and_rates() {
        let v = move_view();
        assert_eq!(phase_ms(&v, Phase::Learning), Some(2000));
        assert_eq!(phase_ms(&v, Phase::Capturing), None);
        assert_eq!(
            phases_line(&v),
            "planned 100ms, created 200ms, learning 2000ms, joint 20ms, committed 80ms, done 0ms (total 2400ms)"
        );
        assert_eq!(mib_per_s(10 << 20, 2000), Some(5.0));
        assert_eq!((mib_per_s(0, 5), mib_per_s(5, 0)), (None, None));
    }

    #[test]
    fn windows_summarise_their_writes() {
        let c: Vec<Completion> = (0..100).map(|i| Completion { at_us: i * 10_000, latency_us: 1000 + i }).collect();
        let w = window("before", &c, 0, 500_000);
        assert_eq!((w.writes, w.writes_per_s), (50, 100.0));
        assert_eq!(w.latency.unwrap().max_us, 1049);
        assert!(window("after", &c, 2_000_000, 3_000_000).latency.is_none());
    }

    #[test]
    fn operations_overlap_the_run_while_they_are_not_over() {
        let v = move_view();
        assert!(overlaps(&v, 12_000, 20_000));
        assert!(!overlaps(&v, 12_401, 20_000), "done before the run");
        assert!(!overlaps(&v, 1_000, 9_999), "started after it");
    }

    #[test]
    fn config_merges_the_scenario_options() {
        let s = Settings {
            fill_mb: 20,
            value_size: 1024,
            concurrency: 8,
            rate: None,
            before: Duration::from_secs(3),
            after: Duration::from_secs(4),
            poll: Duration::from_millis(100),
            op_timeout: Duration::from_secs(60),
        };
        let c = config("move", &["127.0.0.1:1".into()], &s, serde_json::json!({"from": 1}));
        assert_eq!(
            (c["scenario"].as_str(), c["fill_mb"].as_u64(), c["from"].as_u64()),
            (Some("move"), Some(20), Some(1))
        );
        assert_eq!(c["before_s"].as_f64(), Some(3.0));
    }

    #[test]
    fn the_verdict_names_the_operation() {
        let mut r = op_run(move_view());
        let text = render(&r, "move", "head".into(), &["  detail".into()], &["tail".into()]);
        assert!(text.starts_with("head\n  phases:        planned 100ms"), "{text}");
        assert!(text.contains("\n  detail\n  client pause:  longest gap between successful writes 25.50ms"), "{text}");
        assert!(text.contains("longest gap while the move ran -"), "{text}");
        assert!(text.ends_with("client errors: none\ntail\nRESULT: ok"), "{text}");
        r.errors_total = 1;
        r.interference = vec![9];
        let text = render(&r, "move", "head".into(), &[], &[]);
        assert!(text.contains("warning: other operations ran meanwhile ([9])"), "{text}");
        assert!(text.ends_with("RESULT: FAILED (move not done, or client errors)"), "{text}");
    }
}
