//! Operations: the long-running changes of the cluster's layout — range
//! splits, merges and replica moves — carried out by the metadata leader.
//!
//! Every operation is a record in the directory (`cleave_metadata::Operation`)
//! with a phase. The metadata leader's [`supervisor`] runs one task per
//! operation that is not finished: read the operation, do the work of its
//! phase (each step idempotent), record the next phase with a
//! compare-and-set entry in the metadata log. Because every decision is a
//! Raft entry, a new metadata leader resumes every operation where the old
//! one left it, simply by starting the loop again.
//!
//! What to do next is decided by pure planners, apart from the I/O that
//! carries it out:
//! - [`split_plan`] / [`split`]: a live split (create the new shard, begin
//!   capture, freeze, verify, commit, cut over; or abort and clean up),
//!   and with [`merge`] a range merge (the same, run backwards into the
//!   left neighbour's shard).
//! - [`move_plan`] / [`moves`]: a replica move (learner, joint consensus,
//!   commit; or revert).
//! - [`faults`]: the `--fault-hold` points tests use to hold an operation in
//!   a phase.

pub mod faults;
pub mod merge;
pub mod move_plan;
pub mod moves;
pub mod split;
pub mod split_plan;
pub mod supervisor;

pub use supervisor::{now_ms, Supervisor};
