//! The `split` scenario: split a loaded range while writers hammer it, and
//! measure what the writers saw.
//!
//! 1. Preload keys `user00000000…` until the range holds `--fill-mb` of
//!    data (skipped if its shard already does).
//! 2. Start `--concurrency` writers updating keys uniformly over the whole
//!    key space, so both sides of the split key keep getting writes.
//! 3. After `--before`, split the range at its median
//!    (`POST /admin/split {"range_id": …}`) and follow the operation to the
//!    end; keep writing for `--after`, then stop.
//! 4. Report, from the completion time of every successful write (see
//!    [`crate::pause`]): the longest gap between two writes and the slowest
//!    write, with the split phase they fell in; throughput and latency
//!    before, during and after the split; and from the operation itself the
//!    phase durations, the server-measured write pause and the backfill rate
//!    (`bytes_copied` over the `capturing` phase). A good run has no client
//!    errors.
//!
//! Phase boundaries come from the operation's history (wall-clock
//! milliseconds of the metadata leader); on one machine, or with
//! synchronised clocks, they line up with the benchmark's own clock.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use cleave_client::{Client, OpKind, OperationView, Phase, RangeDescriptor};
use serde::Serialize;

use crate::keys::{self, KeyChooser, Values};
use crate::pause::{self, Gap};
use crate::report::{errors_line, fmt_latency, fmt_rate, table, Latency};
use crate::runner::{self, Clock, Job};
use crate::stats::{histogram, Completion, Live};
use crate::target::Target;
use crate::workload::Workload;
use crate::{preload, progress};

/// Settings of the scenario.
#[derive(Debug, Clone)]
pub struct Settings {
    pub fill_mb: u64,
    pub value_size: usize,
    pub concurrency: usize,
    pub rate: Option<f64>,
    pub before: Duration,
    pub after: Duration,
    pub poll: Duration,
    pub split_timeout: Duration,
}

/// One window of the run (before, during or after the split).
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    pub name: &'static str,
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
    /// The split phase at that moment, if the split was running.
    pub phase: Option<Phase>,
}

/// Everything the scenario measured.
#[derive(Debug, Clone, Serialize)]
pub struct SplitReport {
    pub config: serde_json::Value,
    pub operation: OperationView,
    pub range_id: u64,
    pub split_key: String,
    /// Phase durations from the operation, in milliseconds.
    pub phase_ms: BTreeMap<String, u64>,
    /// Freeze to activation, as the server's driver measured it.
    pub server_write_pause_ms: Option<u64>,
    pub backfill_bytes: u64,
    pub backfill_keys: u64,
    pub backfill_mib_per_s: Option<f64>,
    /// Longest gap between consecutive successful writes (all writers).
    pub longest_gap: Option<Event>,
    /// Longest gap among those overlapping the split.
    pub longest_gap_during_split: Option<Event>,
    /// The slowest single write.
    pub slowest_write: Option<Event>,
    pub windows: Vec<Window>,
    /// Successful writes per second, second by second.
    pub timeline: Vec<u64>,
    pub errors: BTreeMap<String, u64>,
    pub errors_total: u64,
    /// Ranges after the split.
    pub ranges_after: Vec<RangeDescriptor>,
    /// Other operations (automatic splits) that ran meanwhile.
    pub interference: Vec<u64>,
}

impl SplitReport {
    /// Whether the run is a success: the split finished and no write failed.
    pub fn ok(&self) -> bool {
        self.operation.op.phase == Phase::Done && self.errors_total == 0
    }
}

/// Runs the scenario against the cluster behind `client`.
pub async fn run(client: Client, s: &Settings, config: serde_json::Value) -> Result<SplitReport> {
    client.health().await.context("the cluster does not answer")?;
    let n = keys::keys_for_bytes(s.fill_mb << 20, s.value_size);
    let (first, last, middle) = (keys::key(0), keys::key(n - 1), keys::key(n / 2));
    let ranges = client.ranges().await.context("listing the ranges")?;
    let range = ranges.iter().find(|r| r.contains(&middle)).cloned().context("no range holds the keys")?;
    if !(range.contains(&first) && range.contains(&last)) {
        eprintln!(
            "warning: keys {first}..{last} span several ranges; splitting range {} (it holds {middle})",
            range.range_id
        );
    }
    if let cleave_client::cleave_metadata::RangeState::Busy { op_id } = range.state {
        bail!("range {} is busy with operation {op_id}", range.range_id);
    }
    let target = Arc::new(Target::Cleave { client: client.clone(), consistency: cleave_client::Consistency::Stale });
    let values = Arc::new(Values::new(s.value_size, 64, &mut rand::rng()));
    let fill = s.fill_mb << 20;

    // 1. Fill the range.
    let size = shard_size(&client, range.shard_id).await?;
    if size >= fill {
        eprintln!("shard {} already holds {} MiB; no preload", range.shard_id, size >> 20);
    } else {
        eprintln!("preloading {n} keys of {} bytes ({} MiB) into range {}", s.value_size, s.fill_mb, range.range_id);
        let loaded = preload::preload(target.clone(), 0..n, values.clone(), s.concurrency.max(32)).await;
        eprintln!("{loaded}");
        if loaded.failed > 0 {
            bail!("{} keys could not be written", loaded.failed);
        }
        let size = wait_for_size(&client, range.shard_id, fill, Duration::from_secs(10)).await?;
        if size < fill {
            eprintln!(
                "warning: shard {} reports {} MiB, less than --fill-mb {} (an earlier split? use a fresh cluster)",
                range.shard_id,
                size >> 20,
                s.fill_mb
            );
        } else {
            eprintln!("shard {} holds {} MiB", range.shard_id, size >> 20);
        }
    }

    // 2. Writers.
    let job = Arc::new(Job {
        workload: Workload::Write,
        chooser: KeyChooser::Uniform(n),
        values: (*values).clone(),
        scan_len: 0,
        concurrency: s.concurrency,
        rate: s.rate,
        keep_completions: true,
    });
    let clock = Arc::new(Clock::new(Duration::ZERO, None));
    let start_unix_ms = unix_ms();
    let live = Arc::new(Live::default());
    let note = Arc::new(Mutex::new(String::new()));
    let ticker = progress::Ticker::start(clock.clone(), None, live.clone(), note.clone());
    let writers = tokio::spawn(runner::run(target.clone(), job, clock.clone(), live.clone()));

    // 3. The split.
    tokio::time::sleep(s.before).await;
    let requested_us = clock.offset_us(Instant::now());
    let followed = async {
        let op_id = client.split_range(range.range_id).await.context("starting the split")?;
        set(&note, format!("| split op {op_id}: requested"));
        let follow = client.follow_operation(op_id, s.poll, |v| {
            set(&note, format!("| split op {op_id}: {}", phase_note(v)));
        });
        tokio::time::timeout(s.split_timeout, follow)
            .await
            .with_context(|| format!("operation {op_id} did not finish within {:?}", s.split_timeout))?
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
    set(&note, format!("| split op {}: {}, writing on", view.op.op_id, phase_name(view.op.phase)));
    tokio::time::sleep(s.after).await;
    clock.stop_now();
    let rec = writers.await.context("the writers failed")?;
    drop(ticker);
    let stopped_us = clock.offset_us(Instant::now());

    // 4. The report.
    let ranges_after = client.ranges().await.unwrap_or_default();
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
    let event = |gap: Option<Gap>| {
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
    let OpKind::Split { split_key, .. } = &view.op.kind else {
        bail!("operation {} is a {}, not a split", view.op.op_id, view.op.kind.name());
    };
    let p = &view.op.progress;
    let errors_total = rec.total_errors();
    Ok(SplitReport {
        config,
        range_id: range.range_id,
        split_key: split_key.clone(),
        phase_ms: view.phase_durations_ms.iter().map(|(ph, ms)| (phase_name(*ph), *ms)).collect(),
        server_write_pause_ms: view.op.write_pause_ms,
        backfill_bytes: p.bytes_copied,
        backfill_keys: p.keys_copied,
        backfill_mib_per_s: backfill_rate(&view),
        longest_gap: event(pause::longest_gap(&completions, 0, u64::MAX)),
        longest_gap_during_split: event(pause::longest_gap(&completions, requested_us, finished_us)),
        slowest_write: slowest,
        windows: vec![
            window("before", &completions, 0, requested_us),
            window("during", &completions, requested_us, finished_us),
            window("after", &completions, finished_us, stopped_us),
            window("all", &completions, 0, stopped_us),
        ],
        timeline: pause::timeline(&completions, 1_000_000, stopped_us),
        errors: rec.error_kinds.clone(),
        errors_total,
        ranges_after,
        interference,
        operation: view,
    })
}

fn set(note: &Mutex<String>, text: String) {
    if let Ok(mut n) = note.lock() {
        *n = text;
    }
}

/// The phase and, while copying, the share copied.
fn phase_note(v: &OperationView) -> String {
    let p = &v.op.progress;
    match v.op.phase {
        Phase::Capturing if p.bytes_total > 0 => {
            format!(
                "capturing {:.0}% of {} MiB",
                100.0 * p.bytes_copied as f64 / p.bytes_total as f64,
                p.bytes_total >> 20
            )
        }
        ph => phase_name(ph),
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

fn phase_name(p: Phase) -> String {
    serde_json::to_value(p).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_else(|| format!("{p:?}"))
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

/// MiB copied per second of the `capturing` phase.
pub fn backfill_rate(v: &OperationView) -> Option<f64> {
    let ms = v.phase_durations_ms.iter().find(|(p, _)| *p == Phase::Capturing).map(|(_, ms)| *ms)?;
    (ms > 0 && v.op.progress.bytes_copied > 0)
        .then(|| v.op.progress.bytes_copied as f64 / (1u64 << 20) as f64 / (ms as f64 / 1e3))
}

/// Writes and their latency within `[from_us, to_us)`.
fn window(name: &'static str, sorted: &[Completion], from_us: u64, to_us: u64) -> Window {
    let mut h = histogram();
    let lo = sorted.partition_point(|c| c.at_us < from_us);
    let hi = sorted.partition_point(|c| c.at_us < to_us).max(lo);
    for c in &sorted[lo..hi] {
        h.saturating_record(c.latency_us.max(1));
    }
    Window {
        name,
        from_s: from_us as f64 / 1e6,
        to_s: to_us as f64 / 1e6,
        writes: h.len(),
        writes_per_s: (pause::rate(sorted, from_us, to_us) * 10.0).round() / 10.0,
        latency: Latency::of(&h),
    }
}

/// The report as text.
pub fn render(r: &SplitReport) -> String {
    let op = &r.operation.op;
    let shards = match &op.kind {
        OpKind::Split { source, target, .. } => format!("shard {source} -> shard {target}"),
        OpKind::Move { shard_id, .. } => format!("shard {shard_id}"),
    };
    let mut out = vec![format!(
        "split op {} of range {} at {:?} ({shards}): {}",
        op.op_id,
        r.range_id,
        r.split_key,
        phase_name(op.phase)
    )];
    if let Some(e) = &op.error {
        out.push(format!("  error: {e}"));
    }
    let phases: Vec<String> =
        r.operation.phase_durations_ms.iter().map(|(p, ms)| format!("{} {ms}ms", phase_name(*p))).collect();
    let total: u64 = r.operation.phase_durations_ms.iter().map(|(_, ms)| ms).sum();
    out.push(format!("  phases:        {} (total {total}ms)", phases.join(", ")));
    out.push(format!(
        "  backfill:      {:.1} MiB, {} keys{}",
        r.backfill_bytes as f64 / (1u64 << 20) as f64,
        r.backfill_keys,
        r.backfill_mib_per_s.map(|m| format!(" at {m:.1} MiB/s (over the capturing phase)")).unwrap_or_default()
    ));
    out.push(format!(
        "  server pause:  {} (freeze to activation, as the split driver measured it)",
        r.server_write_pause_ms.map_or("-".into(), |ms| format!("{ms}ms"))
    ));
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
    out.push(format!("                 longest gap while the split ran {}", ev(&r.longest_gap_during_split)));
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
            let lat = |f: fn(&Latency) -> u64| w.latency.as_ref().map_or("-".into(), |l| fmt_latency(f(l)));
            vec![
                w.name.to_owned(),
                format!("{:.1}s", w.to_s - w.from_s),
                w.writes.to_string(),
                fmt_rate(w.writes_per_s),
                lat(|l| l.p50_us),
                lat(|l| l.p99_us),
                lat(|l| l.p999_us),
                lat(|l| l.max_us),
            ]
        })
        .collect();
    out.push(table(&["WRITES", "TIME", "COUNT", "OPS/S", "P50", "P99", "P99.9", "MAX"], &rows));
    out.push(String::new());
    out.push(format!("client errors: {}", errors_line(&r.errors)));
    let ranges: Vec<String> = r
        .ranges_after
        .iter()
        .map(|d| {
            format!(
                "{}:[{:?}, {}) shard {}",
                d.range_id,
                d.start,
                d.end.as_deref().map_or("+inf".into(), |e| format!("{e:?}")),
                d.shard_id
            )
        })
        .collect();
    if !ranges.is_empty() {
        out.push(format!("ranges after:  {}", ranges.join("  ")));
    }
    if !r.interference.is_empty() {
        out.push(format!(
            "warning: other operations ran meanwhile ({:?}); start the nodes with --max-splits 0 for a clean measurement",
            r.interference
        ));
    }
    out.push(if r.ok() { "RESULT: ok".into() } else { "RESULT: FAILED (split not done, or client errors)".into() });
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(history: serde_json::Value, durations: serde_json::Value) -> OperationView {
        serde_json::from_value(serde_json::json!({
            "op_id": 3,
            "kind": {"split": {"range_id": 1, "split_key": "user00005000", "source": 1, "target": 2,
                               "new_range_id": 2, "target_replicas": [], "reason": "admin"}},
            "phase": "done",
            "history": history,
            "progress": {"keys_copied": 5000, "bytes_copied": 10485760, "keys_total": 5000, "bytes_total": 10485760,
                         "forward_backlog": 0},
            "write_pause_ms": 14, "error": null, "cleaned": false,
            "phase_durations_ms": durations,
        }))
        .unwrap()
    }

    fn sample() -> OperationView {
        view(
            serde_json::json!([
                ["planned", 10_000],
                ["created", 10_100],
                ["capturing", 10_300],
                ["frozen", 12_300],
                ["committed", 12_320],
                ["done", 12_400]
            ]),
            serde_json::json!([
                ["planned", 100],
                ["created", 200],
                ["capturing", 2000],
                ["frozen", 20],
                ["committed", 80],
                ["done", 0]
            ]),
        )
    }

    #[test]
    fn phases_are_placed_on_the_benchmark_clock() {
        let w = phase_windows(&sample(), 2_000);
        assert_eq!(w.len(), 5, "done is a point, not a span");
        assert_eq!(w[0], (Phase::Planned, 8_000_000, 8_100_000));
        assert_eq!(w[3], (Phase::Frozen, 10_300_000, 10_320_000));
        assert_eq!(phase_at(&w, 10_305_000, 10_315_000), Some(Phase::Frozen));
        // mostly in frozen, a little in committed
        assert_eq!(phase_at(&w, 10_301_000, 10_325_000), Some(Phase::Frozen));
        assert_eq!(phase_at(&w, 10_318_000, 10_390_000), Some(Phase::Committed));
        assert_eq!(phase_at(&w, 1_000, 2_000), None, "before the split");
        assert_eq!(phase_at(&w, 9_000_000, 9_000_000), Some(Phase::Capturing), "an instant");
    }

    #[test]
    fn backfill_rate_is_bytes_over_capturing_time() {
        assert_eq!(backfill_rate(&sample()), Some(5.0));
        let v = view(serde_json::json!([["planned", 1]]), serde_json::json!([["planned", 5]]));
        assert_eq!(backfill_rate(&v), None);
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
    fn report_renders_the_key_figures() {
        let c: Vec<Completion> = (0..10).map(|i| Completion { at_us: i * 100_000, latency_us: 500 }).collect();
        let r = SplitReport {
            config: serde_json::json!({}),
            operation: sample(),
            range_id: 1,
            split_key: "user00005000".into(),
            phase_ms: BTreeMap::new(),
            server_write_pause_ms: Some(14),
            backfill_bytes: 10 << 20,
            backfill_keys: 5000,
            backfill_mib_per_s: Some(5.0),
            longest_gap: Some(Event { ms: 25.5, at_s: 10.32, phase: Some(Phase::Frozen) }),
            longest_gap_during_split: None,
            slowest_write: None,
            windows: vec![window("before", &c, 0, 1_000_000)],
            timeline: vec![10],
            errors: BTreeMap::new(),
            errors_total: 0,
            ranges_after: vec![],
            interference: vec![],
        };
        let text = render(&r);
        assert!(text.starts_with("split op 3 of range 1 at \"user00005000\" (shard 1 -> shard 2): done"), "{text}");
        assert!(text.contains("backfill:      10.0 MiB, 5000 keys at 5.0 MiB/s"), "{text}");
        assert!(text.contains("server pause:  14ms"), "{text}");
        assert!(
            text.contains("longest gap between successful writes 25.50ms (ending at +10.32s, in frozen)"),
            "{text}"
        );
        assert!(
            text.contains("WRITES  TIME  COUNT  OPS/S    P50    P99  P99.9    MAX\nbefore  1.0s     10   10.0  500us"),
            "{text}"
        );
        assert!(text.ends_with("RESULT: ok"), "{text}");
    }
}
