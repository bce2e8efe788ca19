//! What a node keeps of itself across restarts: its settings, its identity
//! (`node.json`: id and seeds, written once) and its hints about the
//! cluster (`cluster.json`: the newest directory version seen and where the
//! metadata group was).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cleave_metadata::NodeId;
use serde::{Deserialize, Serialize};

/// What a node needs to know about itself to run.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    pub id: Option<NodeId>,
    pub data_dir: PathBuf,
    /// Addresses other nodes and clients use to reach this one.
    pub api_addr: String,
    pub raft_addr: String,
    /// `(id, raft address)` of every founding node, for a new cluster.
    pub initial_cluster: Vec<(NodeId, String)>,
    /// API address of a node of an existing cluster to join.
    pub join: Option<String>,
    pub replication: usize,
    pub max_value_bytes: usize,
    pub write_timeout: Duration,
    /// How often the node reports to the metadata leader.
    pub heartbeat: Duration,
    /// Most bytes per second a split's backfill copies (0: no limit).
    pub backfill_bytes_per_s: u64,
    /// How long a split's capture may make no progress before the split is
    /// abandoned (zero: never).
    pub split_stall: Duration,
    /// Splits whose new replicas all sit beside source replicas are filled
    /// there (`split::mirror`).
    pub split_mirror: bool,
    /// Change-log retention and watchers' queues (`watch`).
    pub watch: crate::watch::WatchSettings,
    /// The cluster's API is HTTPS: a join is sent over HTTPS, trusting
    /// this CA (`Some(None)`: the system's roots).
    pub join_https: Option<Option<PathBuf>>,
}

/// The persisted identity in `node.json`.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Identity {
    pub node_id: NodeId,
    /// Raft addresses to ask for the metadata leader when the directory is unknown.
    pub seeds: Vec<String>,
}

/// What a node remembers of the cluster across restarts, in `cluster.json`:
/// the newest directory version it has seen and where the metadata group
/// was then. A node that does not host the metadata group finds it again
/// from here after a restart, even once the founding nodes (its seeds) are
/// gone; and replica GC never trusts a directory older than that version.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterHints {
    /// The newest directory version seen: the one installed, or the one a
    /// replica-creating request said already lists the new replica.
    pub directory_version: u64,
    /// RPC addresses of the metadata group's replicas, newest known.
    pub meta_members: Vec<String>,
    /// RPC addresses of the other nodes not removed (any of them forwards
    /// to the metadata leader): a last resort.
    pub nodes: Vec<String>,
}

impl ClusterHints {
    pub(super) fn load(path: &std::path::Path) -> anyhow::Result<ClusterHints> {
        match std::fs::read(path) {
            Ok(b) => Ok(serde_json::from_slice(&b).with_context(|| format!("reading {}", path.display()))?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ClusterHints::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the hints durably: a temporary file, fsync'd, renamed over
    /// the old one, then the folder fsync'd.
    pub(super) fn save(&self, path: &std::path::Path) -> anyhow::Result<()> {
        use std::io::Write;
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}
