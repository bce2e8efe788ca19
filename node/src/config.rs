//! Configuration: command-line flags, `CLEAVE_*` environment variables and
//! an optional TOML file, in that order of precedence.
//!
//! One struct, [`Args`], is both the clap parser and the shape of the TOML
//! file (same names, with `_` for `-`). Every field is optional so the three
//! sources can be merged; defaults are applied last in [`Args::resolve`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use cleave_metadata::NodeId;
use serde::{Deserialize, Serialize};

use crate::node::NodeSettings;
use crate::raft::RaftSettings;

/// A CleaveDB node: range-sharded, Raft-replicated key-value storage.
///
/// Start node N of a new cluster with `--id N --initial-cluster ...`; run the
/// same command again to restart it from its data directory. Add a node to a
/// running cluster with `--join` instead of `--initial-cluster`.
#[derive(Parser, Serialize, Deserialize, Debug, Default)]
#[command(name = "cleave-node", version, about, long_about)]
#[serde(deny_unknown_fields)]
pub struct Args {
    /// TOML file with any of these settings (flags and env vars override it).
    #[arg(long, env = "CLEAVE_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// This node's id (a positive integer, unique in the cluster). Optional with --join.
    #[arg(long, env = "CLEAVE_ID")]
    pub id: Option<NodeId>,
    /// Directory for this node's data (created if missing).
    #[arg(long, env = "CLEAVE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address the HTTP API listens on [default: 127.0.0.1:7001].
    #[arg(long, env = "CLEAVE_LISTEN_API")]
    pub listen_api: Option<String>,
    /// Address the internal RPC (Raft) port listens on [default: 127.0.0.1:7101].
    #[arg(long, env = "CLEAVE_LISTEN_RAFT")]
    pub listen_raft: Option<String>,
    /// API address announced to clients [default: --listen-api].
    #[arg(long, env = "CLEAVE_ADVERTISE_API")]
    pub advertise_api: Option<String>,
    /// RPC address announced to other nodes [default: --listen-raft].
    #[arg(long, env = "CLEAVE_ADVERTISE_RAFT")]
    pub advertise_raft: Option<String>,
    /// Founding nodes of a new cluster: `1=HOST:PORT,2=HOST:PORT,...` (their RPC addresses).
    #[arg(long, env = "CLEAVE_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,
    /// API address (HOST:PORT) of any node of a running cluster to join.
    #[arg(long, env = "CLEAVE_JOIN", conflicts_with = "initial_cluster")]
    pub join: Option<String>,
    /// Replicas per shard and of the metadata group [default: 3].
    #[arg(long, env = "CLEAVE_REPLICATION")]
    pub replication: Option<usize>,
    /// Raft heartbeat interval of awake groups, in milliseconds [default: 100] (quiet groups send none).
    #[arg(long, env = "CLEAVE_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// Minimum Raft election timeout in milliseconds (the maximum, twice it, is also the leader lease)
    /// [default: 500].
    #[arg(long, env = "CLEAVE_ELECTION_TIMEOUT_MS")]
    pub election_timeout_ms: Option<u64>,
    /// Build a Raft snapshot after this many log entries [default: 10000].
    #[arg(long, env = "CLEAVE_SNAPSHOT_LOGS")]
    pub snapshot_logs: Option<u64>,
    /// Log entries kept behind a snapshot for lagging followers [default: twice --snapshot-logs: a
    /// learner installs a snapshot while the leader builds the next, then catches up from the log
    /// the leader kept instead of being sent the whole shard again].
    #[arg(long, env = "CLEAVE_KEEP_LOGS")]
    pub keep_logs: Option<u64>,
    /// A quiet replica idle this long drops its Raft instance to save memory; the next use reopens
    /// it (0: never) [default: 15000].
    #[arg(long, env = "CLEAVE_DORMANT_AFTER_MS")]
    pub dormant_after_ms: Option<u64>,
    /// Largest value accepted, in bytes of JSON text [default: 1048576].
    #[arg(long, env = "CLEAVE_MAX_VALUE_BYTES")]
    pub max_value_bytes: Option<usize>,
    /// How long a request may wait for its write or read, in milliseconds [default: 10000].
    #[arg(long, env = "CLEAVE_REQUEST_TIMEOUT_MS")]
    pub request_timeout_ms: Option<u64>,
    /// Split a range automatically once its shard holds more than this many bytes [default: 67108864].
    #[arg(long, env = "CLEAVE_SPLIT_SIZE")]
    pub split_size: Option<u64>,
    /// Split a range automatically when it serves more than this many requests per second... [default: 2500]
    #[arg(long, env = "CLEAVE_SPLIT_QPS")]
    pub split_qps: Option<f64>,
    /// ...for this many seconds in a row [default: 10].
    #[arg(long, env = "CLEAVE_SPLIT_QPS_WINDOW")]
    pub split_qps_window: Option<u64>,
    /// No automatic split of a range a split created less than this many seconds ago [default: 60].
    #[arg(long, env = "CLEAVE_SPLIT_COOLDOWN")]
    pub split_cooldown: Option<u64>,
    /// Most splits running at once [default: 2].
    #[arg(long, env = "CLEAVE_MAX_SPLITS")]
    pub max_splits: Option<usize>,
    /// Merge two neighbouring ranges automatically once their shards hold fewer than this many
    /// bytes together (0: never merge) [default: 16777216].
    #[arg(long, env = "CLEAVE_MERGE_SIZE")]
    pub merge_size: Option<u64>,
    /// ...and serve fewer than this many requests per second together [default: a tenth of
    /// --split-qps].
    #[arg(long, env = "CLEAVE_MERGE_QPS")]
    pub merge_qps: Option<f64>,
    /// No automatic merge of a range a split created less than this many seconds ago [default: 300].
    #[arg(long, env = "CLEAVE_MERGE_COOLDOWN")]
    pub merge_cooldown: Option<u64>,
    /// Most merges running at once [default: 1].
    #[arg(long, env = "CLEAVE_MAX_MERGES")]
    pub max_merges: Option<usize>,
    /// Most a split's backfill copies per second, in MiB (0: no limit) [default: 128]. The copy
    /// shares the node with client traffic; this keeps its share bounded.
    #[arg(long, env = "CLEAVE_SPLIT_BACKFILL_RATE")]
    pub split_backfill_rate: Option<u64>,
    /// Fill a split's new shard on each node from the source replica beside it (no copy over
    /// the network, no forward log) when every new replica sits on a node that holds a source
    /// replica; false: always ship the backfill and forward the writes [default: true].
    #[arg(long, env = "CLEAVE_SPLIT_MIRROR")]
    pub split_mirror: Option<bool>,
    /// Keep each shard's change log (what a watch resumes from) for at least this many
    /// seconds [default: 600].
    #[arg(long, env = "CLEAVE_WATCH_RETENTION")]
    pub watch_retention: Option<u64>,
    /// Keep at most this many MiB of change log per shard (the oldest go first) [default: 256].
    #[arg(long, env = "CLEAVE_WATCH_RETENTION_MB")]
    pub watch_retention_mb: Option<u64>,
    /// Queue at most this many MiB of events for a watcher; one that takes none for 5 s while full is cut off [default: 8].
    #[arg(long, env = "CLEAVE_WATCH_QUEUE_MB")]
    pub watch_queue_mb: Option<u64>,
    /// Abandon a split whose capture (backfill, forwarding) makes no progress for this many
    /// milliseconds (0: never) [default: 60000].
    #[arg(long, env = "CLEAVE_SPLIT_STALL_TIMEOUT_MS")]
    pub split_stall_timeout_ms: Option<u64>,
    /// Replace the replicas of a node silent for this many seconds [default: 300].
    #[arg(long, env = "CLEAVE_NODE_DEAD_AFTER")]
    pub node_dead_after: Option<u64>,
    /// Most replica moves running at once [default: 2].
    #[arg(long, env = "CLEAVE_MAX_MOVES")]
    pub max_moves: Option<usize>,
    /// Even out replica and leader counts across nodes (true/false) [default: true].
    /// Healing and decommissioning run regardless.
    #[arg(long, env = "CLEAVE_BALANCE")]
    pub balance: Option<bool>,
    /// How often this node reports to the metadata leader (and refreshes its
    /// directory), in milliseconds [default: 1000].
    #[arg(long, env = "CLEAVE_NODE_HEARTBEAT_MS")]
    pub node_heartbeat_ms: Option<u64>,
    /// Bearer tokens and their roles (TOML, `[[token]]` tables of name, secret, role =
    /// read|write|admin): with it, every HTTP request but `GET /health` needs
    /// `Authorization: Bearer <secret>`. Re-read on SIGHUP.
    #[arg(long, env = "CLEAVE_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// File holding the cluster secret (at least 16 bytes, not readable by other users): every RPC
    /// connection between nodes proves both ends hold it, and so does a node joining.
    #[arg(long, env = "CLEAVE_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// This node's certificate (PEM, chain first): with --tls-key, the API is served over HTTPS
    /// only. Re-read on SIGHUP.
    #[arg(long, env = "CLEAVE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "CLEAVE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate (PEM) that signed every node's --tls-cert: the RPC port becomes mutual TLS
    /// (each node presents its certificate and accepts only peers the CA signed).
    #[arg(long, env = "CLEAVE_TLS_CA", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Test fault point: hold operations in phases, e.g. `capturing=2000,frozen=500` (milliseconds);
    /// `enter_joint=MS` holds a move in `Joint` before its joint configuration is entered.
    #[arg(long, env = "CLEAVE_FAULT_HOLD", hide = true)]
    pub fault_hold: Option<String>,
    /// Test fault point: serve `POST /admin/fault/isolate-meta`, which cuts
    /// this node's metadata-group Raft traffic (tests of a metadata leader
    /// without its quorum).
    #[arg(long, env = "CLEAVE_FAULT_API", hide = true)]
    pub fault_api: Option<bool>,
    /// Test fault point: damage one byte of every split backfill chunk this node sends (tests of
    /// the receivers' checksum).
    #[arg(long, env = "CLEAVE_FAULT_CORRUPT_BACKFILL", hide = true)]
    pub fault_corrupt_backfill: Option<bool>,
}

/// Everything the node needs, resolved.
pub struct Resolved {
    pub node: NodeSettings,
    pub raft: RaftSettings,
    pub listen_api: String,
    pub listen_raft: String,
    pub split: crate::balance::auto_split::SplitPolicy,
    pub merge: crate::balance::auto_merge::MergePolicy,
    pub balance: crate::balance::replicas::BalancePolicy,
    pub fault_hold: Option<String>,
    pub fault_api: bool,
    pub fault_corrupt_backfill: bool,
    pub tokens_file: Option<PathBuf>,
    pub cluster_secret_file: Option<PathBuf>,
    pub tls: Option<crate::security::tls::TlsFiles>,
}

/// Parses `1=host:port,2=host:port`.
pub fn parse_initial_cluster(s: &str) -> anyhow::Result<Vec<(NodeId, String)>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part.split_once('=').with_context(|| format!("{part:?} is not ID=HOST:PORT"))?;
        let id: NodeId = id.trim().parse().with_context(|| format!("node id {id:?} is not a positive integer"))?;
        if id == 0 {
            bail!("node ids start at 1");
        }
        if out.iter().any(|(n, _)| *n == id) {
            bail!("node {id} appears twice in --initial-cluster");
        }
        out.push((id, addr.trim().to_string()));
    }
    if out.is_empty() {
        bail!("--initial-cluster is empty");
    }
    Ok(out)
}

impl Args {
    /// Merges the TOML file (if any) under the flags and environment.
    pub fn merged(self) -> anyhow::Result<Args> {
        let Some(path) = self.config.clone() else { return Ok(self) };
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let file: Args = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let mut base = serde_json::to_value(file)?;
        let over = serde_json::to_value(&self)?;
        if let (Some(b), Some(o)) = (base.as_object_mut(), over.as_object()) {
            for (k, v) in o {
                if !v.is_null() {
                    b.insert(k.clone(), v.clone());
                }
            }
        }
        Ok(serde_json::from_value(base)?)
    }

    /// Applies defaults and checks the combination.
    pub fn resolve(self) -> anyhow::Result<Resolved> {
        let Some(data_dir) = self.data_dir else { bail!("--data-dir is required") };
        if self.id == Some(0) {
            bail!("node ids start at 1");
        }
        let listen_api = self.listen_api.unwrap_or_else(|| "127.0.0.1:7001".into());
        let listen_raft = self.listen_raft.unwrap_or_else(|| "127.0.0.1:7101".into());
        let advertise = |adv: Option<String>, listen: &str, flag: &str| -> anyhow::Result<String> {
            let a = adv.unwrap_or_else(|| listen.to_string());
            if a.starts_with("0.0.0.0:") || a.starts_with("[::]:") {
                bail!("listening on {a}: set --advertise-{flag} to an address other nodes can reach");
            }
            Ok(a)
        };
        let api_addr = advertise(self.advertise_api, &listen_api, "api")?;
        let raft_addr = advertise(self.advertise_raft, &listen_raft, "raft")?;
        let initial_cluster = match &self.initial_cluster {
            Some(s) => parse_initial_cluster(s)?,
            None => Vec::new(),
        };
        let election_timeout_ms = self.election_timeout_ms.unwrap_or(500);
        let heartbeat_ms = self.heartbeat_ms.unwrap_or(100);
        let snapshot_logs = self.snapshot_logs.unwrap_or(10_000).max(1);
        if heartbeat_ms == 0 || heartbeat_ms >= election_timeout_ms {
            bail!("--heartbeat-ms must be positive and below --election-timeout-ms");
        }
        // (Also checked by clap, but not for settings from the TOML file.)
        let tls = match (self.tls_cert, self.tls_key, self.tls_ca) {
            (Some(cert), Some(key), ca) => Some(crate::security::tls::TlsFiles { cert, key, ca }),
            (None, None, None) => None,
            _ => bail!("--tls-cert and --tls-key go together, and --tls-ca needs both"),
        };
        Ok(Resolved {
            node: NodeSettings {
                id: self.id,
                data_dir,
                api_addr,
                raft_addr,
                initial_cluster,
                join: self.join,
                replication: self.replication.unwrap_or(3).max(1),
                max_value_bytes: self.max_value_bytes.unwrap_or(cleave_metadata::DEFAULT_MAX_VALUE_BYTES),
                write_timeout: Duration::from_millis(self.request_timeout_ms.unwrap_or(10_000)),
                heartbeat: Duration::from_millis(self.node_heartbeat_ms.unwrap_or(1000).max(10)),
                backfill_bytes_per_s: self.split_backfill_rate.unwrap_or(128).saturating_mul(1 << 20),
                split_stall: Duration::from_millis(self.split_stall_timeout_ms.unwrap_or(60_000)),
                split_mirror: self.split_mirror.unwrap_or(true),
                watch: crate::watch::WatchSettings {
                    retention: Duration::from_secs(self.watch_retention.unwrap_or(600)),
                    retention_bytes: self.watch_retention_mb.unwrap_or(256).saturating_mul(1 << 20),
                    queue_bytes: self.watch_queue_mb.unwrap_or(8).max(1).saturating_mul(1 << 20) as usize,
                },
                join_https: tls.as_ref().map(|t| t.ca.clone()),
            },
            raft: RaftSettings {
                heartbeat_ms,
                election_timeout_ms,
                snapshot_logs,
                keep_logs: self.keep_logs.unwrap_or(2 * snapshot_logs),
                dormant_after_ms: self.dormant_after_ms.unwrap_or(crate::raft::instance::DORMANT_AFTER_MS),
            },
            listen_api,
            listen_raft,
            split: crate::balance::auto_split::SplitPolicy {
                split_size: self.split_size.unwrap_or(64 << 20),
                split_qps: self.split_qps.unwrap_or(2500.0),
                split_qps_window: Duration::from_secs(self.split_qps_window.unwrap_or(10)),
                cooldown: Duration::from_secs(self.split_cooldown.unwrap_or(60)),
                max_splits: self.max_splits.unwrap_or(2),
            },
            merge: crate::balance::auto_merge::MergePolicy {
                merge_size: self.merge_size.unwrap_or(16 << 20),
                merge_qps: self.merge_qps.unwrap_or(self.split_qps.unwrap_or(2500.0) / 10.0),
                cooldown: Duration::from_secs(self.merge_cooldown.unwrap_or(300)),
                max_merges: self.max_merges.unwrap_or(1),
            },
            balance: crate::balance::replicas::BalancePolicy {
                node_dead_after: Duration::from_secs(self.node_dead_after.unwrap_or(300)),
                max_moves: self.max_moves.unwrap_or(2),
                balance: self.balance.unwrap_or(true),
                slack: 1,
            },
            fault_hold: self.fault_hold,
            fault_api: self.fault_api.unwrap_or(false),
            fault_corrupt_backfill: self.fault_corrupt_backfill.unwrap_or(false),
            tokens_file: self.tokens_file,
            cluster_secret_file: self.cluster_secret_file,
            tls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_cluster_parsing() {
        assert_eq!(parse_initial_cluster("1=a:1, 2=b:2").unwrap(), vec![(1, "a:1".into()), (2, "b:2".into())]);
        assert!(parse_initial_cluster("1=a:1,1=b:2").is_err());
        assert!(parse_initial_cluster("0=a:1").is_err());
        assert!(parse_initial_cluster("x=a:1").is_err());
        assert!(parse_initial_cluster("").is_err());
    }

    #[test]
    fn file_settings_sit_under_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "id = 2\ndata_dir = \"/d\"\nheartbeat_ms = 100\n").unwrap();
        let args = Args { config: Some(path), id: Some(3), ..Default::default() }.merged().unwrap();
        assert_eq!(args.id, Some(3));
        assert_eq!(args.heartbeat_ms, Some(100));
        assert_eq!(args.data_dir, Some(PathBuf::from("/d")));
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "idd = 2\n").unwrap();
        assert!(Args { config: Some(bad), ..Default::default() }.merged().is_err());
    }
}
