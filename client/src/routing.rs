//! The routing table: which node should receive a request for a key.
//!
//! Every node accepts every request and forwards it to the right shard
//! leader, so routing is only an optimisation: a request sent to the wrong
//! node is still answered correctly, one internal hop later. The table is
//! therefore a *cache of hints* and never needs to be exactly right; it only
//! needs to converge:
//!
//! ```text
//! key ──Directory::lookup──▶ range ──shard_id──▶ shard ──leader hint──▶ node ──▶ api_addr
//! ```
//!
//! - The [`Directory`] comes from `GET /admin/directory`. A copy is replaced
//!   only by a strictly newer one (`version` grows with every metadata change
//!   and is the same on every node), so a lagging node cannot roll it back.
//! - Leader hints come from `GET /admin/shards`, one per shard, and are
//!   dropped when a node fails or answers "unavailable".
//! - Nodes that just failed to answer are *suspects* for a few seconds:
//!   still candidates, but tried last. This matters right after a leader
//!   dies, when the surviving nodes still report it as leader for a while.
//! - A 421 (stale route) answer carries the current descriptors of the
//!   key's ranges; [`RoutingTable::apply_stale_route`] patches them in right
//!   away, trimming the cached ranges they overlap, so the retry goes to the
//!   new owner before the next directory refresh.
//!
//! The table never does I/O and never looks at a clock unless given one,
//! which is what lets it be tested on its own; the client in
//! [`crate::client`] owns the HTTP side.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cleave_metadata::api::ShardStatus;
use cleave_metadata::{Directory, NodeId, NodeState, RangeDescriptor, RangeId, ShardId};

use crate::endpoint::base_url_with;

/// Where a key lives according to the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub range_id: RangeId,
    pub shard_id: ShardId,
    pub epoch: u64,
    /// The shard's leader, if a hint is cached.
    pub leader: Option<NodeId>,
}

/// The client's cache of the directory and of shard leaders.
#[derive(Debug, Clone, Default)]
pub struct RoutingTable {
    /// Base URLs the user gave; always tried after the known nodes.
    seeds: Vec<String>,
    directory: Option<Directory>,
    leaders: HashMap<ShardId, NodeId>,
    /// When the cache was last refreshed, or a refresh last attempted.
    refreshed_at: Option<Instant>,
    /// Base URLs that recently failed, and until when they are tried last.
    suspects: HashMap<String, Instant>,
}

impl RoutingTable {
    /// An empty table that knows only the seed addresses (already normalised
    /// with [`crate::endpoint::base_url`]).
    pub fn new(seeds: Vec<String>) -> RoutingTable {
        RoutingTable { seeds, ..Default::default() }
    }

    /// The seed base URLs.
    pub fn seeds(&self) -> &[String] {
        &self.seeds
    }

    /// Whether the cluster's API is HTTPS (as its seeds are): the nodes
    /// the directory names are reached the same way.
    pub fn https(&self) -> bool {
        self.seeds.first().is_some_and(|s| s.starts_with("https://"))
    }

    /// The cached directory, if one was ever installed.
    pub fn directory(&self) -> Option<&Directory> {
        self.directory.as_ref()
    }

    /// Whether a directory has been installed.
    /// Version of the cached directory (0 when none is cached).
    pub fn directory_version(&self) -> u64 {
        self.directory.as_ref().map_or(0, |d| d.version)
    }

    pub fn has_directory(&self) -> bool {
        self.directory.is_some()
    }

    /// Whether the cache is older than `ttl` at `now` (or was never filled).
    pub fn is_stale(&self, now: Instant, ttl: Duration) -> bool {
        self.refreshed_at.is_none_or(|t| now.saturating_duration_since(t) >= ttl)
    }

    /// Installs `dir` if it is newer than the cached one (or none is cached).
    /// Returns whether it was installed. Either way the cache counts as
    /// refreshed at `now`: an equal version confirms what we hold.
    pub fn install_directory(&mut self, dir: Directory, now: Instant) -> bool {
        self.refreshed_at = Some(now);
        if self.directory.as_ref().is_some_and(|d| dir.version <= d.version) {
            return false;
        }
        self.leaders.retain(|shard, _| dir.shards.contains_key(shard));
        self.directory = Some(dir);
        true
    }

    /// Records a refresh attempt that reached no node, so that a cluster
    /// that is down is not asked again on every request.
    pub fn note_refresh_attempt(&mut self, now: Instant) {
        self.refreshed_at = Some(now);
    }

    /// Replaces the leader hints with what `GET /admin/shards` reported.
    pub fn install_leaders(&mut self, shards: &[ShardStatus]) {
        self.leaders = shards.iter().filter_map(|s| s.leader.map(|l| (s.shard_id, l))).collect();
    }

    /// The leader hint for `shard`.
    pub fn leader(&self, shard: ShardId) -> Option<NodeId> {
        self.leaders.get(&shard).copied()
    }

    /// Records that `node` leads `shard`.
    pub fn set_leader(&mut self, shard: ShardId, node: NodeId) {
        self.leaders.insert(shard, node);
    }

    /// Drops the leader hint for `shard` (it answered "unavailable").
    pub fn forget_leader(&mut self, shard: ShardId) {
        self.leaders.remove(&shard);
    }

    /// Drops every leader hint pointing at the node reachable at `addr`
    /// (a base URL): it could not be reached.
    pub fn forget_node(&mut self, addr: &str) {
        let Some(node) = self.node_at(addr) else { return };
        self.leaders.retain(|_, n| *n != node);
    }

    /// Demotes `addr` (a base URL) to the end of every candidate list until
    /// `until`: it did not answer.
    pub fn mark_suspect(&mut self, addr: &str, until: Instant) {
        self.suspects.insert(addr.to_owned(), until);
    }

    /// `addr` answered: it is no longer suspect.
    pub fn clear_suspect(&mut self, addr: &str) {
        self.suspects.remove(addr);
    }

    /// Whether any address is demoted.
    pub fn has_suspects(&self) -> bool {
        !self.suspects.is_empty()
    }

    /// Whether `addr` is currently demoted.
    pub fn is_suspect(&self, addr: &str) -> bool {
        self.suspects.contains_key(addr)
    }

    /// Forgets the suspicions that ended before `now`.
    pub fn expire_suspects(&mut self, now: Instant) {
        self.suspects.retain(|_, until| *until > now);
    }

    /// The id of the node whose API address is `addr` (a base URL).
    pub fn node_at(&self, addr: &str) -> Option<NodeId> {
        let dir = self.directory.as_ref()?;
        dir.nodes.values().find(|n| self.api_url(n.id).as_deref() == Some(addr)).map(|n| n.id)
    }

    /// The base URL of `node`'s API, if the directory knows it.
    pub fn api_url(&self, node: NodeId) -> Option<String> {
        let n = self.directory.as_ref()?.nodes.get(&node)?;
        if n.state == NodeState::Removed {
            return None;
        }
        base_url_with(n.api_addr.as_deref()?, self.https()).ok()
    }

    /// Patches in the range descriptors carried by a 421 answer. Each one
    /// replaces the parts of the cached ranges it overlaps (what is left of
    /// them on either side is kept, still pointing at the old shard), unless
    /// the cache already holds a newer epoch of the same range.
    pub fn apply_stale_route(&mut self, ranges: &[RangeDescriptor]) {
        let Some(dir) = self.directory.as_mut() else { return };
        for new in ranges {
            if let Some(end) = &new.end {
                if end <= &new.start {
                    continue;
                }
            }
            let newer_cached = dir.ranges.values().any(|r| r.range_id == new.range_id && r.epoch > new.epoch);
            if newer_cached {
                continue;
            }
            let overlapping: Vec<RangeDescriptor> =
                dir.ranges.values().filter(|r| r.overlaps(&new.start, new.end.as_deref())).cloned().collect();
            for old in overlapping {
                dir.ranges.remove(&old.start);
                if old.start < new.start {
                    let left = RangeDescriptor { end: Some(new.start.clone()), ..old.clone() };
                    dir.ranges.insert(left.start.clone(), left);
                }
                if let Some(new_end) = &new.end {
                    if old.end.as_ref().is_none_or(|old_end| old_end > new_end) {
                        let right = RangeDescriptor { start: new_end.clone(), ..old };
                        dir.ranges.insert(right.start.clone(), right);
                    }
                }
            }
            dir.ranges.insert(new.start.clone(), new.clone());
        }
    }

    /// Where `key` lives according to the cache.
    pub fn route(&self, key: &str) -> Option<Route> {
        let range = self.directory.as_ref()?.lookup(key)?;
        Some(Route {
            range_id: range.range_id,
            shard_id: range.shard_id,
            epoch: range.epoch,
            leader: self.leader(range.shard_id),
        })
    }

    /// Base URLs to try, best first, without duplicates: for a key, its
    /// shard's leader, then the shard's other replicas; then every other
    /// known node by id; then the seeds; suspects moved to the end. With `key == None` (admin calls,
    /// or routing turned off) the list starts at the known nodes.
    pub fn candidates(&self, key: Option<&str>) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut push = |url: Option<String>| {
            if let Some(url) = url {
                if !out.contains(&url) {
                    out.push(url);
                }
            }
        };
        if let Some(dir) = &self.directory {
            if let Some(route) = key.and_then(|k| self.route(k)) {
                push(route.leader.and_then(|n| self.api_url(n)));
                if let Some(shard) = dir.shards.get(&route.shard_id) {
                    for r in &shard.replicas {
                        push(self.api_url(r.node_id));
                    }
                }
            }
            for id in dir.nodes.keys() {
                push(self.api_url(*id));
            }
        }
        for seed in &self.seeds {
            push(Some(seed.clone()));
        }
        // Stable: suspects keep their relative order, after everyone else.
        out.sort_by_key(|url| self.suspects.contains_key(url));
        out
    }
}

/// The first candidate not yet tried by this request; when all were tried,
/// the first one again (the caller then starts a new round).
pub fn choose<'a>(candidates: &'a [String], tried: &[String]) -> Option<&'a String> {
    candidates.iter().find(|c| !tried.contains(c)).or_else(|| candidates.first())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cleave_metadata::range::check_tiling;
    use cleave_metadata::{NodeDescriptor, RangeState, Replica, ShardDescriptor};

    fn range(id: RangeId, start: &str, end: Option<&str>, shard: ShardId, epoch: u64) -> RangeDescriptor {
        RangeDescriptor {
            range_id: id,
            start: start.into(),
            end: end.map(Into::into),
            shard_id: shard,
            epoch,
            state: RangeState::Active,
        }
    }

    /// Nodes 1..=4 at h:7001..h:7004; shard 1 on nodes 1,2,3 owns ["", "m");
    /// shard 2 on nodes 2,3,4 owns ["m", +∞).
    fn dir(version: u64) -> Directory {
        let mut d = Directory { version, ..Default::default() };
        for id in 1..=4 {
            d.nodes.insert(
                id,
                NodeDescriptor {
                    id,
                    raft_addr: format!("r:{id}"),
                    api_addr: Some(format!("h:700{id}")),
                    state: NodeState::Active,
                },
            );
        }
        let shard = |id, nodes: &[NodeId]| ShardDescriptor {
            shard_id: id,
            replicas: nodes.iter().map(|&n| Replica { replica_id: id * 10 + n, node_id: n }).collect(),
            conf_version: 1,
        };
        d.shards.insert(1, shard(1, &[1, 2, 3]));
        d.shards.insert(2, shard(2, &[3, 2, 4]));
        d.ranges.insert("".into(), range(1, "", Some("m"), 1, 1));
        d.ranges.insert("m".into(), range(2, "m", None, 2, 1));
        d.check().unwrap();
        d
    }

    fn status(shard: ShardId, leader: Option<NodeId>) -> ShardStatus {
        // Built from JSON so optional fields added later default to None.
        serde_json::from_value(serde_json::json!({
            "shard_id": shard, "leader": leader, "replicas": [], "conf_version": 1
        }))
        .unwrap()
    }

    fn table() -> RoutingTable {
        let mut t = RoutingTable::new(vec!["http://seed:1".into(), "http://h:7001".into()]);
        t.install_directory(dir(5), Instant::now());
        t.install_leaders(&[status(1, Some(2)), status(2, Some(4))]);
        t
    }

    fn url(n: u64) -> String {
        format!("http://h:700{n}")
    }

    #[test]
    fn empty_table_offers_only_the_seeds() {
        let t = RoutingTable::new(vec!["http://a:1".into(), "http://b:2".into()]);
        assert!(!t.has_directory());
        assert_eq!(t.route("k"), None);
        assert_eq!(t.candidates(Some("k")), vec!["http://a:1", "http://b:2"]);
        assert_eq!(t.candidates(None), vec!["http://a:1", "http://b:2"]);
        assert!(t.is_stale(Instant::now(), Duration::from_secs(3600)));
    }

    #[test]
    fn key_goes_to_its_shard_leader_first_then_replicas_then_everyone() {
        let t = table();
        assert_eq!(t.route("apple"), Some(Route { range_id: 1, shard_id: 1, epoch: 1, leader: Some(2) }));
        assert_eq!(t.route("zebra").unwrap().shard_id, 2);
        assert_eq!(t.candidates(Some("apple")), vec![url(2), url(1), url(3), url(4), "http://seed:1".to_string()]);
        // "m" is the first key of shard 2; its replicas are listed as 3, 2, 4.
        assert_eq!(t.candidates(Some("m")), vec![url(4), url(3), url(2), url(1), "http://seed:1".to_string()]);
        assert_eq!(t.candidates(None), vec![url(1), url(2), url(3), url(4), "http://seed:1".to_string()]);
    }

    #[test]
    fn forgetting_a_leader_falls_back_to_the_replicas() {
        let mut t = table();
        t.forget_leader(1);
        assert_eq!(t.route("a").unwrap().leader, None);
        assert_eq!(t.candidates(Some("a"))[0], url(1));
        t.set_leader(1, 3);
        assert_eq!(t.candidates(Some("a"))[0], url(3));
        // node 4 unreachable: its hints go, shard 2's list starts with replicas
        t.forget_node(&url(4));
        assert_eq!(t.route("z").unwrap().leader, None);
        assert_eq!(t.candidates(Some("z"))[0], url(3));
        assert_eq!(t.node_at(&url(3)), Some(3));
        assert_eq!(t.node_at("http://nowhere:1"), None);
    }

    #[test]
    fn suspects_are_tried_last_until_they_expire_or_answer() {
        let mut t = table();
        let now = Instant::now();
        t.mark_suspect(&url(2), now + Duration::from_secs(3));
        t.mark_suspect("http://seed:1", now + Duration::from_secs(1));
        // the leader hint still says node 2, but node 2 goes last
        assert_eq!(t.route("a").unwrap().leader, Some(2));
        assert_eq!(t.candidates(Some("a")), vec![url(1), url(3), url(4), url(2), "http://seed:1".to_string()]);
        t.expire_suspects(now + Duration::from_secs(2));
        assert!(t.is_suspect(&url(2)));
        assert!(!t.is_suspect("http://seed:1"));
        assert_eq!(t.candidates(Some("a")), vec![url(1), url(3), url(4), "http://seed:1".to_string(), url(2)]);
        t.clear_suspect(&url(2));
        assert_eq!(t.candidates(Some("a"))[0], url(2));
    }

    #[test]
    fn removed_nodes_and_nodes_without_api_address_are_skipped() {
        let mut t = table();
        let mut d = dir(6);
        d.nodes.get_mut(&2).unwrap().state = NodeState::Removed;
        d.nodes.get_mut(&3).unwrap().api_addr = None;
        assert!(t.install_directory(d, Instant::now()));
        assert_eq!(t.candidates(Some("a")), vec![url(1), url(4), "http://seed:1".to_string()]);
    }

    #[test]
    fn only_a_strictly_newer_directory_replaces_the_cache() {
        let mut t = table();
        let t0 = Instant::now();
        let mut older = dir(4);
        older.ranges.clear();
        assert!(!t.install_directory(older, t0));
        assert!(t.route("a").is_some());
        assert!(!t.install_directory(dir(5), t0), "same version is not re-installed");
        // but it counts as a refresh
        assert!(!t.is_stale(t0, Duration::from_secs(1)));
        assert!(t.is_stale(t0 + Duration::from_secs(1), Duration::from_secs(1)));

        let mut newer = dir(6);
        newer.shards.remove(&2);
        newer.ranges.insert("m".into(), range(2, "m", None, 1, 2));
        assert!(t.install_directory(newer, t0));
        assert_eq!(t.route("z").unwrap().shard_id, 1);
        assert_eq!(t.leader(2), None, "hints of shards that no longer exist are dropped");
        assert_eq!(t.leader(1), Some(2));
    }

    #[test]
    fn stale_route_patch_trims_the_old_range() {
        // shard 1 ["", "m") splits at "f": ["f", "m") moves to new shard 3.
        let mut t = table();
        t.apply_stale_route(&[range(7, "f", Some("m"), 3, 2)]);
        let d = t.directory().unwrap();
        check_tiling(d.ranges.values()).unwrap();
        assert_eq!(t.route("a").unwrap().shard_id, 1);
        assert_eq!(t.route("f").unwrap(), Route { range_id: 7, shard_id: 3, epoch: 2, leader: None });
        assert_eq!(t.route("lz").unwrap().shard_id, 3);
        assert_eq!(t.route("m").unwrap().shard_id, 2);
        // shard 3 is unknown to the cache: no preferred node, every node is a candidate
        assert_eq!(t.candidates(Some("g"))[0], url(1));
    }

    #[test]
    fn stale_route_patch_inside_a_range_keeps_both_sides() {
        let mut t = table();
        t.apply_stale_route(&[range(9, "c", Some("d"), 2, 3)]);
        let d = t.directory().unwrap();
        check_tiling(d.ranges.values()).unwrap();
        let shards: Vec<_> = d.ranges.values().map(|r| (r.start.as_str(), r.shard_id)).collect();
        assert_eq!(shards, vec![("", 1), ("c", 2), ("d", 1), ("m", 2)]);
    }

    #[test]
    fn stale_route_patch_spanning_several_ranges_and_unbounded() {
        let mut t = table();
        t.apply_stale_route(&[range(3, "k", None, 5, 4)]);
        let d = t.directory().unwrap();
        check_tiling(d.ranges.values()).unwrap();
        let shards: Vec<_> = d.ranges.values().map(|r| (r.start.as_str(), r.end.as_deref(), r.shard_id)).collect();
        assert_eq!(shards, vec![("", Some("k"), 1), ("k", None, 5)]);
    }

    #[test]
    fn stale_route_patch_never_rolls_back_an_epoch() {
        let mut t = table();
        t.apply_stale_route(&[range(1, "", Some("m"), 1, 3)]);
        t.apply_stale_route(&[range(1, "", Some("f"), 4, 2)]);
        assert_eq!(t.route("a").unwrap().shard_id, 1, "epoch 2 is older than the cached 3");
        // empty or inverted descriptors are ignored
        t.apply_stale_route(&[range(8, "x", Some("x"), 4, 9), range(8, "y", Some("b"), 4, 9)]);
        check_tiling(t.directory().unwrap().ranges.values()).unwrap();
        // without a directory there is nothing to patch
        let mut empty = RoutingTable::new(vec![]);
        empty.apply_stale_route(&[range(1, "", None, 1, 1)]);
        assert!(!empty.has_directory());
    }

    #[test]
    fn choose_skips_what_was_tried_then_starts_over() {
        let c = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        assert_eq!(choose(&c, &[]).unwrap(), "a");
        assert_eq!(choose(&c, &["a".into()]).unwrap(), "b");
        assert_eq!(choose(&c, &["a".into(), "c".into()]).unwrap(), "b");
        assert_eq!(choose(&c, &["a".into(), "b".into(), "c".into()]).unwrap(), "a");
        assert_eq!(choose(&[], &[]), None);
    }
}
