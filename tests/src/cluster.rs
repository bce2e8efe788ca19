//! A cluster of real `cleave-node` processes on 127.0.0.1.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use crate::http::{Http, Resp};
use crate::wait::wait_for;
use crate::{NodeId, ShardId, FIRST_SHARD};

/// How long [`Cluster::start`] and the restart helpers wait for the cluster
/// to serve.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of a test cluster.
#[derive(Clone, Debug, Default)]
pub struct ClusterOpts {
    /// `--snapshot-logs N`: build a Raft snapshot every N log entries.
    pub snapshot_logs: Option<u64>,
    /// `--keep-logs N`: log entries kept behind the snapshot.
    pub keep_logs: Option<u64>,
    /// Further arguments given to every node.
    pub extra_args: Vec<String>,
    /// Further arguments given to one node only (after `extra_args`).
    pub node_args: Vec<(NodeId, Vec<String>)>,
    /// Bearer token the harness's own requests carry (nodes started with
    /// `--tokens-file`: an admin token, for the readiness checks).
    pub token: Option<String>,
    /// PEM of the CA the nodes' certificates come from, when their API is
    /// HTTPS (`--tls-cert`): the harness speaks HTTPS and trusts it.
    pub https_ca: Option<Vec<u8>>,
}

impl ClusterOpts {
    /// Small snapshot and log-retention thresholds, so that a lagging
    /// follower has to catch up from a snapshot.
    pub fn small_logs(snapshot_logs: u64, keep_logs: u64) -> Self {
        ClusterOpts { snapshot_logs: Some(snapshot_logs), keep_logs: Some(keep_logs), ..Default::default() }
    }
}

/// One node of a test cluster: its addresses, data dir, log file and process.
pub struct NodeHandle {
    pub id: NodeId,
    /// `http` or `https`.
    pub scheme: &'static str,
    pub api_port: u16,
    pub raft_port: u16,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    child: Mutex<Option<Child>>,
    starts: Mutex<u32>,
}

impl NodeHandle {
    /// Base URL of the HTTP API, `http://127.0.0.1:PORT` (or `https://`).
    pub fn api(&self) -> String {
        format!("{}://{}", self.scheme, self.api_addr())
    }

    pub fn api_addr(&self) -> String {
        format!("127.0.0.1:{}", self.api_port)
    }

    pub fn raft_addr(&self) -> String {
        format!("127.0.0.1:{}", self.raft_port)
    }

    fn child(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this node was started and not killed by the test (it may
    /// still have crashed on its own: see [`Cluster::assert_running`]).
    pub fn is_up(&self) -> bool {
        self.child().is_some()
    }

    /// SIGKILLs the process and reaps it. No-op if it is not running.
    fn kill(&self) {
        if let Some(mut child) = self.child().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `Some(status)` if the process was started and has exited on its own.
    fn exited(&self) -> Option<String> {
        match self.child().as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(status))) => Some(status.to_string()),
            _ => None,
        }
    }

    /// The last `lines` lines of this node's log file.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path, lines)
    }
}

/// A running test cluster. Dropping it kills every node.
pub struct Cluster {
    nodes: Vec<NodeHandle>,
    initial_cluster: String,
    opts: ClusterOpts,
    bin: PathBuf,
    /// Raw HTTP access (15 s per request).
    pub http: Http,
    dir: Option<TempDir>,
}

impl Cluster {
    /// Starts `n` nodes of a new cluster (ids 1..=n), and waits until every
    /// node answers `/health`, shard 1 has a leader, and every node serves a
    /// linearizable read.
    pub async fn start(n: usize, opts: ClusterOpts) -> Cluster {
        assert!(n >= 1);
        let bin = node_binary();
        // A port picked free can be taken by someone else before the node
        // binds it; then start over with new ports.
        for attempt in 1..=3 {
            let cluster = Self::spawn_new(n, opts.clone(), bin.clone());
            match cluster.wait_listening().await {
                None => {
                    cluster.wait_ready().await;
                    return cluster;
                }
                Some(id) if attempt < 3 => {
                    eprintln!("node {id} could not bind its ports (attempt {attempt}); retrying with new ports");
                }
                Some(id) => panic!("node {id} could not bind its ports:\n{}", cluster.node(id).log_tail(20)),
            }
        }
        unreachable!()
    }

    fn spawn_new(n: usize, opts: ClusterOpts, bin: PathBuf) -> Cluster {
        let dir = tempfile::Builder::new().prefix("cleave-test-").tempdir().expect("create temp dir");
        let ports = free_ports(2 * n);
        let nodes: Vec<NodeHandle> = (0..n)
            .map(|i| {
                let id = i as NodeId + 1;
                let data_dir = dir.path().join(format!("node{id}"));
                std::fs::create_dir_all(&data_dir).expect("create data dir");
                NodeHandle {
                    id,
                    scheme: if opts.https_ca.is_some() { "https" } else { "http" },
                    api_port: ports[2 * i],
                    raft_port: ports[2 * i + 1],
                    data_dir,
                    log_path: dir.path().join(format!("node{id}.log")),
                    child: Mutex::new(None),
                    starts: Mutex::new(0),
                }
            })
            .collect();
        let initial_cluster = nodes.iter().map(|n| format!("{}={}", n.id, n.raft_addr())).collect::<Vec<_>>().join(",");
        let http = match &opts.https_ca {
            Some(ca) => Http::with_ca(ca),
            None => Http::new(),
        }
        .with_token(opts.token.as_deref());
        let cluster = Cluster { nodes, initial_cluster, opts, bin, http, dir: Some(dir) };
        for id in cluster.ids() {
            cluster.spawn(id);
        }
        cluster
    }

    /// Waits until every node answers `/health`; returns the id of a node
    /// that exited because its address was in use, if one did.
    async fn wait_listening(&self) -> Option<NodeId> {
        wait_for(READY_TIMEOUT, "every node to answer /health with 200", || async {
            for n in &self.nodes {
                if n.exited().is_some() && n.log_tail(30).to_lowercase().contains("in use") {
                    return Some(Some(n.id));
                }
            }
            self.assert_running();
            for n in &self.nodes {
                if self.http.health(&n.api()).await.ok()?.status != 200 {
                    return None;
                }
            }
            Some(None)
        })
        .await
    }

    /// Node ids, 1..=n.
    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// Ids of the nodes the test has not killed.
    pub fn up_ids(&self) -> Vec<NodeId> {
        self.nodes.iter().filter(|n| n.is_up()).map(|n| n.id).collect()
    }

    pub fn node(&self, id: NodeId) -> &NodeHandle {
        self.nodes.iter().find(|n| n.id == id).unwrap_or_else(|| panic!("no node {id}"))
    }

    /// Base URL of node `id`'s API.
    pub fn api(&self, id: NodeId) -> String {
        self.node(id).api()
    }

    /// Base URLs of every node (also the killed ones).
    pub fn apis(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.api()).collect()
    }

    /// The temporary directory holding data dirs and logs.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("temp dir").path()
    }

    /// SIGKILLs node `id` (kill -9) and reaps it.
    pub fn kill(&self, id: NodeId) {
        self.node(id).kill();
    }

    /// SIGKILLs every node, as close together as possible.
    pub fn kill_all(&self) {
        for n in &self.nodes {
            if let Some(child) = n.child().as_mut() {
                let _ = child.kill();
            }
        }
        for n in &self.nodes {
            n.kill();
        }
    }

    /// Sends `signal` (`STOP`, `CONT`) to node `id`'s process.
    fn signal(&self, id: NodeId, signal: &str) {
        let pid = self.node(id).child().as_ref().map(|c| c.id()).unwrap_or_else(|| panic!("node {id} is not running"));
        let ok = std::process::Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status();
        assert!(ok.is_ok_and(|s| s.success()), "kill -{signal} {pid} (node {id}) failed");
    }

    /// Sends SIGHUP to node `id` (it reloads its tokens file).
    pub fn hangup(&self, id: NodeId) {
        self.signal(id, "HUP");
    }

    /// Freezes node `id` (SIGSTOP): its sockets stay open and say nothing,
    /// like a node stuck in a long pause. Undo with [`Cluster::resume`].
    pub fn pause(&self, id: NodeId) {
        self.signal(id, "STOP");
    }

    /// Lets a paused node run again (SIGCONT).
    pub fn resume(&self, id: NodeId) {
        self.signal(id, "CONT");
    }

    /// Starts node `id` again with the same arguments and data dir. Does not
    /// wait; see [`Cluster::restart_and_wait`].
    pub fn restart(&self, id: NodeId) {
        assert!(!self.node(id).is_up(), "node {id} is still running; kill it first");
        self.spawn(id);
    }

    /// Restarts node `id` and waits until it answers `/health`.
    pub async fn restart_and_wait(&self, id: NodeId) {
        self.restart(id);
        self.wait_healthy(id, READY_TIMEOUT).await;
    }

    /// Restarts every killed node and waits until the cluster serves again
    /// (as after [`Cluster::start`]).
    pub async fn restart_all(&self) {
        for n in &self.nodes {
            if !n.is_up() {
                self.spawn(n.id);
            }
        }
        self.wait_ready().await;
    }

    fn spawn(&self, id: NodeId) {
        let node = self.node(id);
        let mut starts = node.starts.lock().unwrap_or_else(|e| e.into_inner());
        *starts += 1;
        let mut args: Vec<String> = vec![
            "--id".into(),
            id.to_string(),
            "--data-dir".into(),
            node.data_dir.display().to_string(),
            "--listen-api".into(),
            node.api_addr(),
            "--listen-raft".into(),
            node.raft_addr(),
            "--initial-cluster".into(),
            self.initial_cluster.clone(),
        ];
        if let Some(n) = self.opts.snapshot_logs {
            args.extend(["--snapshot-logs".into(), n.to_string()]);
        }
        if let Some(n) = self.opts.keep_logs {
            args.extend(["--keep-logs".into(), n.to_string()]);
        }
        args.extend(self.opts.extra_args.iter().cloned());
        for (_, more) in self.opts.node_args.iter().filter(|(n, _)| *n == id) {
            args.extend(more.iter().cloned());
        }

        let mut log = OpenOptions::new().create(true).append(true).open(&node.log_path).expect("open node log");
        writeln!(log, "\n===== harness: start #{} of node {id}: {} {}", *starts, self.bin.display(), args.join(" "))
            .expect("write node log");
        let cmd = node_command(&self.bin, &args, log);
        let child = spawn_from_spawner_thread(cmd)
            .unwrap_or_else(|e| panic!("cannot start {} for node {id}: {e}", self.bin.display()));
        *node.child() = Some(child);
    }

    /// Panics (with the node's log tail) if a node the test did not kill has
    /// exited on its own.
    pub fn assert_running(&self) {
        for n in &self.nodes {
            if let Some(status) = n.exited() {
                panic!("node {} exited on its own ({status}); last log lines:\n{}", n.id, n.log_tail(60).trim_end());
            }
        }
    }

    /// Waits until node `id` answers `GET /health` with 200.
    pub async fn wait_healthy(&self, id: NodeId, timeout: Duration) {
        let api = self.api(id);
        wait_for(timeout, format_args!("node {id} to answer /health with 200"), || async {
            self.assert_running();
            let r = self.http.health(&api).await.ok()?;
            (r.status == 200).then_some(())
        })
        .await
    }

    /// Waits until every running node is healthy, shard 1 has a leader, and
    /// every running node serves a linearizable read (forwarding works).
    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
        for id in self.up_ids() {
            self.wait_healthy(id, left()).await;
        }
        self.wait_for_leader(FIRST_SHARD, left()).await;
        for id in self.up_ids() {
            let api = self.api(id);
            wait_for(left(), format_args!("node {id} to serve a linearizable read"), || async {
                self.assert_running();
                let r = self.http.get(&api, "__harness_probe", Some("linearizable")).await.ok()?;
                matches!(r.status, 200 | 404).then_some(())
            })
            .await;
            // Admin requests need a metadata leader that has confirmed its
            // leadership: its first election can take a second round when
            // the founders start one after the other.
            wait_for(left(), format_args!("node {id} to reach the metadata leader"), || async {
                self.assert_running();
                let r = self.http.get_path(&api, "/admin/nodes").await.ok()?;
                (r.status == 200).then_some(())
            })
            .await;
        }
    }

    /// The leader of `shard`, if one is known right now: a node that the test
    /// has not killed, that some running node names as leader, and that
    /// names itself as leader.
    pub async fn leader_of_shard(&self, shard: ShardId) -> Option<NodeId> {
        let up = self.up_ids();
        let mut named = Vec::new();
        for &id in &up {
            if let Some(l) = self.reported_leader(id, shard).await {
                if up.contains(&l) && !named.contains(&l) {
                    named.push(l);
                }
            }
        }
        for l in named {
            if self.reported_leader(l, shard).await == Some(l) {
                return Some(l);
            }
        }
        None
    }

    /// The leader of `shard` according to node `id`'s `/admin/shards`.
    pub async fn reported_leader(&self, id: NodeId, shard: ShardId) -> Option<NodeId> {
        let shards = self.http.admin_shards(&self.api(id)).await.ok()?;
        shards.into_iter().find(|s| s.shard_id == shard)?.leader
    }

    /// Waits until [`Cluster::leader_of_shard`] finds a leader; returns it.
    pub async fn wait_for_leader(&self, shard: ShardId, timeout: Duration) -> NodeId {
        wait_for(timeout, format_args!("a running leader of shard {shard}"), || async {
            self.assert_running();
            self.leader_of_shard(shard).await
        })
        .await
    }

    /// Waits until a running node other than `old` leads `shard`.
    pub async fn wait_for_new_leader(&self, shard: ShardId, old: NodeId, timeout: Duration) -> NodeId {
        wait_for(timeout, format_args!("a leader of shard {shard} other than node {old}"), || async {
            self.assert_running();
            self.leader_of_shard(shard).await.filter(|&l| l != old)
        })
        .await
    }

    /// The leader of Raft group `group` (0 is the metadata group) according
    /// to the nodes' own `/metrics` (`cleave_raft_is_leader{group="N"} 1`):
    /// the one running node that says it leads, if exactly one does. Unlike
    /// [`Cluster::leader_of_shard`] this also sees groups that are not in the
    /// directory yet (the new shard of a split before its commit).
    pub async fn group_leader(&self, group: ShardId) -> Option<NodeId> {
        let needle = format!("cleave_raft_is_leader{{group=\"{group}\"}} ");
        let mut leaders = Vec::new();
        for id in self.up_ids() {
            let r = self.http.get_path(&self.api(id), "/metrics").await.ok()?;
            if r.status != 200 {
                return None;
            }
            let leads = r.body.lines().any(|l| l.strip_prefix(&needle).is_some_and(|v| v.trim() == "1"));
            if leads {
                leaders.push(id);
            }
        }
        match leaders[..] {
            [one] => Some(one),
            _ => None,
        }
    }

    /// Waits until [`Cluster::group_leader`] finds a leader of `group` other
    /// than `not` (any leader when `not` is `None`); returns it.
    pub async fn wait_for_group_leader(&self, group: ShardId, not: Option<NodeId>, timeout: Duration) -> NodeId {
        wait_for(timeout, format_args!("a running leader of group {group} other than {not:?}"), || async {
            self.assert_running();
            self.group_leader(group).await.filter(|&l| Some(l) != not)
        })
        .await
    }

    /// A running node that is not `leader` (for tests that need a follower).
    pub fn follower_of(&self, leader: NodeId) -> NodeId {
        *self.up_ids().iter().find(|&&id| id != leader).expect("a running node other than the leader")
    }

    /// `PUT` through node `via`; panics unless it answers 200. Returns the
    /// acknowledged version.
    pub async fn put_ok(&self, via: NodeId, key: &str, value: &Value) -> u64 {
        let r = self.http.put(&self.api(via), key, value, None).await.unwrap_or_else(|e| panic!("PUT {key}: {e:#}"));
        let w = r.write_result();
        assert_eq!(w.key, key, "write answer names another key: {r:?}");
        w.version
    }

    /// Reads `key` through node `via`, retrying transport errors and
    /// transient answers (421/503/504) until `timeout`; returns the first
    /// definite answer (any other status).
    pub async fn read_retry(&self, via: NodeId, key: &str, consistency: Option<&str>, timeout: Duration) -> Resp {
        let api = self.api(via);
        wait_for(timeout, format_args!("a definite answer to GET {key:?} from node {via}"), || async {
            let r = self.http.get(&api, key, consistency).await.ok()?;
            (!r.is_transient()).then_some(r)
        })
        .await
    }

    /// The sum of every sample of a Prometheus metric on node `id`'s
    /// `/metrics` (0 when the metric is absent, as an untouched counter is).
    pub async fn metric(&self, id: NodeId, name: &str) -> f64 {
        let r = self.http.get_path(&self.api(id), "/metrics").await.expect("GET /metrics");
        assert_eq!(r.status, 200, "/metrics: {r:?}");
        r.body
            .lines()
            .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{'])))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Node `id`'s `/metrics` lines that mention `needle` (for messages).
    pub async fn metric_lines(&self, id: NodeId, needle: &str) -> String {
        let r = self.http.get_path(&self.api(id), "/metrics").await.expect("GET /metrics");
        r.body.lines().filter(|l| l.contains(needle)).collect::<Vec<_>>().join("\n")
    }

    /// Prints the last `lines` lines of every node's log to stderr.
    pub fn dump_logs(&self, lines: usize) {
        for n in &self.nodes {
            eprintln!("----- node {} log ({}), last {lines} lines -----", n.id, n.log_path.display());
            eprintln!("{}", n.log_tail(lines).trim_end());
        }
        eprintln!("----- end of node logs -----");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_all();
        let keep = std::env::var_os("CLEAVE_KEEP_DATA").is_some_and(|v| !v.is_empty() && v != "0");
        if std::thread::panicking() {
            eprintln!(
                "test failed; cluster directory: {}{}",
                self.dir().display(),
                if keep { "" } else { " (removed; set CLEAVE_KEEP_DATA=1 to keep it)" }
            );
            self.dump_logs(40);
        }
        if keep {
            if let Some(dir) = self.dir.take() {
                eprintln!("CLEAVE_KEEP_DATA: keeping {}", dir.keep().display());
            }
        }
    }
}

/// The `cleave-node` binary: `$CLEAVE_NODE_BIN`, else next to the directory
/// of the test executable (`target/release/deps/x` → `target/release/cleave-node`).
pub fn node_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CLEAVE_NODE_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "CLEAVE_NODE_BIN={} does not exist: run `cargo build --release --bins` first",
            p.display()
        );
        return p;
    }
    let exe = std::env::current_exe().expect("current exe");
    let p = exe.parent().and_then(Path::parent).map(|d| d.join("cleave-node")).expect("test exe has a parent dir");
    assert!(
        p.is_file(),
        "cleave-node binary not found at {}: run `cargo build --release --bins` first (or set CLEAVE_NODE_BIN)",
        p.display()
    );
    p
}

/// `RUST_LOG` for the nodes: `$CLEAVE_NODE_LOG` if set, else the test's own
/// `RUST_LOG` is inherited, else the node's default filter applies.
fn node_log_filter() -> Option<String> {
    std::env::var("CLEAVE_NODE_LOG").ok()
}

/// `n` distinct free ports on 127.0.0.1 for nodes to listen on.
///
/// Chosen *below* the kernel's ephemeral range: a port picked by binding
/// port 0 comes from that range, and between its release and the node's
/// bind, any outgoing connection of a test running alongside may take it as
/// its source port (seen in CI: a node exiting with "binding …: address in
/// use"). Ports below the range are never given to outgoing connections.
/// Each port is checked free by binding it, and never handed out twice by
/// this process.
pub fn free_ports(n: usize) -> Vec<u16> {
    static HANDED: Mutex<Option<(u64, std::collections::BTreeSet<u16>)>> = Mutex::new(None);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()))
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low.max(10_001 + 4 * n as u16));
    let mut guard = HANDED.lock().unwrap_or_else(|e| e.into_inner());
    let (rng, handed) = guard.get_or_insert_with(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
        (t ^ (u64::from(std::process::id()) << 32) | 1, Default::default())
    });
    let mut out = Vec::new();
    for _ in 0..100_000 {
        if out.len() == n {
            return out;
        }
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        let port = low + (*rng % u64::from(high - low)) as u16;
        if !handed.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed.insert(port);
            out.push(port);
        }
    }
    panic!("no {n} free ports found in {low}..{high}");
}

/// The last `lines` lines of a file (reads at most the last 256 KiB).
fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(256 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    let shorten = |l: &str| match l.char_indices().nth(400) {
        Some((cut, _)) => format!("{} …", &l[..cut]),
        None => l.to_owned(),
    };
    all[all.len().saturating_sub(lines)..].iter().map(|l| shorten(l)).collect::<Vec<_>>().join("\n")
}

/// The command that starts a `cleave-node` with `args`, logging to `log`:
/// no inherited `CLEAVE_*` settings, and dying with the test process.
fn node_command(bin: &Path, args: &[String], log: std::fs::File) -> Command {
    let mut cmd = Command::new(bin);
    // The node reads CLEAVE_* settings from its environment: keep the
    // developer's shell out of the test.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("CLEAVE_") {
            cmd.env_remove(name);
        }
    }
    if let Some(filter) = node_log_filter() {
        cmd.env("RUST_LOG", filter);
    }
    cmd.args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone log handle"))
        .stderr(log);
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe libc calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Die with the test process, even if it is killed itself.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    cmd
}

/// A node process started outside a [`Cluster`] (e.g. one that joins it);
/// killed when dropped.
pub struct ExtraNode {
    child: Child,
    pub log_path: PathBuf,
}

impl ExtraNode {
    /// Starts `cleave-node` with `args`, logging to `log_path`.
    pub fn start(args: &[String], log_path: PathBuf) -> ExtraNode {
        let log = OpenOptions::new().create(true).append(true).open(&log_path).expect("open node log");
        let child = spawn_from_spawner_thread(node_command(&node_binary(), args, log)).expect("start cleave-node");
        ExtraNode { child, log_path }
    }

    /// Waits up to `timeout` for the process to exit on its own; its
    /// status, or `None` if it is still running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await; // polling the process, with a deadline
        }
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for ExtraNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Children are forked from one thread that lives as long as the test
/// process: `PR_SET_PDEATHSIG` fires when the *thread* that forked the child
/// exits, and test or runtime threads come and go.
fn spawn_from_spawner_thread(cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("cleave-node-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("start spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    tx.lock().unwrap_or_else(|e| e.into_inner()).send((cmd, reply_tx)).expect("spawner thread is gone");
    reply_rx.recv().expect("spawner thread is gone")
}
