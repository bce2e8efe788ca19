//! One chaos run from start to verdict:
//!
//! 1. start the cluster (local processes, in namespaces if partitions are
//!    wanted) or take the given endpoints, and wait until it serves;
//! 2. start the clients and the nemesis; after `duration` (or Ctrl-C) stop
//!    the nemesis, which heals everything, and let in-flight requests end;
//! 3. wait until the cluster serves again (a cluster that does not recover
//!    fails the run), wait until every split and move the nemesis started
//!    has ended (one that does not end fails the run), read the set
//!    workload's keys back;
//! 4. save the history, run the checkers, and build the [`Summary`]: valid,
//!    invalid, or inconclusive (no anomaly, but some register key could not
//!    be decided: not a pass).
//!
//! Local processes and namespaces are owned by a guard whose `Drop` tears
//! them down, so every way out of [`run`] — error, panic, the future being
//! dropped on a second Ctrl-C — cleans up.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::check::{check_history, Verdict};
use crate::error::{Error, Result};
use crate::history::{Op, OpCounts, Recorder, Workload};
use crate::http::Api;
use crate::nemesis::Nemesis;
use crate::netns::Network;
use crate::nodes::{LocalCluster, LocalOpts};
use crate::schedule::{self, NemesisKind, ScheduleOpts};
use crate::summary::{Latency, Summary};
use crate::workload::{self, Ctx, WorkloadOpts};

/// Everything a run needs.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub seed: u64,
    pub nodes: usize,
    pub nemeses: Vec<NemesisKind>,
    pub workloads: Vec<Workload>,
    /// Run against these API endpoints (`http://host:port`) instead of
    /// starting a cluster.
    pub endpoints: Vec<String>,
    pub node_bin: PathBuf,
    pub dir: PathBuf,
    /// Keep the nodes' data directories even after a valid run.
    pub keep: bool,
    pub node_args: Vec<String>,
    pub node_log: Option<String>,
    /// Force namespaces on or off (`None`: on iff partitions are wanted).
    pub netns: Option<bool>,
    pub op_timeout: Duration,
    pub register_clients: usize,
    pub set_clients: usize,
    pub monotonic_clients: usize,
    pub scan_clients: usize,
    pub library_clients: usize,
    pub bank_clients: usize,
    pub register_slots: usize,
    pub rotate: Duration,
    /// Timing of the schedule; its `duration` is the run's.
    pub schedule: ScheduleOpts,
    pub max_states: usize,
    /// How long the cluster may take to serve, at the start and after the final heal.
    pub ready_timeout: Duration,
    /// The command line that replays this run, for the summary.
    pub replay: String,
    /// Workload reads with `consistency=stale` (recorded in the history and
    /// checked as stale reads).
    pub stale_reads: bool,
    /// Shards to add above the workloads' keys before the load (`presplit`).
    pub idle_shards: usize,
    /// Credentials of a secured cluster (`--endpoints` with `--token`, `--ca-cert`).
    pub auth: crate::http::Auth,
}

/// Hold of split phases on every node when the split-cancel nemesis runs
/// (`--fault-hold`), so that it finds a split in the phase it wants.
pub const SPLIT_HOLD: &str = "capturing=3000,frozen=600";

/// A run id that does not repeat across runs, even of the same seed by a
/// runner that is always pid 1 (a container): time and randomness, not the
/// pid. It separates the keys of runs against one long-lived cluster.
pub fn run_id(seed: u64) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let mixed = (nanos as u64).rotate_left(17) ^ rand::random::<u64>() ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    format!("{:012x}", mixed & 0xffff_ffff_ffff)
}

/// Kills the local cluster and removes its namespaces when dropped.
struct Teardown(Option<Arc<Mutex<LocalCluster>>>);

impl Drop for Teardown {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.lock().unwrap_or_else(|e| e.into_inner()).teardown();
        }
    }
}

/// Waits until every endpoint is healthy, every data shard has a leader and
/// every endpoint serves a linearizable read. `Err` names what was missing.
async fn wait_ready(
    api: &Api,
    endpoints: &[String],
    local: Option<&Arc<Mutex<LocalCluster>>>,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut missing;
    loop {
        if let Some(l) = local {
            let crashed = l.lock().unwrap_or_else(|e| e.into_inner()).reap_crashed();
            if let Some((node, status, log)) = crashed.into_iter().next() {
                return Err(Error::Node { node, message: format!("exited while starting ({status}):\n{log}") });
            }
        }
        missing = readiness(api, endpoints).await;
        match &missing {
            None => return Ok(()),
            Some(what) if Instant::now() >= deadline => {
                return Err(Error::NotReady(format!("after {timeout:?}: {what}")));
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// What keeps the cluster from being ready, if anything.
async fn readiness(api: &Api, endpoints: &[String]) -> Option<String> {
    for e in endpoints {
        if !api.healthy(e).await {
            return Some(format!("{e} is not healthy"));
        }
    }
    match api.shards(&endpoints[0]).await {
        Ok(shards) => {
            if let Some(s) = shards.iter().find(|s| s.leader.is_none()) {
                return Some(format!("shard {} has no leader", s.shard_id));
            }
        }
        Err(e) => return Some(e.to_string()),
    }
    for e in endpoints {
        if !api.read(e, "__chaos_probe").await.is_ok() {
            return Some(format!("{e} does not serve a linearizable read"));
        }
    }
    None
}

/// Reads every key of the set workload back (a scan of the whole key space,
/// retried page by page until `timeout`).
async fn read_set(api: &Api, endpoints: &[String], run_id: &str, timeout: Duration) -> Result<BTreeMap<String, u64>> {
    let deadline = Instant::now() + timeout;
    let mut content = BTreeMap::new();
    let mut cursor = String::new();
    let mut attempt = 0usize;
    loop {
        let base = &endpoints[attempt % endpoints.len()];
        match api.scan_page(base, &cursor, 1000).await {
            Ok((items, next)) => {
                for (k, v) in items {
                    if workload::is_set_key(run_id, &k) {
                        content.insert(k, v);
                    }
                }
                match next {
                    Some(n) => cursor = n,
                    None => return Ok(content),
                }
            }
            Err(e) => {
                attempt += 1;
                if Instant::now() >= deadline {
                    return Err(Error::Http(format!("final scan at {cursor:?}: {e}")));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Reads every bank account once more after the final heal, through any
/// node, and records it in the history (checked like the others); if no
/// node answers in time, the failure is recorded.
async fn final_bank_read(api: &Api, endpoints: &[String], run_id: &str, recorder: &Recorder, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let body = crate::bank::read_all_body(run_id);
    for attempt in 0usize.. {
        let node = endpoints[attempt % endpoints.len()].clone();
        let (id, invoke) = (recorder.next_id(), recorder.now());
        let outcome = crate::bank::read_all_outcome(api.txn(&node, &body).await);
        if outcome.is_ok() || Instant::now() >= deadline {
            let complete = recorder.now();
            let op = Op {
                id,
                workload: Workload::Bank,
                client: 0,
                key: "bank".into(),
                call: crate::history::Call::ReadAll,
                invoke,
                complete,
                outcome,
                node,
                stale: false,
            };
            recorder.record(op);
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn write_history(path: &PathBuf, ops: &[Op]) -> Result<()> {
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = std::io::BufWriter::new(file);
    for op in ops {
        let line = serde_json::to_string(op).expect("ops serialize");
        writeln!(w, "{line}").map_err(|e| Error::io(path, e))?;
    }
    w.flush().map_err(|e| Error::io(path, e))
}

/// Runs the whole thing. `interrupt` turning true ends the workload early
/// (the run is still checked).
/// The watch of the `watch` workload: a task reading a watch of the whole
/// key space through the Rust client, keeping the changes of this run's keys.
struct Watcher {
    seen: Arc<Mutex<Vec<crate::watched::Seen>>>,
    error: Arc<Mutex<Option<String>>>,
    /// Progress lines received.
    progress: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    /// Starts the watch and waits until it is established (its first
    /// progress line): every write from then on must be seen.
    async fn start(endpoints: &[String], cfg: &RunConfig, run_id: &str) -> Result<Watcher> {
        use futures::StreamExt;
        let client = workload::library_client(endpoints, cfg.op_timeout, &cfg.auth)?;
        let (seen, error) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(None)));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let run = run_id.to_string();
        let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (s, e, p) = (seen.clone(), error.clone(), progress.clone());
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let mut events = std::pin::pin!(client.watch(cleave_client::WatchRequest::default()));
            while let Some(event) = events.next().await {
                let (key, version) = match event {
                    Ok(cleave_client::WatchEvent::Put { key, version, .. })
                    | Ok(cleave_client::WatchEvent::Delete { key, version, .. }) => (key, version),
                    Ok(_) => {
                        p.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                        continue;
                    }
                    Err(err) => {
                        *e.lock().unwrap_or_else(|p| p.into_inner()) = Some(err.to_string());
                        return;
                    }
                };
                if key.split('/').nth(1) == Some(run.as_str()) {
                    s.lock().unwrap_or_else(|p| p.into_inner()).push(crate::watched::Seen { key, version });
                }
            }
        });
        match tokio::time::timeout(cfg.ready_timeout, ready_rx).await {
            Ok(Ok(())) => Ok(Watcher { seen, error, progress, task }),
            _ => {
                task.abort();
                Err(Error::Config("the watch was not established in time".into()))
            }
        }
    }

    /// Waits (up to `timeout`) until every acknowledged write of `ops` was
    /// seen, and two progress lines more (so that a change sent twice
    /// right after is seen too), then checks what was.
    async fn finish(self, ops: &[Op], run_id: &str, timeout: Duration) -> crate::watched::WatchReport {
        let acked = crate::watched::acknowledged(ops);
        let deadline = Instant::now() + timeout;
        let progress = || self.progress.load(std::sync::atomic::Ordering::SeqCst);
        let mut all_seen_at: Option<u64> = None;
        loop {
            let all = {
                let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
                let got: std::collections::HashSet<(&str, u64)> =
                    seen.iter().map(|s| (s.key.as_str(), s.version)).collect();
                acked.iter().all(|(k, v)| got.contains(&(k.as_str(), *v)))
            };
            if all && all_seen_at.is_none() {
                all_seen_at = Some(progress());
            }
            let settled = all_seen_at.is_some_and(|at| progress() >= at + 2);
            let failed = self.error.lock().unwrap_or_else(|p| p.into_inner()).is_some();
            if settled || failed || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.task.abort();
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let written: std::collections::HashSet<&str> = ops.iter().map(|o| o.key.as_str()).collect();
        let bank = |k: &str| workload::is_key_of(run_id, Workload::Bank, k);
        let mut report = crate::watched::check(ops, &seen, |k| written.contains(k) || bank(k));
        report.error = self.error.lock().unwrap_or_else(|p| p.into_inner()).clone();
        report
    }
}

pub async fn run(cfg: RunConfig, mut interrupt: watch::Receiver<bool>) -> Result<Summary> {
    let remote = !cfg.endpoints.is_empty();
    let disruptive: Vec<&NemesisKind> = cfg.nemeses.iter().filter(|k| k.is_disruptive()).collect();
    if remote && !disruptive.is_empty() {
        return Err(Error::Config(format!(
            "--endpoints: the {disruptive:?} nemeses need control of the node processes; with an existing cluster \
             use --nemesis split,move,transfer"
        )));
    }
    if cfg.workloads.is_empty() {
        return Err(Error::Config("no workload".into()));
    }
    let partitions: Vec<&NemesisKind> = cfg.nemeses.iter().filter(|k| k.needs_network()).collect();
    let netns = cfg.netns.unwrap_or(!partitions.is_empty());
    if !partitions.is_empty() && !netns {
        return Err(Error::Config(format!("the {partitions:?} nemeses need network namespaces (--netns on)")));
    }
    if netns && !remote {
        Network::probe()?;
    }
    std::fs::create_dir_all(&cfg.dir).map_err(|e| Error::io(&cfg.dir, e))?;
    let api = Api::new(cfg.op_timeout, &cfg.auth)?;
    let workload_api = if cfg.stale_reads { api.clone().with_stale_reads() } else { api.clone() };

    // 1. The cluster.
    let (endpoints, local, cluster_desc) = if remote {
        (cfg.endpoints.clone(), None, format!("existing cluster at {}", cfg.endpoints.join(",")))
    } else {
        let mut node_args = cfg.node_args.clone();
        if cfg.nemeses.contains(&NemesisKind::SplitCancel) && !node_args.iter().any(|a| a.contains("fault-hold")) {
            node_args.push(format!("--fault-hold={SPLIT_HOLD}"));
        }
        let opts = LocalOpts {
            nodes: cfg.nodes,
            bin: cfg.node_bin.clone(),
            dir: cfg.dir.clone(),
            netns,
            node_args,
            node_log: cfg.node_log.clone(),
        };
        let cluster = LocalCluster::start(&opts)?;
        let apis = cluster.apis();
        let desc = format!(
            "{} local nodes{} ({})",
            cfg.nodes,
            if cluster.has_network() { " in network namespaces" } else { " on 127.0.0.1" },
            apis.join(",")
        );
        (apis, Some(Arc::new(Mutex::new(cluster))), desc)
    };
    let _teardown = Teardown(local.clone());
    tracing::info!("cluster: {cluster_desc}");
    wait_ready(&api, &endpoints, local.as_ref(), cfg.ready_timeout).await?;
    tracing::info!("cluster is ready");
    if cfg.idle_shards > 0 {
        crate::presplit::run(&api, &endpoints[0], cfg.idle_shards, cfg.ready_timeout * 5).await?;
    }

    // 2. Load and faults.
    let recorder = Arc::new(Recorder::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let run_id = run_id(cfg.seed);
    tracing::info!("run id {run_id}");
    let ctx = Ctx {
        api: workload_api,
        endpoints: Arc::new(endpoints.clone()),
        recorder: recorder.clone(),
        stop: stop_rx.clone(),
        values: Arc::new(AtomicU64::new(1)),
    };
    let watcher = match cfg.workloads.contains(&Workload::Watch) {
        true => Some(Watcher::start(&endpoints, &cfg, &run_id).await?),
        false => None,
    };
    let clients = workload::spawn_clients(
        &ctx,
        WorkloadOpts {
            run_id: run_id.clone(),
            workloads: cfg.workloads.clone(),
            register_clients: cfg.register_clients,
            set_clients: cfg.set_clients,
            monotonic_clients: cfg.monotonic_clients,
            scan_clients: cfg.scan_clients,
            library_clients: cfg.library_clients,
            bank_clients: cfg.bank_clients,
            auth: cfg.auth.clone(),
            register_slots: cfg.register_slots,
            rotate: cfg.rotate,
            monotonic_keys: 3,
            seed: cfg.seed,
            op_timeout: cfg.op_timeout,
        },
    )?;
    let events = schedule::generate(cfg.seed, &cfg.nemeses, &cfg.schedule);
    tracing::info!("schedule: {} steps", events.len());
    let mut nemesis = Nemesis::new(api.clone(), endpoints.clone(), local.clone(), recorder.clone());
    let nemesis_task = tokio::spawn(async move {
        nemesis.run(&events, stop_rx).await;
        nemesis
    });

    let interrupted = tokio::select! {
        _ = tokio::time::sleep(cfg.schedule.duration) => false,
        _ = interrupt.wait_for(|i| *i) => true,
    };
    let load_secs = recorder.now() as f64 / 1e9;
    tracing::info!("stopping the load after {load_secs:.1}s{}", if interrupted { " (interrupted)" } else { "" });
    let _ = stop_tx.send(true);
    let mut nemesis = nemesis_task.await.map_err(|e| Error::Config(format!("nemesis task failed: {e}")))?;
    let healed = Instant::now();
    for c in clients {
        let _ = c.await;
    }

    // 3. Recovery and final reads.
    let recovery = wait_ready(&api, &endpoints, local.as_ref(), cfg.ready_timeout).await;
    let recovery_s = match &recovery {
        Ok(()) => Some(healed.elapsed().as_secs_f64()),
        Err(e) => {
            tracing::error!("the cluster did not recover: {e}");
            None
        }
    };
    nemesis.check_crashes();
    let (operation_phases, stuck_operations) = if recovery_s.is_some() {
        nemesis.wait_operations(cfg.ready_timeout).await
    } else {
        (BTreeMap::new(), Vec::new())
    };
    if !stuck_operations.is_empty() {
        tracing::error!("operations still running {:?} after the final heal: {stuck_operations:?}", cfg.ready_timeout);
    }
    let (set_content, final_read_error) = if cfg.workloads.contains(&Workload::Set) {
        match read_set(&api, &endpoints, &run_id, cfg.ready_timeout).await {
            Ok(c) => (Some(c), None),
            Err(e) => (None, Some(e.to_string())),
        }
    } else {
        (None, None)
    };

    if cfg.workloads.contains(&Workload::Bank) {
        final_bank_read(&api, &endpoints, &run_id, &recorder, cfg.ready_timeout).await;
    }

    // 4. History and verdict.
    let ops = recorder.snapshot();
    let watch_report = match watcher {
        Some(w) => Some(w.finish(&ops, &run_id, cfg.ready_timeout).await),
        None => None,
    };
    let history_file = cfg.dir.join("history.jsonl");
    write_history(&history_file, &ops)?;
    let max_states = cfg.max_states;
    let (ops, checks) = tokio::task::spawn_blocking(move || {
        let mut checks = check_history(&ops, set_content.as_ref(), max_states);
        if let Some(w) = watch_report {
            crate::watched::add_anomalies(&mut checks, &w);
            checks.watch = Some(w);
        }
        (ops, checks)
    })
    .await
    .map_err(|e| Error::Config(format!("checker failed: {e}")))?;

    let mut ops_by_workload = BTreeMap::new();
    for w in &cfg.workloads {
        ops_by_workload.insert(w.name().to_string(), OpCounts::of(ops.iter().filter(|o| o.workload == *w)));
    }
    let counts = OpCounts::of(&ops);
    let mut faults: BTreeMap<String, u64> = nemesis.report.counts.clone();
    if !nemesis.report.crashes.is_empty() {
        faults.insert("crash (not injected)".into(), nemesis.report.crashes.len() as u64);
    }
    let anomalies = checks.anomalies.len();
    let lost_writes = checks.lost_writes();
    let healthy = nemesis.report.crashes.is_empty()
        && recovery_s.is_some()
        && final_read_error.is_none()
        && stuck_operations.is_empty();
    // A crash, a cluster that did not recover, a stuck operation are
    // findings: invalid, whatever the checkers could decide.
    let verdict = if healthy { checks.verdict() } else { Verdict::Invalid };
    let valid = verdict == Verdict::Valid;
    let summary = Summary {
        valid,
        verdict,
        seed: cfg.seed,
        replay: cfg.replay.clone(),
        cluster: cluster_desc,
        nemeses: cfg.nemeses.iter().map(|k| k.to_string()).collect(),
        workloads: cfg.workloads.iter().map(|w| w.name().to_string()).collect(),
        duration_s: load_secs,
        interrupted,
        ops_per_sec: counts.total as f64 / load_secs.max(1e-9),
        ok_per_sec: counts.ok as f64 / load_secs.max(1e-9),
        ops: counts,
        ops_by_workload,
        latency_ms: Latency::of(&ops),
        faults,
        nemesis: nemesis.report,
        operation_phases,
        recovery_s,
        final_read_error,
        stuck_operations,
        anomalies,
        lost_writes,
        checks,
        run_dir: cfg.dir.display().to_string(),
        history_file: history_file.display().to_string(),
    };

    if verdict == Verdict::Inconclusive {
        tracing::warn!("inconclusive run: {} register key(s) undecided", summary.checks.undecided());
    }
    if !valid {
        if let Some(l) = &local {
            let c = l.lock().unwrap_or_else(|e| e.into_inner());
            let logs: Vec<String> = c.ids().into_iter().map(|id| c.spec(id).log.display().to_string()).collect();
            tracing::warn!("invalid run: node logs kept at {}", logs.join(", "));
        }
    }
    if let Some(l) = &local {
        l.lock().unwrap_or_else(|e| e.into_inner()).teardown();
        if valid && !cfg.keep {
            let c = l.lock().unwrap_or_else(|e| e.into_inner());
            for id in c.ids() {
                let _ = std::fs::remove_dir_all(&c.spec(id).data_dir);
            }
            let _ = std::fs::remove_file(cfg.dir.join("cleave-node"));
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_do_not_repeat_for_the_same_seed() {
        let ids: std::collections::BTreeSet<String> = (0..100).map(|_| run_id(1)).collect();
        assert_eq!(ids.len(), 100);
        let id = run_id(1);
        assert_eq!(id.len(), 12);
        let k = workload::key(&id, Workload::Set, "c1-1");
        assert!(workload::is_set_key(&id, &k));
    }
}
