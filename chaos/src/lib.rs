//! `cleave-chaos`: a fault-injection suite for CleaveDB, in the spirit of
//! Jepsen.
//!
//! It starts a cluster of real `cleave-node` processes (or uses an existing
//! one), runs concurrent client workloads through the public HTTP API while
//! a nemesis kills, pauses and partitions nodes and splits ranges, records
//! every operation, and checks the history: linearizability of registers
//! (also through the Rust client, `cleave_client`), no lost writes in a set,
//! versions that never go backwards, scans that miss nothing while ranges
//! split.
//!
//! Pure logic and I/O live in separate modules:
//!
//! | pure | I/O |
//! |---|---|
//! | [`history`]: operations and outcomes | [`http`]: requests and how answers are classified |
//! | [`linearizability`]: the Wing & Gong / Porcupine search | [`workload`]: the clients |
//! | [`register`], [`set`], [`monotonic`], [`scan`], [`bank`], [`watched`]: models and checkers | [`nodes`]: node processes |
//! | [`check`]: a whole history → anomalies | [`netns`]: namespaces and packet filters |
//! | [`schedule`]: the seeded fault schedule | [`nemesis`]: plays the schedule |
//! | [`summary`]: the report | [`runner`]: one run, start to verdict |

pub mod bank;
pub mod check;
pub mod error;
pub mod history;
pub mod http;
pub mod linearizability;
pub mod monotonic;
pub mod nemesis;
pub mod netns;
pub mod nodes;
pub mod presplit;
pub mod register;
pub mod runner;
pub mod scan;
pub mod schedule;
pub mod set;
pub mod summary;
pub mod watched;
pub mod workload;

pub use error::{Error, Result};
