//! What the metadata leader changes on its own, from heartbeat figures:
//! the automatic split planner ([`auto_split`]: split a range that is too
//! large or too hot), the automatic merge planner ([`auto_merge`]: merge
//! small idle neighbours) and the replica balancer ([`replicas`]: heal, drain
//! decommissioning nodes, even out replicas and leaders). Both are pure —
//! the directory and the observed figures in, the actions out — and
//! [`run`] holds the two loops that feed them and start what they want
//! (splits and moves become operations of `ops`).

pub mod auto_merge;
pub mod auto_split;
pub mod replicas;
pub mod run;
