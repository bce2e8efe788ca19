//! Transactions across shards: `POST /v1/txn` runs `compare → success |
//! failure` as one atomic, strictly serializable step over keys on any
//! shards. The design, and why it is this one, is in
//! `docs/plans/transactions.md`; in short:
//!
//! - keys on **one shard**: one Raft entry decides and writes ([`plan`]
//!   evaluated inside [`apply`]);
//! - keys on **several shards**: strict two-phase locking with a primary
//!   key whose shard records the outcome — lock every key ([`TxnCommand::Lock`],
//!   one entry per shard, in parallel), decide with every lock held
//!   ([`plan::evaluate`]), commit the primary (the commit point), then the
//!   rest in the background ([`coordinator`]);
//! - anyone who meets a lock asks the primary and finishes the transaction
//!   (commit or roll back) before going on ([`resolve`]).
//!
//! Locks and outcomes live inside the keys' own records
//! ([`crate::storage::txn_info`]), so splits, moves and snapshots carry them.

pub mod apply;
pub mod coordinator;
pub mod plan;
pub mod resolve;

pub use apply::{Routed, Status, TxnCommand, TxnReply};
