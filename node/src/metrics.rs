//! Prometheus metrics: per-shard request counts and latencies, Raft state of
//! every local replica, the size of the node's RocksDB, and where its
//! memory goes (the Rust heap, RocksDB's memtables, tables and cache).
//!
//! Counters and histograms are recorded where things happen through the
//! `metrics` macros; gauges are refreshed from Raft metrics on every
//! heartbeat tick and just before `/metrics` renders — only those of
//! groups whose Raft state changed since, so thousands of quiet groups
//! cost a look each, not nine gauge updates; RocksDB's own figures (which
//! walk its table files) every tenth refresh.

use std::time::Instant;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use std::sync::Arc;

use crate::raft::GroupRaft;
use crate::storage::Db;

/// Installs the global recorder; returns the handle `/metrics` renders.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let buckets = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0];
    Ok(PrometheusBuilder::new().set_buckets(&buckets)?.install_recorder()?)
}

/// Records one client request against `shard`.
pub fn record_request(shard: u64, op: &'static str, started: Instant, ok: bool) {
    let shard = shard.to_string();
    let outcome = if ok { "ok" } else { "error" };
    metrics::counter!("cleave_requests_total", "shard" => shard.clone(), "op" => op, "outcome" => outcome).increment(1);
    metrics::histogram!("cleave_request_duration_seconds", "shard" => shard, "op" => op)
        .record(started.elapsed().as_secs_f64());
}

/// Zeroes the gauges of a replica deleted from this node (the exporter keeps
/// a series once it exists; a stale `is_leader 1` would mislead).
pub fn forget_group(group: u64) {
    STAMPS.lock().unwrap().remove(&group);
    let group = group.to_string();
    for name in [
        "cleave_raft_is_leader",
        "cleave_raft_quiet",
        "cleave_raft_voter_sets",
        "cleave_raft_voters",
        "cleave_raft_leader_node",
    ] {
        metrics::gauge!(name, "group" => group.clone()).set(0.0);
    }
}

/// Refreshes the Raft gauges of `groups` (the replicas in service) and the
/// storage gauges of `db`.
pub fn update_gauges(groups: &[Arc<GroupRaft>], db: &Db) {
    let mut stamps = STAMPS.lock().unwrap();
    let mut quiet = 0;
    // A quiet replica's state does not move (a vote it grants while quiet
    // may, rarely): look at it again only every tenth refresh.
    let full = ROUND.fetch_add(1, std::sync::atomic::Ordering::Relaxed).is_multiple_of(10);
    for g in groups {
        let is_quiet = g.is_quiet();
        quiet += usize::from(is_quiet);
        if is_quiet && !full && stamps.get(&g.group).is_some_and(|(_, was_quiet)| *was_quiet) {
            continue;
        }
        let s = g.status();
        let m = g.membership();
        // Unchanged since the last refresh (every quiet group): nothing to set.
        let stamp = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (s.term, s.is_leader, s.leader.as_ref().map(|l| l.node_id), s.committed, s.applied, s.purged).hash(&mut h);
            (s.last_log_index, &m.configs, is_quiet).hash(&mut h);
            h.finish()
        };
        if stamps.insert(g.group, (stamp, is_quiet)).is_some_and(|(old, _)| old == stamp) {
            continue;
        }
        let group = g.group.to_string();
        metrics::gauge!("cleave_raft_term", "group" => group.clone()).set(s.term as f64);
        metrics::gauge!("cleave_raft_quiet", "group" => group.clone()).set(if is_quiet { 1.0 } else { 0.0 });
        metrics::gauge!("cleave_raft_is_leader", "group" => group.clone()).set(if s.is_leader { 1.0 } else { 0.0 });
        metrics::gauge!("cleave_raft_leader_node", "group" => group.clone())
            .set(s.leader.map_or(0.0, |l| l.node_id as f64));
        metrics::gauge!("cleave_raft_commit_index", "group" => group.clone()).set(s.committed.unwrap_or(0) as f64);
        metrics::gauge!("cleave_raft_applied_index", "group" => group.clone()).set(s.applied.unwrap_or(0) as f64);
        metrics::gauge!("cleave_raft_purged_index", "group" => group.clone()).set(s.purged.unwrap_or(0) as f64);
        metrics::gauge!("cleave_raft_last_log_index", "group" => group.clone())
            .set(s.last_log_index.unwrap_or(0) as f64);
        // 1 when uniform, 2 during a joint membership change.
        metrics::gauge!("cleave_raft_voter_sets", "group" => group.clone()).set(m.configs.len() as f64);
        metrics::gauge!("cleave_raft_voters", "group" => group).set(m.voters().len() as f64);
    }
    // RocksDB's figures walk every open table file: every tenth refresh
    // too (at 9,000 shards they were a tenth of an idle node's CPU).
    if full {
        metrics::gauge!("cleave_rocksdb_size_bytes").set(crate::storage::approximate_size(db) as f64);
        let rocks = crate::storage::memory_bytes(db);
        metrics::gauge!("cleave_rocksdb_memtable_bytes").set(rocks.memtables as f64);
        metrics::gauge!("cleave_rocksdb_table_readers_bytes").set(rocks.table_readers as f64);
        metrics::gauge!("cleave_rocksdb_block_cache_bytes").set(rocks.block_cache as f64);
    }
    let (allocated, resident) = heap();
    metrics::gauge!("cleave_heap_allocated_bytes").set(allocated as f64);
    metrics::gauge!("cleave_heap_resident_bytes").set(resident as f64);
    metrics::gauge!("cleave_groups").set(groups.len() as f64);
    metrics::gauge!("cleave_raft_groups_quiet").set(quiet as f64);
}

/// The Rust heap (jemalloc; RocksDB's C++ allocations are not in it): bytes
/// the program has allocated, and bytes of the heap resident in memory
/// (allocated plus what jemalloc keeps for reuse). Zeros if unreadable.
pub fn heap() -> (u64, u64) {
    use tikv_jemalloc_ctl::{epoch, stats};
    if epoch::advance().is_err() {
        return (0, 0);
    }
    (stats::allocated::read().unwrap_or(0) as u64, stats::resident::read().unwrap_or(0) as u64)
}

/// What the Raft gauges of each group were last set from (a hash), and
/// whether the replica was quiet then.
static STAMPS: std::sync::Mutex<std::collections::BTreeMap<u64, (u64, bool)>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());
/// Refreshes so far (every tenth looks at quiet groups too).
static ROUND: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
