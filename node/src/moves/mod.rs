//! Replica moves, leader transfers, node decommissioning and self-healing.
//!
//! A move replaces one replica of a group with a new one on another node,
//! the way TiKV and CockroachDB do it: learner first, then joint consensus,
//! never a reused member id. It is an operation in the directory like a
//! split, driven through its phases by the metadata leader and resumed by
//! whichever node leads the metadata group next.
//!
//! - [`plan`]: the next membership step, from the group's observed
//!   configuration (pure).
//! - [`driver`]: carries a move through its phases.
//! - [`calls`]: membership steps at a group's leader, admin entry points.
//! - [`balance`]: what the rebalancer wants — heal, decommission, even out
//!   replicas and leaders (pure); [`rebalancer`] runs it.
//! - [`gc`]: nodes delete replicas the directory no longer lists.

pub mod balance;
pub mod calls;
pub mod driver;
pub mod gc;
pub mod plan;
pub mod rebalancer;
