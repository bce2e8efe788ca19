//! `cleave-node`: one CleaveDB server process.
//!
//! A node hosts replicas of many Raft groups over one RocksDB: the metadata
//! group (group 0, the directory) on some nodes, and shard groups holding
//! user data. It serves the HTTP JSON API on one port and internal RPC
//! (Raft traffic, forwarding, heartbeats) on another.
//!
//! Module map, from the disk up:
//! - [`storage`]: the shared RocksDB, key layout, group commit of WAL syncs.
//! - [`raft`]: the openraft wrapper — log store, state machine, snapshots,
//!   Raft network — the only module that uses openraft directly.
//! - [`codec`]: the bounded bincode encoding of frames, entries and records.
//! - [`kv`], [`command`]: what a shard applies and how it fences stale routes.
//! - [`rpc`]: the multiplexed node-to-node transport and its messages.
//! - [`node`], [`router`], [`meta`], [`join`]: the running node, request
//!   routing and forwarding, heartbeats and the metadata leader's duties.
//! - [`split`]: live range splits (dual-write, backfill, cutover).
//! - [`moves`]: replica moves, leader transfers, decommissioning, healing
//!   and balancing, replica garbage collection.
//! - [`api`], [`metrics`]: HTTP handlers and Prometheus metrics.
//! - [`config`]: flags, environment and the TOML config file.

pub mod api;
pub mod codec;
pub mod command;
pub mod config;
#[cfg(test)]
mod golden;
pub mod join;
pub mod kv;
pub mod meta;
pub mod metrics;
pub mod moves;
pub mod node;
pub mod raft;
pub mod router;
pub mod rpc;
pub mod split;
pub mod storage;
#[cfg(test)]
pub mod testing;
