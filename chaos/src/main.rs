//! `cleave-chaos`: run a chaos test and print the verdict.
//!
//! Exit status: 0 valid, 1 invalid (an anomaly, a crash, no recovery, an
//! operation that never ended), 2 the suite itself could not run, 3
//! inconclusive (no anomaly, but the linearizability search gave up on some
//! register key: the run has not passed; raise `--max-states` or shorten
//! `--rotate`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use cleave_chaos::check::{check_history, Verdict, DEFAULT_MAX_STATES};
use cleave_chaos::history::{Op, Workload};
use cleave_chaos::runner::{run, RunConfig};
use cleave_chaos::schedule::{parse_kinds, ScheduleOpts};
use tokio::sync::{watch, Notify};

/// Fault-injection test for CleaveDB: real node processes, kills, pauses,
/// network partitions, splits; histories checked for linearizability, lost
/// writes and versions going backwards.
#[derive(Parser, Debug)]
#[command(name = "cleave-chaos", version, about, long_about)]
struct Args {
    /// How long the load and the faults run (e.g. 90s, 10m).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Seed of the fault schedule (and of the clients' choices); random if omitted.
    #[arg(long)]
    seed: Option<u64>,
    /// Nodes of the local cluster.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Faults: kill, pause, partition, split, move, transfer, split-cancel,
    /// meta-isolate, `all` or `none`.
    #[arg(long, default_value = "kill,pause,partition,split")]
    nemesis: String,
    /// Workloads: register, set, monotonic, scan, client, bank, watch.
    #[arg(long, default_value = "register,set,monotonic,scan,client,bank,watch", value_delimiter = ',')]
    workload: Vec<String>,
    /// Use this existing cluster (HOST:PORT of node APIs, comma-separated)
    /// instead of starting one; only split/move/transfer faults then.
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<String>,
    /// Bearer token for an --endpoints cluster whose nodes check tokens (a write or admin token:
    /// the faults split and move).
    #[arg(long, env = "CLEAVE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) of an --endpoints cluster serving HTTPS.
    #[arg(long, env = "CLEAVE_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// The cleave-node binary [default: next to this one, else $CARGO_TARGET_DIR/release/cleave-node].
    #[arg(long, env = "CLEAVE_NODE_BIN")]
    node_bin: Option<PathBuf>,
    /// Run directory: node data and logs, history.jsonl [default: /tmp/cleave-chaos-PID].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Write the summary as JSON here [default: DIR/summary.json].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Keep the nodes' data directories after a valid run.
    #[arg(long)]
    keep: bool,
    /// Extra argument for every node (repeat for more), e.g. --node-arg=--snapshot-logs=500.
    #[arg(long, allow_hyphen_values = true)]
    node_arg: Vec<String>,
    /// RUST_LOG for the nodes.
    #[arg(long)]
    node_log: Option<String>,
    /// The nodes' --request-timeout-ms (their 504s), as a duration.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    server_timeout: Duration,
    /// Network namespaces: auto (when partitioning), on, off.
    #[arg(long, default_value = "auto")]
    netns: String,
    /// Client-side time limit of one request; past it the operation is indeterminate.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    op_timeout: Duration,
    /// Register clients.
    #[arg(long, default_value_t = 6)]
    clients: usize,
    #[arg(long, default_value_t = 2)]
    set_clients: usize,
    #[arg(long, default_value_t = 2)]
    monotonic_clients: usize,
    /// Inserting clients of the scan workload (it also runs one scanner).
    #[arg(long, default_value_t = 1)]
    scan_clients: usize,
    /// Clients of the client workload (through the Rust client library).
    #[arg(long, default_value_t = 3)]
    library_clients: usize,
    /// Clients of the bank workload (transactions).
    #[arg(long, default_value_t = 3)]
    bank_clients: usize,
    /// Register keys in use at a time.
    #[arg(long, default_value_t = 6)]
    keys: usize,
    /// How long one register key is used before a fresh one replaces it.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    rotate: Duration,
    /// Shortest and longest disruptive fault.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    hold_min: Duration,
    #[arg(long, default_value = "7s", value_parser = humantime::parse_duration)]
    hold_max: Duration,
    /// Mean time between two split/move/transfer steps.
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    admin_every: Duration,
    /// Budget of the linearizability search per key (memoized states).
    #[arg(long, default_value_t = DEFAULT_MAX_STATES)]
    max_states: usize,
    /// How long the cluster may take to serve, at the start and after the final heal.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    ready_timeout: Duration,
    /// Send the workloads' reads with consistency=stale. They are recorded
    /// as such in the history and checked as stale reads (each must show a
    /// state its key had before the read completed), here and by
    /// --check-history.
    #[arg(long, hide = true)]
    stale_reads: bool,
    /// Split off this many more shards, above the workloads' keys, before
    /// the load starts: most groups are then idle (quiet) while the faults run.
    #[arg(long, default_value_t = 0)]
    idle_shards: usize,
    /// Only check a saved history.jsonl (the set check needs a live run and is skipped).
    #[arg(long)]
    check_history: Option<PathBuf>,
    /// More log output (-v: progress, -vv: debug).
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

fn node_bin(args: &Args) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.node_bin {
        return Ok(p.clone());
    }
    let beside = std::env::current_exe()?.parent().map(|d| d.join("cleave-node"));
    let target = std::env::var_os("CARGO_TARGET_DIR").map(|d| PathBuf::from(d).join("release/cleave-node"));
    for p in beside.iter().chain(target.iter()) {
        if p.is_file() {
            return Ok(p.clone());
        }
    }
    bail!("cleave-node not found next to cleave-chaos or in $CARGO_TARGET_DIR/release: build it (cargo build --release --bins) or pass --node-bin")
}

fn replay_command(seed: u64) -> String {
    let mut args: Vec<String> = std::env::args().collect();
    if let Some(first) = args.first_mut() {
        *first = "cleave-chaos".into();
    }
    if !args.iter().any(|a| a == "--seed" || a.starts_with("--seed=")) {
        args.push(format!("--seed={seed}"));
    }
    redact_token(&mut args);
    args.join(" ")
}

/// Hides the value of `--token` (the summary is saved and printed).
fn redact_token(args: &mut [String]) {
    let mut next = false;
    for a in args.iter_mut() {
        if next {
            *a = "…".into();
            next = false;
        } else if a == "--token" {
            next = true;
        } else if a.starts_with("--token=") {
            *a = "--token=…".into();
        }
    }
}

fn check_only(path: &PathBuf, max_states: usize) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let ops: Vec<Op> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("parsing the history")?;
    let report = check_history(&ops, None, max_states);
    let r = &report.register;
    let stale = ops.iter().filter(|o| o.stale).count();
    println!(
        "{} ops ({stale} stale reads); register: {} keys, {} linearizable, {} violations, {} undecided; scan: {} \
         scans, {} problems; monotonic regressions: {}",
        ops.len(),
        r.keys,
        r.linearizable,
        r.violations,
        r.unknown.len(),
        report.scan.scans,
        report.scan.problems.len(),
        report.monotonic_regressions
    );
    for a in &report.anomalies {
        println!("{}", a.describe());
    }
    let verdict = report.verdict();
    println!("verdict: {verdict:?}");
    Ok(exit_code(verdict))
}

/// The exit status of a verdict (see the crate docs).
fn exit_code(verdict: Verdict) -> ExitCode {
    match verdict {
        Verdict::Valid => ExitCode::SUCCESS,
        Verdict::Invalid => ExitCode::from(1),
        Verdict::Inconclusive => ExitCode::from(3),
    }
}

async fn run_chaos(args: Args) -> anyhow::Result<ExitCode> {
    let seed = args.seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        t.as_nanos() as u64 % 1_000_000_000
    });
    let nemeses = parse_kinds(&args.nemesis)?;
    let workloads = args
        .workload
        .iter()
        .map(|w| {
            Workload::ALL.into_iter().find(|k| k.name() == w.trim()).with_context(|| format!("unknown workload {w:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let netns = match args.netns.as_str() {
        "auto" => None,
        "on" => Some(true),
        "off" => Some(false),
        other => bail!("--netns {other:?}: expected auto, on or off"),
    };
    let endpoints: Vec<String> = args
        .endpoints
        .iter()
        .map(|e| {
            if e.starts_with("http") {
                e.trim_end_matches('/').to_string()
            } else {
                format!("{}://{e}", if args.ca_cert.is_some() { "https" } else { "http" })
            }
        })
        .collect();
    let auth = cleave_chaos::http::Auth {
        token: args.token.clone(),
        ca_pem: match &args.ca_cert {
            Some(p) => Some(std::fs::read(p).with_context(|| format!("reading --ca-cert {}", p.display()))?),
            None => None,
        },
    };
    let dir = args.dir.clone().unwrap_or_else(|| PathBuf::from(format!("/tmp/cleave-chaos-{}", std::process::id())));
    let mut node_args = args.node_arg.clone();
    node_args.push(format!("--request-timeout-ms={}", args.server_timeout.as_millis()));
    let cfg = RunConfig {
        seed,
        nodes: args.nodes,
        nemeses,
        workloads,
        node_bin: if endpoints.is_empty() { node_bin(&args)? } else { PathBuf::new() },
        endpoints,
        dir: dir.clone(),
        keep: args.keep,
        node_args,
        node_log: args.node_log.clone(),
        netns,
        op_timeout: args.op_timeout,
        register_clients: args.clients,
        set_clients: args.set_clients,
        monotonic_clients: args.monotonic_clients,
        scan_clients: args.scan_clients,
        library_clients: args.library_clients,
        bank_clients: args.bank_clients,
        auth,
        register_slots: args.keys,
        rotate: args.rotate,
        schedule: ScheduleOpts {
            duration: args.duration,
            hold: (args.hold_min, args.hold_max),
            admin_every: args.admin_every,
            ..ScheduleOpts::default()
        },
        max_states: args.max_states,
        ready_timeout: args.ready_timeout,
        replay: replay_command(seed),
        stale_reads: args.stale_reads,
        idle_shards: args.idle_shards,
    };
    eprintln!("cleave-chaos: seed {seed}, {:?}, nemeses {}, run dir {}", args.duration, args.nemesis, dir.display());

    // First Ctrl-C / SIGTERM: stop the load, heal, check. Second: abort.
    let (interrupt_tx, interrupt_rx) = watch::channel(false);
    let abort = Arc::new(Notify::new());
    let abort2 = abort.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
            return;
        };
        for n in 0.. {
            tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
            if n == 0 {
                eprintln!("cleave-chaos: stopping the load, healing and checking (again to abort)");
                let _ = interrupt_tx.send(true);
            } else {
                eprintln!("cleave-chaos: aborting; cleaning up");
                abort2.notify_one();
            }
        }
    });

    let summary = tokio::select! {
        s = run(cfg, interrupt_rx) => s?,
        _ = abort.notified() => bail!("aborted"),
    };
    print!("{}", summary.render());
    let out = args.out.clone().unwrap_or_else(|| dir.join("summary.json"));
    std::fs::write(&out, serde_json::to_string_pretty(&summary)?)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("summary     {}", out.display());
    Ok(exit_code(summary.verdict))
}

fn main() -> ExitCode {
    let args = Args::parse();
    // The client library warns about every write it could not confirm:
    // that is the client workload's normal business here.
    let default = match args.verbose {
        0 => "warn,cleave_client=error",
        1 => "info,cleave_client=error",
        _ => "debug,hyper=info,reqwest=info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();

    let result = match &args.check_history {
        Some(path) => check_only(path, args.max_states),
        // One thread: node processes are forked from it (see `nodes`), and the
        // load is I/O bound.
        None => match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt.block_on(run_chaos(args)),
            Err(e) => Err(e.into()),
        },
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cleave-chaos: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_replay_line_never_shows_a_token() {
        let mut args: Vec<String> =
            ["cleave-chaos", "--token", "s3cret", "--token=s3cret2", "--seed=1"].map(String::from).to_vec();
        super::redact_token(&mut args);
        assert_eq!(args.join(" "), "cleave-chaos --token … --token=… --seed=1");
    }
}
