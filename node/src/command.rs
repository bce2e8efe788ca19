//! Commands replicated through Raft logs, and what applying them returns.
//!
//! One command type serves every group: the metadata group applies
//! [`Command::Meta`] to its directory, shard groups apply [`Command::Kv`] to
//! their data. Each KV command carries the range id and epoch the router
//! used, so the shard can refuse it *at apply time* if the range changed
//! hands in between (the fencing rule of the architecture doc).

use cleave_metadata::{MetaCommand, MetaError, MetaResponse, RangeDescriptor, RangeId};
use serde::{Deserialize, Serialize};

/// An entry's application payload.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Kv(KvCommand),
    Meta(MetaCommand),
}

/// A write to one key, stamped with the route it was sent on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct KvCommand {
    pub range_id: RangeId,
    pub epoch: u64,
    pub op: KvOp,
}

impl KvCommand {
    pub fn key(&self) -> &str {
        match &self.op {
            KvOp::Put { key, .. } | KvOp::Delete { key, .. } => key,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum KvOp {
    /// `value` is the JSON text of the value, stored verbatim.
    Put {
        key: String,
        value: String,
        if_version: Option<u64>,
    },
    Delete {
        key: String,
        if_version: Option<u64>,
    },
}

/// Why a KV command was refused when applied. Refusals change nothing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("version conflict: current version is {current}")]
    VersionConflict { current: u64 },
    #[error("key not found")]
    NotFound,
    /// The shard does not own the key at the epoch the command carried.
    #[error("stale route: the key's range has changed")]
    WrongRange { ranges: Vec<RangeDescriptor> },
    /// The key's range is frozen for a cutover; retry shortly.
    #[error("range is moving")]
    RangeMoving,
}

/// The result of applying one entry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum CommandResponse {
    /// Blank and membership entries.
    None,
    /// The new version of the key.
    Kv(Result<u64, KvError>),
    Meta(Result<MetaResponse, MetaError>),
    /// The command did not fit this group (e.g. a KV write sent to group 0).
    Rejected(String),
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Kv(c) => match &c.op {
                KvOp::Put { key, value, if_version } => {
                    write!(
                        f,
                        "put({key:?}, {} bytes, if_version={if_version:?}, range={}@{})",
                        value.len(),
                        c.range_id,
                        c.epoch
                    )
                }
                KvOp::Delete { key, if_version } => {
                    write!(f, "delete({key:?}, if_version={if_version:?}, range={}@{})", c.range_id, c.epoch)
                }
            },
            Command::Meta(m) => write!(f, "meta({m:?})"),
        }
    }
}

impl std::fmt::Display for CommandResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}
