//! Node processes of a local cluster: start, `kill -9`, SIGSTOP/SIGCONT,
//! restart, and guaranteed cleanup.
//!
//! Every node is a real `cleave-node` process started with the same flags
//! as `scripts/cluster.sh` (`--id`, `--data-dir`, `--listen-api`,
//! `--listen-raft`, `--initial-cluster`). With a [`Network`] each runs in its
//! own namespace (through `ip netns exec`, which execs the node in place, so
//! the child's pid is the node's) on its own address; without one, all of
//! them run on 127.0.0.1 with free ports.
//!
//! Cleanup is not optional: [`LocalCluster`]'s `Drop` kills every node it
//! started (by pid, never by name) and then removes the namespaces, and each
//! node also gets `PR_SET_PDEATHSIG` so that it dies with the runner even if
//! the runner is killed with SIGKILL. The death signal belongs to the
//! *thread* that forked the child, so nodes must be started from a thread
//! that lives as long as the process: the binary runs everything on the
//! main thread (a current-thread runtime), and a start from any other
//! thread is logged as a warning.
//!
//! The binary is copied into the run directory first: a rebuild during a
//! long run must not change the code that restarted nodes run.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::error::{Error, Result};
use crate::netns::Network;

/// One node's addresses and files.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub id: u64,
    /// `HOST:PORT` of the HTTP API.
    pub api: String,
    /// `HOST:PORT` of the internal RPC.
    pub raft: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// The namespace it runs in, if any.
    pub netns: Option<String>,
}

struct Proc {
    spec: NodeSpec,
    child: Option<Child>,
    paused: bool,
    starts: u32,
}

/// How to start a local cluster.
#[derive(Clone, Debug)]
pub struct LocalOpts {
    pub nodes: usize,
    /// The `cleave-node` binary to copy and run.
    pub bin: PathBuf,
    /// The run directory (data dirs, logs).
    pub dir: PathBuf,
    /// Run every node in its own network namespace (needed for partitions).
    pub netns: bool,
    /// More arguments for every node.
    pub node_args: Vec<String>,
    /// `RUST_LOG` for the nodes.
    pub node_log: Option<String>,
}

/// The processes (and network) of a local cluster.
pub struct LocalCluster {
    procs: Vec<Proc>,
    bin: PathBuf,
    initial_cluster: String,
    node_args: Vec<String>,
    node_log: Option<String>,
    network: Option<Network>,
}

/// `n` distinct free ports on 127.0.0.1.
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| Error::Config(format!("no free ports: {e}")))?;
    listeners.iter().map(|l| Ok(l.local_addr().map_err(|e| Error::Config(e.to_string()))?.port())).collect()
}

impl LocalCluster {
    /// Creates the network (if asked) and starts every node. Does not wait
    /// for them to serve.
    pub fn start(opts: &LocalOpts) -> Result<LocalCluster> {
        std::fs::create_dir_all(&opts.dir).map_err(|e| Error::io(&opts.dir, e))?;
        let bin = opts.dir.join("cleave-node");
        std::fs::copy(&opts.bin, &bin).map_err(|e| Error::io(&opts.bin, e))?;
        let network = if opts.netns { Some(Network::create(opts.nodes)?) } else { None };
        let ports = if network.is_some() { Vec::new() } else { free_ports(2 * opts.nodes)? };
        let specs: Vec<NodeSpec> = (1..=opts.nodes)
            .map(|i| {
                let (api, raft, netns) = match &network {
                    Some(net) => {
                        (format!("{}:7001", net.node_ip(i)), format!("{}:7101", net.node_ip(i)), Some(net.netns(i)))
                    }
                    None => {
                        (format!("127.0.0.1:{}", ports[2 * i - 2]), format!("127.0.0.1:{}", ports[2 * i - 1]), None)
                    }
                };
                NodeSpec {
                    id: i as u64,
                    api,
                    raft,
                    data_dir: opts.dir.join(format!("node{i}")),
                    log: opts.dir.join(format!("node{i}.log")),
                    netns,
                }
            })
            .collect();
        let initial_cluster = specs.iter().map(|s| format!("{}={}", s.id, s.raft)).collect::<Vec<_>>().join(",");
        let mut cluster = LocalCluster {
            procs: specs.into_iter().map(|spec| Proc { spec, child: None, paused: false, starts: 0 }).collect(),
            bin,
            initial_cluster,
            node_args: opts.node_args.clone(),
            node_log: opts.node_log.clone(),
            network,
        };
        for id in cluster.ids() {
            cluster.spawn(id)?;
        }
        Ok(cluster)
    }

    pub fn ids(&self) -> Vec<u64> {
        self.procs.iter().map(|p| p.spec.id).collect()
    }

    pub fn spec(&self, id: u64) -> &NodeSpec {
        &self.procs[id as usize - 1].spec
    }

    /// `http://HOST:PORT` of every node's API, by id order.
    pub fn apis(&self) -> Vec<String> {
        self.procs.iter().map(|p| format!("http://{}", p.spec.api)).collect()
    }

    pub fn has_network(&self) -> bool {
        self.network.is_some()
    }

    fn proc(&mut self, id: u64) -> Result<&mut Proc> {
        self.procs
            .get_mut((id as usize).wrapping_sub(1))
            .ok_or(Error::Node { node: id, message: "no such node".into() })
    }

    fn spawn(&mut self, id: u64) -> Result<()> {
        let (bin, initial, extra, log_filter) =
            (self.bin.clone(), self.initial_cluster.clone(), self.node_args.clone(), self.node_log.clone());
        let p = self.proc(id)?;
        std::fs::create_dir_all(&p.spec.data_dir).map_err(|e| Error::io(&p.spec.data_dir, e))?;
        p.starts += 1;
        let mut args: Vec<String> = vec![
            "--id".into(),
            id.to_string(),
            "--data-dir".into(),
            p.spec.data_dir.display().to_string(),
            "--listen-api".into(),
            p.spec.api.clone(),
            "--listen-raft".into(),
            p.spec.raft.clone(),
            "--initial-cluster".into(),
            initial,
        ];
        args.extend(extra);
        let mut log =
            OpenOptions::new().create(true).append(true).open(&p.spec.log).map_err(|e| Error::io(&p.spec.log, e))?;
        let _ = writeln!(
            log,
            "\n===== cleave-chaos: start #{} of node {id}: {} {}",
            p.starts,
            bin.display(),
            args.join(" ")
        );
        let mut cmd = match &p.spec.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        // The node reads CLEAVE_* settings from its environment: keep the
        // caller's out.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("CLEAVE_") {
                cmd.env_remove(name);
            }
        }
        match &log_filter {
            Some(f) => cmd.env("RUST_LOG", f),
            None => cmd.env_remove("RUST_LOG"),
        };
        let log2 = log.try_clone().map_err(|e| Error::io(&p.spec.log, e))?;
        cmd.args(&args).env("NO_COLOR", "1").stdin(Stdio::null()).stdout(log2).stderr(log);
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
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
        if std::thread::current().name() != Some("main") {
            tracing::warn!(
                "node {id} started off the main thread: it will not die with the runner if that thread ends"
            );
        }
        let child = cmd.spawn().map_err(|e| Error::Node { node: id, message: format!("cannot start: {e}") })?;
        tracing::debug!("node {id} started, pid {}", child.id());
        p.child = Some(child);
        p.paused = false;
        Ok(())
    }

    fn signal(p: &Proc, sig: libc::c_int) -> Result<()> {
        let Some(child) = &p.child else { return Ok(()) };
        // SAFETY: kill(2) on the pid of a child we have not reaped.
        if unsafe { libc::kill(child.id() as libc::pid_t, sig) } != 0 {
            return Err(Error::Node {
                node: p.spec.id,
                message: format!("signal {sig}: {}", std::io::Error::last_os_error()),
            });
        }
        Ok(())
    }

    /// Whether node `id` is running (not killed by us), paused or not.
    pub fn is_running(&self, id: u64) -> bool {
        self.procs.get(id as usize - 1).is_some_and(|p| p.child.is_some())
    }

    pub fn is_paused(&self, id: u64) -> bool {
        self.procs.get(id as usize - 1).is_some_and(|p| p.paused)
    }

    /// `kill -9` and reap. No-op if it is not running.
    pub fn kill(&mut self, id: u64) -> Result<()> {
        let p = self.proc(id)?;
        if let Some(mut child) = p.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        p.paused = false;
        Ok(())
    }

    /// Starts a killed node again from its data dir.
    pub fn restart(&mut self, id: u64) -> Result<()> {
        if self.proc(id)?.child.is_some() {
            return Ok(());
        }
        self.spawn(id)
    }

    /// SIGSTOP.
    pub fn pause(&mut self, id: u64) -> Result<()> {
        let p = self.proc(id)?;
        if p.child.is_some() && !p.paused {
            Self::signal(p, libc::SIGSTOP)?;
            p.paused = true;
        }
        Ok(())
    }

    /// SIGCONT.
    pub fn resume(&mut self, id: u64) -> Result<()> {
        let p = self.proc(id)?;
        if p.paused {
            Self::signal(p, libc::SIGCONT)?;
            p.paused = false;
        }
        Ok(())
    }

    /// Cuts the given node pairs apart (see [`Network::partition`]).
    pub fn partition(&self, cut: &BTreeSet<(usize, usize)>) -> Result<()> {
        match &self.network {
            Some(net) => net.partition(cut),
            None => Err(Error::NoNamespaces("the cluster was started without namespaces".into())),
        }
    }

    /// Resumes paused nodes, removes partitions, restarts killed nodes.
    pub fn heal(&mut self) -> Result<()> {
        for id in self.ids() {
            self.resume(id)?;
        }
        if let Some(net) = &self.network {
            net.heal()?;
        }
        for id in self.ids() {
            self.restart(id)?;
        }
        Ok(())
    }

    /// Nodes that exited without being killed by us: `(id, status, log tail)`.
    /// They are reaped, so a heal restarts them.
    pub fn reap_crashed(&mut self) -> Vec<(u64, String, String)> {
        let mut out = Vec::new();
        for p in &mut self.procs {
            let status = match p.child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(status))) => status.to_string(),
                _ => continue,
            };
            p.child = None;
            p.paused = false;
            out.push((p.spec.id, status, tail(&p.spec.log, 30)));
        }
        out
    }

    /// Kills every node and removes the network. Idempotent.
    pub fn teardown(&mut self) {
        for p in &mut self.procs {
            if let Some(child) = p.child.as_mut() {
                let _ = child.kill();
            }
        }
        for p in &mut self.procs {
            if let Some(mut child) = p.child.take() {
                let _ = child.wait();
            }
        }
        if let Some(mut net) = self.network.take() {
            net.destroy();
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// The last `lines` lines of a file (at most its last 64 KiB).
pub fn tail(path: &Path, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
