//! Network partitions at the network level: one Linux network namespace per
//! node, packet filters inside them.
//!
//! Layout, for the runner with pid P (names carry P so parallel runs never
//! collide, and leftovers of a dead runner can be recognised and removed):
//!
//! ```text
//!  root namespace                 cleave-chaos-P-hub              cleave-chaos-P-nI
//!  chhP 10.X.Y.1/24  ──veth──  up0 ─┐                         ┌─ eth0 10.X.Y.(10+I)/24
//!                                    br0 (bridge) ── vI ──veth─┘
//! ```
//!
//! Each node runs in its own namespace (`ip netns exec`) and binds its own
//! address; all of them hang off a bridge that lives in a *hub* namespace of
//! ours, so node-to-node traffic never crosses the root namespace's firewall
//! (a host with Docker drops bridged traffic in its FORWARD chain) and
//! nothing outside the namespaces we create is touched, except one veth end
//! in the root namespace through which the runner's clients reach the nodes.
//!
//! A partition is a set of node pairs that must not talk. Each node's
//! namespace gets an nftables table (iptables as a fallback) dropping
//! packets from and to the addresses it is cut from — both directions, and
//! silently, so TCP connections hang as on a real network failure rather
//! than failing fast. The runner's own address is never blocked: clients
//! keep reaching every node, which is what makes requests to a minority
//! interesting. Healing empties the tables.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

/// Which firewall tool works inside the namespaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Filter {
    Nft,
    Iptables,
}

/// The namespaces, bridge and veths of one run. Dropping it removes them.
pub struct Network {
    pid: u32,
    nodes: usize,
    subnet: [u8; 3],
    filter: Filter,
    created: Vec<String>,
}

/// Runs a command; its stderr becomes the error message.
fn run(args: &[&str]) -> Result<String> {
    run_with_input(args, None)
}

fn run_with_input(args: &[&str], input: Option<&str>) -> Result<String> {
    let command = args.join(" ");
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Command { command: command.clone(), message: e.to_string() })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| Error::Command { command: command.clone(), message: e.to_string() })?;
    }
    let out =
        child.wait_with_output().map_err(|e| Error::Command { command: command.clone(), message: e.to_string() })?;
    if !out.status.success() {
        let message = format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        return Err(Error::Command { command, message });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The name prefix of every namespace of the runner with pid `pid`.
fn prefix(pid: u32) -> String {
    format!("cleave-chaos-{pid}-")
}

impl Network {
    /// Namespace of node `i` (1-based).
    pub fn netns(&self, i: usize) -> String {
        format!("{}n{i}", prefix(self.pid))
    }

    fn hub(&self) -> String {
        format!("{}hub", prefix(self.pid))
    }

    fn host_veth(&self) -> String {
        format!("chh{}", self.pid)
    }

    /// The address of node `i` (1-based).
    pub fn node_ip(&self, i: usize) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, 10 + i as u8)
    }

    /// The runner's own address on the bridge.
    pub fn host_ip(&self) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, 1)
    }

    /// Whether namespaces can be made here at all (root, `ip` present).
    pub fn probe() -> Result<()> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(Error::NoNamespaces("not running as root".into()));
        }
        run(&["ip", "netns", "list"]).map_err(|e| Error::NoNamespaces(e.to_string()))?;
        Ok(())
    }

    /// Removes namespaces left behind by runners that died without cleaning
    /// up (their pid is gone). Never touches a live runner's.
    pub fn remove_stale() {
        let Ok(list) = run(&["ip", "netns", "list"]) else { return };
        for line in list.lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            let Some(rest) = name.strip_prefix("cleave-chaos-") else { continue };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                tracing::info!("removing namespace {name} left by dead runner {pid}");
                let _ = run(&["ip", "netns", "del", name]);
            }
        }
    }

    /// A /24 for this run, derived from the pid, not overlapping any route of
    /// the root namespace.
    fn pick_subnet(pid: u32) -> Result<[u8; 3]> {
        let routes = run(&["ip", "-4", "route", "show", "table", "all"])?;
        let taken = |s: [u8; 3]| {
            let p = format!("{}.{}.{}.", s[0], s[1], s[2]);
            let p16 = format!("{}.{}.0.0/16", s[0], s[1]);
            routes.contains(&p) || routes.contains(&p16)
        };
        for k in 0..4096u32 {
            let x = pid.wrapping_add(k);
            let s = [10, 64 + ((x >> 8) % 128) as u8, (x & 0xff) as u8];
            if !taken(s) {
                return Ok(s);
            }
        }
        Err(Error::NoNamespaces("no free 10.x.y.0/24 subnet".into()))
    }

    /// Creates the hub, the bridge and one namespace per node (1..=nodes).
    pub fn create(nodes: usize) -> Result<Network> {
        Self::probe()?;
        Self::remove_stale();
        let pid = std::process::id();
        let mut net = Network { pid, nodes, subnet: Self::pick_subnet(pid)?, filter: Filter::Nft, created: Vec::new() };
        net.build().map_err(|e| Error::NoNamespaces(e.to_string()))?;
        net.filter = net.pick_filter()?;
        tracing::info!(
            "network: namespaces {}1..{nodes}, subnet {}/24, filter {:?}",
            prefix(pid),
            net.host_ip(),
            net.filter
        );
        Ok(net)
    }

    fn build(&mut self) -> Result<()> {
        let hub = self.hub();
        let host = self.host_veth();
        run(&["ip", "netns", "add", &hub])?;
        self.created.push(hub.clone());
        run(&["ip", "-n", &hub, "link", "set", "lo", "up"])?;
        run(&["ip", "-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &hub, "link", "set", "br0", "up"])?;
        run(&["ip", "link", "add", &host, "type", "veth", "peer", "name", "up0", "netns", &hub])?;
        run(&["ip", "-n", &hub, "link", "set", "up0", "master", "br0", "up"])?;
        run(&["ip", "addr", "add", &format!("{}/24", self.host_ip()), "dev", &host])?;
        run(&["ip", "link", "set", &host, "up"])?;
        for i in 1..=self.nodes {
            let ns = self.netns(i);
            let veth = format!("v{i}");
            run(&["ip", "netns", "add", &ns])?;
            self.created.push(ns.clone());
            run(&["ip", "-n", &hub, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            run(&["ip", "-n", &hub, "link", "set", &veth, "master", "br0", "up"])?;
            run(&["ip", "-n", &ns, "addr", "add", &format!("{}/24", self.node_ip(i)), "dev", "eth0"])?;
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    fn pick_filter(&self) -> Result<Filter> {
        let ns = self.netns(1);
        if run(&["ip", "netns", "exec", &ns, "nft", "list", "ruleset"]).is_ok() {
            return Ok(Filter::Nft);
        }
        match run(&["ip", "netns", "exec", &ns, "iptables", "-S"]) {
            Ok(_) => Ok(Filter::Iptables),
            Err(e) => Err(Error::NoNamespaces(format!("neither nft nor iptables works in a namespace: {e}"))),
        }
    }

    /// Blocks traffic between every pair in `cut` (node numbers, 1-based), in
    /// both directions, replacing any previous partition.
    pub fn partition(&self, cut: &BTreeSet<(usize, usize)>) -> Result<()> {
        for i in 1..=self.nodes {
            let peers: Vec<Ipv4Addr> = (1..=self.nodes)
                .filter(|&j| cut.contains(&(i, j)) || cut.contains(&(j, i)))
                .map(|j| self.node_ip(j))
                .collect();
            self.set_blocked(i, &peers)?;
        }
        Ok(())
    }

    /// Removes every partition.
    pub fn heal(&self) -> Result<()> {
        for i in 1..=self.nodes {
            self.set_blocked(i, &[])?;
        }
        Ok(())
    }

    fn set_blocked(&self, i: usize, peers: &[Ipv4Addr]) -> Result<()> {
        let ns = self.netns(i);
        match self.filter {
            Filter::Nft => {
                let mut script = String::from("flush ruleset\n");
                if !peers.is_empty() {
                    let set = peers.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
                    script.push_str(&format!(
                        "table inet cleave_chaos {{\n\
                         chain input {{ type filter hook input priority 0; policy accept; ip saddr {{ {set} }} drop; }}\n\
                         chain output {{ type filter hook output priority 0; policy accept; ip daddr {{ {set} }} drop; }}\n\
                         }}\n"
                    ));
                }
                run_with_input(&["ip", "netns", "exec", &ns, "nft", "-f", "-"], Some(&script))?;
            }
            Filter::Iptables => {
                run(&["ip", "netns", "exec", &ns, "iptables", "-F"])?;
                for p in peers {
                    let p = p.to_string();
                    run(&["ip", "netns", "exec", &ns, "iptables", "-A", "INPUT", "-s", &p, "-j", "DROP"])?;
                    run(&["ip", "netns", "exec", &ns, "iptables", "-A", "OUTPUT", "-d", &p, "-j", "DROP"])?;
                }
            }
        }
        Ok(())
    }

    /// Deletes every namespace (and with them the veths and the bridge).
    /// Idempotent. Processes inside must have been killed first.
    pub fn destroy(&mut self) {
        for ns in self.created.drain(..).rev() {
            if let Err(e) = run(&["ip", "netns", "del", &ns]) {
                eprintln!("cleave-chaos: could not delete namespace {ns}: {e}");
            }
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.destroy();
    }
}
