//! `cleave-bench`: the CleaveDB benchmark tool. Speed is measured here,
//! never by tests.
//!
//! ```text
//! cleave-bench [run] --workload a --distribution zipfian --keys 100000 --preload --duration 30s
//! cleave-bench run --target etcd --endpoints 127.0.0.1:2379 --workload b
//! cleave-bench split --fill-mb 200 --value-size 1024 --before 10s --after 10s
//! cleave-bench move --fill-mb 120 --value-size 1024 --before 10s --after 10s
//! cleave-bench multi --ranges 4 --workload a --preload
//! ```
//!
//! - `run` (the default): YCSB-style workloads (A, B, C, write-only, scan)
//!   over `--keys` keys `user%08d`, closed loop with `--concurrency` tasks
//!   or open loop at `--rate` requests per second (latency from the due
//!   time, so stalls are not hidden: see `schedule`). Prints a progress line
//!   while running, then a table of throughput and HDR latency percentiles
//!   per operation type; `--json FILE` writes the same as JSON.
//! - `split`: splits a loaded range under continuous writes and reports the
//!   pause writers saw (see `split`).
//! - `move`: moves a loaded shard's replica (by default the leader's, to a
//!   node without one) under continuous writes and reports the move time
//!   and what writers saw (see `moves`; both share `under_writes`).
//! - `multi`: pre-splits the key space into `--ranges` ranges, then runs a
//!   workload.
//!
//! CleaveDB is reached through the real [`cleave_client::Client`]
//! (leader-direct routing, retries); etcd (`--target etcd`) through its v3
//! JSON gateway. Start CleaveDB nodes with `--max-splits 0` so automatic
//! splits do not disturb a measurement.
//!
//! Exit code: 0 when the run completed without client errors (and, for
//! `split` and `move`, the operation finished), 1 otherwise.

mod etcd;
mod keys;
mod moves;
mod multi;
mod pause;
mod preload;
mod progress;
mod report;
mod runner;
mod schedule;
mod split;
mod stats;
mod target;
mod under_writes;
mod watch;
mod workload;
mod zipfian;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use cleave_client::{Client, ClientOptions, Consistency};
use serde_json::json;

use crate::keys::{Distribution, KeyChooser, Values};
use crate::report::RunReport;
use crate::runner::{Clock, Job};
use crate::stats::Live;
use crate::target::{Target, TargetKind};
use crate::workload::Workload;

#[derive(Parser, Debug)]
#[command(name = "cleave-bench", version, about = "Benchmarks for CleaveDB (and etcd, to compare)", after_help = EXAMPLES)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    scenario: Option<Scenario>,
    /// Without a subcommand: `run`.
    #[command(flatten)]
    run: RunCmd,
}

const EXAMPLES: &str = "Examples:
  cleave-bench --workload a --distribution zipfian --keys 100000 --preload --duration 30s
  cleave-bench --workload b --rate 5000 --json b.json
  cleave-bench --target etcd --endpoints 127.0.0.1:2379 --workload a --preload
  cleave-bench split --fill-mb 200 --value-size 1024 --before 10s --after 10s
  cleave-bench move --fill-mb 120 --value-size 1024 --from 1 --to 4
  cleave-bench multi --ranges 4 --workload a --preload
Start CleaveDB nodes with --max-splits 0 (and for move, --balance false) so the rebalancer does not disturb a measurement.";

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Run a workload (the default).
    Run(RunCmd),
    /// Split a loaded range under continuous writes and measure the pause writers see.
    Split(SplitCmd),
    /// Fill a range, split it, then merge the halves back under continuous writes and measure
    /// the merge.
    Merge(SplitCmd),
    /// Move a loaded shard's replica to another node under continuous writes.
    Move(MoveCmd),
    /// Pre-split the key space into N ranges, then run a workload.
    Multi(MultiCmd),
    /// Watch: change latency (acknowledged → received), then the workload
    /// with 0, 1, 100, 1000 watchers open (`--watchers`).
    Watch(WatchCmd),
}

/// Options of the `watch` scenario.
#[derive(Args, Debug, Clone)]
struct WatchCmd {
    #[command(flatten)]
    run: RunCmd,
    /// Sequential puts whose change is timed to a watcher.
    #[arg(long, default_value_t = 500)]
    samples: usize,
    /// Watcher counts to run the workload with, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,1,100,1000")]
    watchers: Vec<usize>,
}

/// Options of every scenario.
#[derive(Args, Debug, Clone)]
struct Common {
    /// API addresses of some nodes (host:port), comma-separated; for etcd, its client URLs.
    #[arg(long, env = "CLEAVE_ENDPOINTS", value_delimiter = ',', default_value = "127.0.0.1:7001")]
    endpoints: Vec<String>,
    /// The system under test.
    #[arg(long, value_enum, default_value_t = TargetKind::Cleavedb)]
    target: TargetKind,
    /// Concurrent requests (tokio tasks).
    #[arg(long, short = 'c', default_value_t = 32)]
    concurrency: usize,
    /// Bytes per value.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Open loop: send this many requests per second in total, latency measured from when each was due.
    #[arg(long)]
    rate: Option<f64>,
    /// Give up on one request after this long, retries included.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Bearer token for a CleaveDB whose nodes check tokens (--tokens-file).
    #[arg(long, env = "CLEAVE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) of a CleaveDB serving its API over HTTPS: speak HTTPS, trust only it.
    #[arg(long, env = "CLEAVE_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Also write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// The workload options.
#[derive(Args, Debug, Clone)]
struct WorkloadArgs {
    /// a: 50% read/50% update; b: 95/5; c: read only; write: updates only; scan: --scan-len keys from a random key;
    /// sequential: inserts of new keys in increasing order.
    #[arg(long, value_enum, default_value_t = Workload::A)]
    workload: Workload,
    /// Which keys requests pick.
    #[arg(long, value_enum, default_value_t = Distribution::Uniform)]
    distribution: Distribution,
    /// Number of keys (user00000000, user00000001, ...).
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Keys per scan.
    #[arg(long, default_value_t = 100)]
    scan_len: usize,
    /// Measured time.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Time before measuring starts (requests are made but not counted).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Write every key once before the run.
    #[arg(long)]
    preload: bool,
    /// CleaveDB: read from the receiving replica instead of linearizably.
    #[arg(long)]
    stale: bool,
    /// CleaveDB: first declare the benchmark's keys (prefix "user") a hash-spread keyspace of
    /// this many buckets (2-256), so sequential keys spread over that many shards.
    #[arg(long)]
    hash_buckets: Option<u32>,
}

#[derive(Args, Debug, Clone)]
struct RunCmd {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    workload: WorkloadArgs,
}

/// Options of the scenarios that run an operation under writes (`split`, `move`).
#[derive(Args, Debug, Clone)]
struct UnderWritesArgs {
    /// Preload until the range's shard holds this many MiB.
    #[arg(long, default_value_t = 200)]
    fill_mb: u64,
    /// Write for this long before starting the operation.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    before: Duration,
    /// Keep writing for this long after the operation finished.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    after: Duration,
    /// How often the operation is polled.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    poll: Duration,
}

#[derive(Args, Debug, Clone)]
struct SplitCmd {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    load: UnderWritesArgs,
    /// Give up if the split has not finished after this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    split_timeout: Duration,
}

#[derive(Args, Debug, Clone)]
struct MoveCmd {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    load: UnderWritesArgs,
    /// The node whose replica moves [default: the node leading the shard].
    #[arg(long, value_name = "NODE")]
    from: Option<u64>,
    /// The node receiving it [default: the live node without a replica of the shard holding the fewest replicas].
    #[arg(long, value_name = "NODE")]
    to: Option<u64>,
    /// Give up if the move has not finished after this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    move_timeout: Duration,
}

#[derive(Args, Debug, Clone)]
struct MultiCmd {
    /// Number of ranges to cut the key space into.
    #[arg(long, default_value_t = 4)]
    ranges: u64,
    #[command(flatten)]
    run: RunCmd,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let scenario = cli.scenario.unwrap_or(Scenario::Run(cli.run));
    match runtime.block_on(run(scenario)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a scenario; whether it was a clean run.
async fn run(scenario: Scenario) -> Result<bool> {
    match scenario {
        Scenario::Run(cmd) => workload(&cmd, None).await,
        Scenario::Multi(cmd) => {
            if cmd.run.common.target != TargetKind::Cleavedb {
                bail!("multi needs --target cleavedb (it splits ranges)");
            }
            workload(&cmd.run, Some(cmd.ranges)).await
        }
        Scenario::Split(cmd) => split(&cmd, false).await,
        Scenario::Merge(cmd) => split(&cmd, true).await,
        Scenario::Move(cmd) => move_replica(&cmd).await,
        Scenario::Watch(cmd) => watch_scenario(&cmd).await,
    }
}

/// The `watch` scenario (see `watch`).
async fn watch_scenario(cmd: &WatchCmd) -> Result<bool> {
    let c = &cmd.run.common;
    if c.target != TargetKind::Cleavedb {
        bail!("watch needs --target cleavedb");
    }
    let endpoint = c.endpoints.first().context("no --endpoints")?;
    let client = cleave_client(c)?;
    let (p50, p99, max) = watch::latency(&client, cmd.samples).await?;
    println!(
        "watch latency (put acknowledged -> change received, {} samples): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        cmd.samples,
        p50 as f64 / 1000.0,
        p99 as f64 / 1000.0,
        max as f64 / 1000.0
    );
    let mut clean = true;
    for &n in &cmd.watchers {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let bytes = watch::watchers(endpoint, n, stop.clone()).await?;
        println!("== {n} watchers of the whole key space open at {endpoint}");
        clean &= workload(&cmd.run, None).await?;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mib = bytes.load(std::sync::atomic::Ordering::Relaxed) as f64 / (1 << 20) as f64;
        println!("   the watchers received {mib:.1} MiB");
    }
    Ok(clean)
}

fn cleave_client(c: &Common) -> Result<Client> {
    let ca = match &c.ca_cert {
        Some(p) => Some(std::fs::read(p).with_context(|| format!("reading --ca-cert {}", p.display()))?),
        None => None,
    };
    let options = ClientOptions::default().with_deadline(c.timeout).with_token(c.token.clone()).with_ca_cert(ca);
    Client::with_options(&c.endpoints, options).context("invalid --endpoints")
}

/// The `run` and `multi` scenarios.
async fn workload(cmd: &RunCmd, presplit: Option<u64>) -> Result<bool> {
    let (c, w) = (&cmd.common, &cmd.workload);
    let target = Arc::new(match c.target {
        TargetKind::Cleavedb => {
            let consistency = if w.stale { Consistency::Stale } else { Consistency::Linearizable };
            Target::Cleave { client: cleave_client(c)?, consistency }
        }
        TargetKind::Etcd => Target::Etcd(etcd::Etcd::new(&c.endpoints, c.timeout)?),
    });
    if let Some(client) = target.cleave() {
        client.health().await.context("the cluster does not answer")?;
        if let Some(n) = w.hash_buckets {
            let k = client.declare_keyspace("user", n).await.context("declaring the keyspace \"user\"")?;
            eprintln!("keyspace \"user\": {} hash buckets, active: {}", k.hash_buckets, k.active);
        }
        if let Some(n) = presplit {
            multi::presplit(client, w.keys, n, Duration::from_millis(100)).await?;
        }
    }
    let values = Values::new(c.value_size, 64, &mut rand::rng());
    if w.preload {
        let loaded = preload::preload(target.clone(), 0..w.keys, Arc::new(values.clone()), c.concurrency).await;
        eprintln!("{loaded}");
    }
    let config = json!({
        "scenario": if presplit.is_some() { "multi" } else { "run" },
        "target": c.target, "endpoints": c.endpoints, "workload": w.workload, "distribution": w.distribution,
        "keys": w.keys, "value_size": c.value_size, "scan_len": w.scan_len, "concurrency": c.concurrency,
        "rate": c.rate, "duration_s": w.duration.as_secs_f64(), "warmup_s": w.warmup.as_secs_f64(),
        "ranges": presplit, "stale_reads": w.stale, "hash_buckets": w.hash_buckets,
    });
    let job = Arc::new(Job {
        workload: w.workload,
        chooser: KeyChooser::new(w.distribution, w.keys),
        values,
        scan_len: w.scan_len,
        concurrency: c.concurrency,
        rate: c.rate,
        keep_completions: false,
        next_new_key: std::sync::atomic::AtomicU64::new(w.keys),
    });
    let clock = Arc::new(Clock::new(w.warmup, Some(w.duration)));
    let live = Arc::new(Live::default());
    let ticker = progress::Ticker::start(
        clock.clone(),
        Some(w.warmup + w.duration),
        live.clone(),
        Arc::new(Mutex::new(String::new())),
    );
    let rec = runner::run(target, job, clock.clone(), live).await;
    drop(ticker);
    let report = RunReport::new(config, &rec, clock.measured_s());
    println!(
        "{} workload {}, {} keys, {} keys, {}-byte values, concurrency {}{}: {:.1}s measured",
        wire_name(c.target),
        wire_name(w.workload),
        wire_name(w.distribution),
        w.keys,
        c.value_size,
        c.concurrency,
        c.rate.map(|r| format!(", open loop at {r} req/s")).unwrap_or_default(),
        report.measured_s
    );
    println!("{}", report.render());
    if let Some(path) = &c.json {
        report::write_json(path, &report)?;
    }
    Ok(report.total().errors == 0)
}

/// The name an enum value has on the command line and in JSON.
fn wire_name<T: serde::Serialize>(v: T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

/// The settings of a scenario that runs an operation under writes.
fn under_writes_settings(c: &Common, a: &UnderWritesArgs, op_timeout: Duration) -> under_writes::Settings {
    under_writes::Settings {
        fill_mb: a.fill_mb,
        value_size: c.value_size,
        concurrency: c.concurrency,
        rate: c.rate,
        before: a.before,
        after: a.after,
        poll: a.poll,
        op_timeout,
    }
}

/// Prints `text` and writes `report` to `--json`, if given.
fn output<T: serde::Serialize>(c: &Common, text: &str, report: &T) -> Result<()> {
    println!("{text}");
    if let Some(path) = &c.json {
        report::write_json(path, report)?;
    }
    Ok(())
}

/// The `split` scenario.
/// The `split` scenario, or (`merge`) the `merge` one.
async fn split(cmd: &SplitCmd, merge: bool) -> Result<bool> {
    let c = &cmd.common;
    let name = if merge { "merge" } else { "split" };
    if c.target != TargetKind::Cleavedb {
        bail!("{name} needs --target cleavedb");
    }
    let settings = under_writes_settings(c, &cmd.load, cmd.split_timeout);
    let config = under_writes::config(name, &c.endpoints, &settings, json!({}));
    let report = match merge {
        true => split::run_merge(cleave_client(c)?, &settings, config).await?,
        false => split::run(cleave_client(c)?, &settings, config).await?,
    };
    output(c, &split::render(&report), &report)?;
    Ok(report.ok())
}

/// The `move` scenario.
async fn move_replica(cmd: &MoveCmd) -> Result<bool> {
    let c = &cmd.common;
    if c.target != TargetKind::Cleavedb {
        bail!("move needs --target cleavedb");
    }
    let settings = under_writes_settings(c, &cmd.load, cmd.move_timeout);
    let config = under_writes::config("move", &c.endpoints, &settings, json!({"from": cmd.from, "to": cmd.to}));
    let report = moves::run(cleave_client(c)?, &settings, cmd.from, cmd.to, config).await?;
    output(c, &moves::render(&report), &report)?;
    Ok(report.ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_parses_with_and_without_a_subcommand() {
        let cli =
            Cli::try_parse_from(["cleave-bench", "--workload", "b", "--distribution", "zipfian", "-c", "8"]).unwrap();
        assert!(cli.scenario.is_none());
        assert_eq!((cli.run.workload.workload, cli.run.common.concurrency), (Workload::B, 8));
        let cli = Cli::try_parse_from(["cleave-bench", "run", "--target", "etcd", "--rate", "500", "--duration", "2s"])
            .unwrap();
        match cli.scenario {
            Some(Scenario::Run(r)) => {
                assert_eq!((r.common.target, r.common.rate), (TargetKind::Etcd, Some(500.0)));
                assert_eq!(r.workload.duration, Duration::from_secs(2));
            }
            s => panic!("{s:?}"),
        }
        let cli = Cli::try_parse_from(["cleave-bench", "split", "--fill-mb", "20", "--before", "3s"]).unwrap();
        match cli.scenario {
            Some(Scenario::Split(s)) => assert_eq!((s.load.fill_mb, s.load.before), (20, Duration::from_secs(3))),
            s => panic!("{s:?}"),
        }
        let cli =
            Cli::try_parse_from(["cleave-bench", "move", "--fill-mb", "120", "--to", "4", "--after", "5s", "-c", "8"])
                .unwrap();
        match cli.scenario {
            Some(Scenario::Move(m)) => {
                assert_eq!((m.load.fill_mb, m.from, m.to, m.common.concurrency), (120, None, Some(4), 8));
                assert_eq!(
                    (m.load.after, m.load.before, m.move_timeout),
                    (Duration::from_secs(5), Duration::from_secs(10), Duration::from_secs(600))
                );
                let s = under_writes_settings(&m.common, &m.load, m.move_timeout);
                assert_eq!((s.fill_mb, s.concurrency, s.op_timeout), (120, 8, Duration::from_secs(600)));
            }
            s => panic!("{s:?}"),
        }
        assert!(Cli::try_parse_from(["cleave-bench", "move", "--from", "x"]).is_err());
        let cli = Cli::try_parse_from(["cleave-bench", "multi", "--ranges", "8", "--workload", "c"]).unwrap();
        assert!(
            matches!(cli.scenario, Some(Scenario::Multi(m)) if m.ranges == 8 && m.run.workload.workload == Workload::C)
        );
        <Cli as clap::CommandFactory>::command().debug_assert();
    }
}
