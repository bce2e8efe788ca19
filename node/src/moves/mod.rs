//! What a group's leader and every node do for replica moves, leader
//! transfers, decommissioning and replica garbage collection.
//!
//! A move replaces one replica of a group with a new one on another node,
//! the way TiKV and CockroachDB do it: learner first, then joint consensus,
//! never a reused member id. It is an operation in the directory driven by
//! the operations supervisor (`ops::moves`, planned by `ops::move_plan`);
//! the replica balancer (`balance::replicas`) decides which moves to start.
//!
//! - [`calls`]: membership steps at a group's leader, a group's genesis
//!   state, leader transfers and decommissioning (admin entry points).
//! - [`gc`]: nodes delete replicas the directory no longer lists.

pub mod calls;
pub mod gc;
