//! `cleave-node`: one CleaveDB server process.
//!
//! A node hosts replicas of many Raft groups over one RocksDB: the metadata
//! group (group 0, the directory) on some nodes, and shard groups holding
//! user data. It serves the HTTP JSON API on one port and internal RPC
//! (Raft traffic, forwarding, heartbeats) on another.
//!
//! Module map, from the disk up (the design: `docs/architecture.md`):
//! - [`storage`]: the shared RocksDB, key layout, group commit of WAL syncs.
//! - [`codec`]: the bounded bincode encoding of frames, entries and records.
//! - [`command`], [`kv`]: what a shard applies (typed refusals apart from
//!   storage failures) and how it fences stale routes.
//! - [`raft`]: the openraft wrapper — log store, state machine, snapshots,
//!   Raft network, membership changes — the only module that uses openraft.
//! - [`rpc`]: the node-to-node transport and the typed node requests.
//! - [`node`]: the running node and its parts — the replicas held and their
//!   life cycle (`Groups`), what it knows of the cluster (`DirectoryCache`),
//!   start-up, joining, and the dispatch of node requests.
//! - [`router`]: routing a request to the replica that serves it, within one
//!   deadline, and serving it there.
//! - [`leader`]: the metadata leader's duties — confirmed leadership,
//!   heartbeats and liveness, cluster views.
//! - [`ops`]: the operations supervisor: live splits, merges and replica
//!   moves, each decided by a pure planner and carried out step by step.
//! - [`keyspace`]: hash-spread keyspaces — declaring one, and the data
//!   API's mapping of user keys to bucketed internal keys.
//! - [`split`]: the shards' side of a split (forwarder, apply steps,
//!   digest, calls to a shard's leader).
//! - [`moves`]: membership steps at a group's leader, leader transfers,
//!   decommissioning, replica garbage collection.
//! - [`balance`]: the automatic split and merge planners and the replica balancer
//!   (pure) and the loops that feed them.
//! - [`api`], [`metrics`]: HTTP handlers and Prometheus metrics.
//! - [`security`]: bearer tokens and roles for the API, the cluster secret
//!   and the handshake of the RPC port.
//! - [`config`]: flags, environment and the TOML config file.
//! - [`clock`]: the hybrid logical clock that stamps every proposal.
//! - [`txn`]: transactions across shards.
//! - [`watch`]: change logs, resolved timestamps and the watch stream.

pub mod api;
pub mod background;
pub mod balance;
pub mod clock;
pub mod codec;
pub mod command;
pub mod config;
#[cfg(test)]
mod golden;
pub mod keyspace;
pub mod kv;
pub mod leader;
pub mod metrics;
pub mod moves;
pub mod node;
pub mod ops;
pub mod raft;
pub mod router;
pub mod rpc;
pub mod security;
pub mod split;
pub mod storage;
#[cfg(test)]
pub mod testing;
pub mod txn;
pub mod watch;
