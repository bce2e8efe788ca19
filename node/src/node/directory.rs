//! A node's knowledge of the cluster's layout: the newest directory it has
//! (its own metadata replica's, or the last one the metadata leader sent),
//! the shard leaders the metadata leader last reported, and — persisted in
//! `cluster.json` — the newest directory version ever seen and where the
//! metadata group was, so a restarted node finds the cluster again and
//! replica GC never trusts an older directory.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use cleave_metadata::{Directory, NodeId, NodeState, META_GROUP};

use super::identity::ClusterHints;
use crate::raft::AddressBook;

/// See the module.
pub struct DirectoryCache {
    me: NodeId,
    my_raft_addr: String,
    /// The founding nodes (or, after `--join`, the metadata replicas then).
    seeds: Vec<String>,
    /// Where [`ClusterHints`] are persisted.
    hints_path: PathBuf,
    hints: Mutex<ClusterHints>,
    directory: RwLock<Arc<Directory>>,
    /// Shard leaders as last reported by the metadata leader: group → node.
    leader_hints: RwLock<HashMap<u64, NodeId>>,
    /// Raft addresses of nodes, kept current for the Raft network.
    addresses: AddressBook,
}

impl DirectoryCache {
    pub fn new(
        me: NodeId,
        my_raft_addr: String,
        seeds: Vec<String>,
        hints_path: PathBuf,
        addresses: AddressBook,
    ) -> anyhow::Result<DirectoryCache> {
        let hints = ClusterHints::load(&hints_path)?;
        Ok(DirectoryCache {
            me,
            my_raft_addr,
            seeds,
            hints_path,
            hints: Mutex::new(hints),
            directory: RwLock::new(Arc::new(Directory::default())),
            leader_hints: RwLock::default(),
            addresses,
        })
    }

    /// The newest directory installed here (see `Node::directory`, which
    /// also looks at the local metadata replica).
    pub fn current(&self) -> Arc<Directory> {
        self.directory.read().unwrap().clone()
    }

    /// Adopts `d` if it is newer than what this node has.
    pub fn install(&self, d: Directory) {
        let mut cur = self.directory.write().unwrap();
        if d.version > cur.version {
            self.addresses.update(&d);
            *cur = Arc::new(d);
        }
    }

    /// The newest directory version this node has ever seen (persisted).
    pub fn floor(&self) -> u64 {
        self.hints.lock().unwrap().directory_version
    }

    /// Persists what `dir` says about the cluster, if it is newer than what
    /// `cluster.json` holds.
    pub fn remember(&self, dir: &Directory) -> anyhow::Result<()> {
        let mut hints = self.hints.lock().unwrap();
        if dir.version <= hints.directory_version {
            return Ok(());
        }
        let addr = |n: &NodeId| dir.nodes.get(n).map(|d| d.raft_addr.clone());
        let mut next = ClusterHints {
            directory_version: dir.version,
            meta_members: dir.meta.iter().flat_map(|m| m.replicas.iter()).filter_map(|r| addr(&r.node_id)).collect(),
            nodes: dir
                .nodes
                .values()
                .filter(|n| n.id != self.me && n.state != NodeState::Removed)
                .map(|n| n.raft_addr.clone())
                .collect(),
        };
        if next.meta_members.is_empty() {
            next.meta_members = hints.meta_members.clone();
        }
        next.save(&self.hints_path)?;
        *hints = next;
        Ok(())
    }

    /// Records durably that a directory of version `v` exists (a request to
    /// create a replica said it lists the replica), before acting on it.
    pub fn raise_floor(&self, v: u64) -> anyhow::Result<()> {
        let mut hints = self.hints.lock().unwrap();
        if v <= hints.directory_version {
            return Ok(());
        }
        let next = ClusterHints { directory_version: v, ..hints.clone() };
        next.save(&self.hints_path)?;
        *hints = next;
        Ok(())
    }

    pub fn set_leader_hints(&self, leaders: &[(u64, NodeId)]) {
        let mut h = self.leader_hints.write().unwrap();
        h.clear();
        h.extend(leaders.iter().copied());
    }

    pub fn leader_hint(&self, group: u64) -> Option<NodeId> {
        self.leader_hints.read().unwrap().get(&group).copied()
    }

    /// The RPC address of `node`, from `dir` (the node's newest directory:
    /// `Node::directory`, which also adopts its metadata replica's).
    pub fn raft_addr_of(&self, dir: &Directory, node: NodeId) -> Option<String> {
        if node == self.me {
            return Some(self.my_raft_addr.clone());
        }
        dir.nodes.get(&node).map(|n| n.raft_addr.clone())
    }

    /// Where to send a request for `group` that this node cannot serve:
    /// the hinted leader first, then every replica, then (for the metadata
    /// group) where it was last seen, any node known, and the seeds; all
    /// from `dir` (as for [`DirectoryCache::raft_addr_of`]) and the hints.
    pub fn candidates(&self, dir: &Directory, group: u64) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(addr) = self.leader_hint(group).filter(|n| *n != self.me).and_then(|n| self.raft_addr_of(dir, n)) {
            out.push(addr);
        }
        // Committed groups, and a split's new shard before it is committed.
        for r in dir.group_replicas(group).unwrap_or_default() {
            if r.node_id != self.me {
                if let Some(a) = dir.nodes.get(&r.node_id) {
                    out.push(a.raft_addr.clone());
                }
            }
        }
        if group == META_GROUP {
            let hints = self.hints.lock().unwrap().clone();
            let fallbacks = hints.meta_members.iter().chain(&hints.nodes).chain(&self.seeds);
            out.extend(fallbacks.filter(|s| **s != self.my_raft_addr).cloned());
        }
        let mut seen = HashSet::new();
        out.retain(|a| seen.insert(a.clone()));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(dir: &tempfile::TempDir) -> DirectoryCache {
        let seeds = vec!["seed:1".to_string(), "me:9".to_string()];
        DirectoryCache::new(1, "me:9".into(), seeds, dir.path().join("cluster.json"), AddressBook::default()).unwrap()
    }

    #[test]
    fn only_a_newer_directory_is_installed() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cache(&tmp);
        let d = Directory::bootstrap(&[(1, "me:9".into()), (2, "b:9".into()), (3, "c:9".into())], 3);
        c.install(d.clone());
        assert_eq!(c.current().version, d.version);
        c.install(Directory::default());
        assert_eq!(c.current().version, d.version, "an older directory is ignored");
        assert_eq!(c.raft_addr_of(&c.current(), 2).as_deref(), Some("b:9"));
        assert_eq!(c.raft_addr_of(&c.current(), 1).as_deref(), Some("me:9"));
    }

    #[test]
    fn the_floor_and_where_the_metadata_group_was_survive_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let d = Directory::bootstrap(&[(1, "me:9".into()), (2, "b:9".into()), (3, "c:9".into())], 3);
        {
            let c = cache(&tmp);
            c.remember(&d).unwrap();
            c.raise_floor(d.version + 3).unwrap();
            c.raise_floor(d.version + 1).unwrap();
            assert_eq!(c.floor(), d.version + 3, "the floor never goes down");
        }
        let c = cache(&tmp);
        assert_eq!(c.floor(), d.version + 3);
        // No directory installed after the restart: the metadata group is
        // looked for where it was, then at the other nodes, then the seeds —
        // never at this node itself.
        let cands = c.candidates(&c.current(), META_GROUP);
        assert!(cands.contains(&"b:9".to_string()) && cands.contains(&"c:9".to_string()), "{cands:?}");
        assert_eq!(cands.last().map(String::as_str), Some("seed:1"));
        assert!(!cands.contains(&"me:9".to_string()));
        let mut dedup = cands.clone();
        dedup.dedup();
        assert_eq!(dedup.len(), cands.len(), "each address once");
    }

    #[test]
    fn the_hinted_leader_is_tried_first() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cache(&tmp);
        let d = Directory::bootstrap(&[(1, "me:9".into()), (2, "b:9".into()), (3, "c:9".into())], 3);
        let shard = d.shards.keys().copied().find(|s| *s != META_GROUP).unwrap();
        c.install(d);
        c.set_leader_hints(&[(shard, 3)]);
        assert_eq!(c.candidates(&c.current(), shard).first().map(String::as_str), Some("c:9"));
        assert_eq!(c.leader_hint(shard), Some(3));
    }
}
