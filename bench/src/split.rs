//! The `split` scenario: split a loaded range while writers hammer it, and
//! measure what the writers saw.
//!
//! Fill the range, write continuously, then split it at its median
//! (`POST /admin/split {"range_id": …}`) and follow the split to the end
//! (the machinery shared with `move` is in [`crate::under_writes`]). Writers
//! update keys uniformly over the whole key space, so both sides of the
//! split key keep getting writes. Besides what the writers saw, the report
//! has the server-measured write pause and the backfill rate
//! (`bytes_copied` over the `capturing` phase).

use anyhow::{bail, Context, Result};
use cleave_client::{Client, OpKind, OperationView, Phase, RangeDescriptor};
use serde::Serialize;

use crate::under_writes::{self, mib_per_s, phase_ms, phase_name, Load, OpRun, Settings};

/// Everything the scenario measured.
#[derive(Debug, Clone, Serialize)]
pub struct SplitReport {
    #[serde(flatten)]
    pub run: OpRun,
    pub range_id: u64,
    pub split_key: String,
    /// Freeze to activation, as the server's driver measured it.
    pub server_write_pause_ms: Option<u64>,
    pub backfill_bytes: u64,
    pub backfill_keys: u64,
    pub backfill_mib_per_s: Option<f64>,
    /// Ranges after the split.
    pub ranges_after: Vec<RangeDescriptor>,
}

impl SplitReport {
    /// Whether the run is a success: the split finished and no write failed.
    pub fn ok(&self) -> bool {
        self.run.ok()
    }
}

/// Runs the scenario against the cluster behind `client`.
pub async fn run(client: Client, s: &Settings, config: serde_json::Value) -> Result<SplitReport> {
    client.health().await.context("the cluster does not answer")?;
    let load = Load::new(&client, s);
    let range = load.home_range(&client).await?;
    load.fill(&client, s, &range).await?;
    let range_id = range.range_id;
    let run = load
        .measure(&client, s, config, "split", async { Ok(client.split_range(range_id).await?) }, phase_note)
        .await?;
    let view = &run.operation;
    let OpKind::Split { split_key, .. } = &view.op.kind else {
        bail!("operation {} is a {}, not a split", view.op.op_id, view.op.kind.name());
    };
    let split_key = split_key.clone();
    Ok(report(&client, range_id, split_key, run).await)
}

/// The report of `run`, an operation on range `range_id` at `split_key`.
async fn report(client: &Client, range_id: u64, split_key: String, run: OpRun) -> SplitReport {
    let view = &run.operation;
    let p = &view.op.progress;
    SplitReport {
        range_id,
        split_key,
        server_write_pause_ms: view.op.write_pause_ms,
        backfill_bytes: p.bytes_copied,
        backfill_keys: p.keys_copied,
        backfill_mib_per_s: backfill_rate(view),
        ranges_after: client.ranges().await.unwrap_or_default(),
        run,
    }
}

/// The `merge` scenario: fill the range, split it at its median (not
/// measured), then merge the two halves back under writes and measure
/// that. The report is the split's, for the merge (`split_key` is the
/// boundary the merge takes away).
pub async fn run_merge(client: Client, s: &Settings, config: serde_json::Value) -> Result<SplitReport> {
    client.health().await.context("the cluster does not answer")?;
    let load = Load::new(&client, s);
    let range = load.home_range(&client).await?;
    load.fill(&client, s, &range).await?;
    let split = client.split_range(range.range_id).await.context("splitting the range before the merge")?;
    let deadline = std::time::Instant::now() + s.op_timeout;
    let split_key = loop {
        let v = client.operation(split).await?;
        match (&v.op.phase, &v.op.kind) {
            (Phase::Done, OpKind::Split { split_key, .. }) => break split_key.clone(),
            (Phase::Aborted, _) => bail!("the split before the merge was abandoned: {:?}", v.op.error),
            _ if std::time::Instant::now() > deadline => bail!("the split before the merge did not finish"),
            _ => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    };
    let range_id = range.range_id;
    let run = load
        .measure(&client, s, config, "merge", async { Ok(client.merge_range(range_id).await?) }, phase_note)
        .await?;
    Ok(report(&client, range_id, split_key, run).await)
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

/// MiB copied per second of the `capturing` phase.
pub fn backfill_rate(v: &OperationView) -> Option<f64> {
    mib_per_s(v.op.progress.bytes_copied, phase_ms(v, Phase::Capturing)?)
}

/// The report as text.
pub fn render(r: &SplitReport) -> String {
    let op = &r.run.operation.op;
    let shards = match &op.kind {
        OpKind::Split { source, target, .. } => format!("shard {source} -> shard {target}"),
        OpKind::Merge { left, right, .. } => format!("shard {right} -> shard {left}"),
        OpKind::Move { shard_id, .. } => format!("shard {shard_id}"),
    };
    let header = format!(
        "{} op {} of range {} at {:?} ({shards}): {}",
        op.kind.name(),
        op.op_id,
        r.range_id,
        r.split_key,
        phase_name(op.phase)
    );
    let details = [
        format!(
            "  backfill:      {:.1} MiB, {} keys{}",
            r.backfill_bytes as f64 / (1u64 << 20) as f64,
            r.backfill_keys,
            r.backfill_mib_per_s.map(|m| format!(" at {m:.1} MiB/s (over the capturing phase)")).unwrap_or_default()
        ),
        format!(
            "  server pause:  {} (freeze to cutover, as the operation's driver measured it)",
            r.server_write_pause_ms.map_or("-".into(), |ms| format!("{ms}ms"))
        ),
    ];
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
    let trailer: Vec<String> =
        (!ranges.is_empty()).then(|| format!("ranges after:  {}", ranges.join("  "))).into_iter().collect();
    under_writes::render(&r.run, op.kind.name(), header, &details, &trailer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::under_writes::tests::{op_run, view};

    fn sample() -> OperationView {
        view(
            serde_json::json!({"split": {"range_id": 1, "split_key": "user00005000", "source": 1, "target": 2,
                               "new_range_id": 2, "target_replicas": [], "reason": "admin"}}),
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
    fn backfill_rate_is_bytes_over_capturing_time() {
        assert_eq!(backfill_rate(&sample()), Some(5.0));
        let mut v = sample();
        v.phase_durations_ms = vec![(Phase::Planned, 5)];
        assert_eq!(backfill_rate(&v), None);
    }

    #[test]
    fn report_renders_the_key_figures() {
        let mut run = op_run(sample());
        if let Some(g) = run.longest_gap.as_mut() {
            g.phase = Some(Phase::Frozen);
        }
        let r = SplitReport {
            run,
            range_id: 1,
            split_key: "user00005000".into(),
            server_write_pause_ms: Some(14),
            backfill_bytes: 10 << 20,
            backfill_keys: 5000,
            backfill_mib_per_s: Some(5.0),
            ranges_after: vec![],
        };
        let text = render(&r);
        assert!(text.starts_with("split op 3 of range 1 at \"user00005000\" (shard 1 -> shard 2): done"), "{text}");
        assert!(text.contains("backfill:      10.0 MiB, 5000 keys at 5.0 MiB/s"), "{text}");
        assert!(text.contains("server pause:  14ms"), "{text}");
        assert!(
            text.contains("longest gap between successful writes 25.50ms (ending at +10.32s, in frozen)"),
            "{text}"
        );
        assert!(text.contains("longest gap while the split ran -"), "{text}");
        assert!(
            text.contains("WRITES  TIME  COUNT  OPS/S    P50    P99  P99.9    MAX\nbefore  1.0s     10   10.0  500us"),
            "{text}"
        );
        assert!(text.ends_with("RESULT: ok"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!((json["range_id"].as_u64(), json["windows"][0]["writes"].as_u64()), (Some(1), Some(10)));
    }
}
