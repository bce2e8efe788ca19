//! Commands replicated through Raft logs, and what applying them returns.
//!
//! One command type serves every group: the metadata group applies
//! [`Command::Meta`] to its directory, shard groups apply [`Command::Kv`] to
//! their data. Each KV command carries the range id and epoch the router
//! used, so the shard can refuse it *at apply time* if the range changed
//! hands in between (the fencing rule of the architecture doc).

use cleave_metadata::{MetaCommand, MetaError, MetaResponse, OpId, RangeDescriptor, RangeId, ShardId};
use serde::{Deserialize, Serialize};

/// An entry's application payload.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Kv(KvCommand),
    Meta(MetaCommand),
    /// Split bookkeeping applied by a shard (source or target).
    Shard(ShardCommand),
    /// A step of a transaction on a shard (`txn::apply`).
    Txn(crate::txn::TxnCommand),
    /// `cmd` as proposed at `ts` on its proposer's clock ([`crate::clock`]):
    /// every proposal is stamped so ([`crate::raft::GroupRaft::write`]); a
    /// shard's apply turns the stamp into the timestamp of the changes the
    /// entry makes (`watch`). Last in the enum, so entries written before
    /// stamping decode as before (unstamped).
    At {
        ts: crate::clock::Ts,
        cmd: Box<Command>,
    },
}

impl Command {
    /// `cmd` stamped `at` by its proposer, or left to the leader's clock
    /// (`at` = 0).
    pub fn stamped(at: crate::clock::Ts, cmd: Command) -> Command {
        match at {
            0 => cmd,
            ts => Command::At { ts, cmd: Box::new(cmd) },
        }
    }

    /// The command without its stamp, and the stamp (0: unstamped).
    pub fn unstamped(&self) -> (&Command, crate::clock::Ts) {
        match self {
            Command::At { ts, cmd } => (cmd.unstamped().0, *ts),
            c => (c, 0),
        }
    }
}

/// Steps of a split as seen by the shards (see `docs/split-protocol.md`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum ShardCommand {
    /// Source: from this entry on, writes to `[start, end)` are also logged
    /// for the target shard.
    BeginCapture { op_id: OpId, start: String, end: Option<String>, target: ShardId },
    /// Source: refuse writes to the captured range from this entry on.
    /// Answers the entry's log index (the freeze index).
    Freeze { op_id: OpId },
    /// Source: abandon a capture (abort), dropping its forward log.
    EndCapture { op_id: OpId },
    /// Source, after commit: own only `left` instead of the split range, drop
    /// the moved data and the forward log.
    SplitDone { op_id: OpId, left: RangeDescriptor, moved: RangeDescriptor, moved_keys: u64, moved_bytes: u64 },
    /// Target: records copied from the source (`source_index` is `None` for
    /// backfill, else the last source log index of forwarded writes).
    Ingest { op_id: OpId, source_index: Option<u64>, records: Vec<(String, Vec<u8>)> },
    /// Target: the backfill finished from a source snapshot at `snapshot_index`
    /// whose content digest was `digest`; `capture_base` is the source's
    /// digest of the range when the capture began (see [`crate::kv::Capture::changes`]).
    BackfillDone { op_id: OpId, snapshot_index: u64, digest: u64, capture_base: u64, keys: u64, bytes: u64 },
    /// Target, after commit: start serving `ranges`.
    Activate { op_id: OpId, ranges: Vec<RangeDescriptor> },
    /// Target: the backfill arrived as table files (`split::sst`), staged
    /// on every replica: ingest `files` of `attempt` and record the
    /// backfill as [`ShardCommand::BackfillDone`] does. `live` is the
    /// live keys and bytes the files hold (the target's stats grow by
    /// them); `keys` and `bytes` are what was copied, tombstones included.
    /// Last in the enum, so entries written before it decode as before.
    BackfillFiles {
        op_id: OpId,
        snapshot_index: u64,
        digest: u64,
        capture_base: u64,
        keys: u64,
        bytes: u64,
        live: (u64, u64),
        attempt: u64,
        files: Vec<crate::split::sst::SstFile>,
    },
    /// Source: as [`ShardCommand::BeginCapture`], for a target whose every
    /// replica sits beside one of the source's: each node fills its target
    /// replica from its source replica (`split::mirror`).
    MirrorCapture { op_id: OpId, start: String, end: Option<String>, target: ShardId },
    /// Any shard: nothing changes at or below the entry's timestamp from
    /// now on (it moves the shard's `last_ts` there, see `watch`): what a
    /// watched shard that takes no writes proposes so that its watchers'
    /// progress moves on.
    Close,
    /// Any shard: drop the change log at and below `through` (`watch`);
    /// `bytes` is what the leader counted there after the trim point
    /// `from` (every replica holds the same entries, so subtracts the same
    /// figure). Applied only if the log was last trimmed at `from`: a trim
    /// counted before another one applied would count bytes twice.
    TrimChanges { from: crate::clock::Ts, through: crate::clock::Ts, bytes: u64 },
    /// Target of a merge, a shard serving its own ranges: receive
    /// `[start, end)` from `source` beside them (`incoming`, as a split's
    /// target receives), serving none of it until [`ShardCommand::Absorb`].
    BeginAbsorb { op_id: OpId, start: String, end: Option<String>, source: ShardId },
    /// Target of a merge, after commit: own `ranges` (its own range joined
    /// with the absorbed one). The absorbed range's changes at or below
    /// `since` (the source's freeze) are in the source's change log, not
    /// here (`watch`: a watch behind it is told its history is compacted).
    Absorb { op_id: OpId, ranges: Vec<RangeDescriptor>, since: crate::clock::Ts },
    /// Target of an aborted merge: drop what was received.
    DropAbsorbed { op_id: OpId },
    /// Source of a merge, after commit: own nothing more; `merged` is the
    /// range that took ours (what a stale route is told), then the group
    /// is destroyed.
    Subsumed { op_id: OpId, merged: RangeDescriptor },
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
    /// A transaction holds the key (see `txn`): the router settles the lock
    /// with the transaction's primary and retries.
    #[error("key {key:?} is locked by transaction {:032x}", lock.txn)]
    Locked { key: String, lock: crate::storage::txn_info::Lock },
    /// The transaction was aborted (by someone who found it abandoned)
    /// before this step of it.
    #[error("transaction aborted")]
    TxnAborted,
}

/// Why a split step was refused when applied. Refusals change nothing and
/// depend only on the command and the shard's state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    #[error("range [{start:?}, {end:?}) is not owned by this shard")]
    NotOwned { start: String, end: Option<String> },
    /// A late `BeginCapture` of an operation that already ended here.
    #[error("operation {op_id} has already ended on this shard")]
    Ended { op_id: OpId },
    #[error("the capture of operation {op_id} would overlap that of operation {running}")]
    Overlaps { op_id: OpId, running: OpId },
    #[error("no capture for operation {op_id}")]
    NoCapture { op_id: OpId },
    #[error("this shard is not receiving operation {op_id}")]
    NotReceiving { op_id: OpId },
    /// Forwarded writes, or a backfill without files, before the backfill
    /// of the operation is recorded.
    #[error("operation {op_id}: not before its backfill is recorded")]
    BeforeBackfill { op_id: OpId },
    /// An ingested record that does not decode (corrupt at the source, or a
    /// format this build does not know): the whole batch is refused.
    #[error("operation {op_id}: the record of key {key:?} does not decode")]
    BadRecord { op_id: OpId, key: String },
    /// A freeze while transactions hold write locks in the range: their
    /// commits must land here, where the changes before the split are
    /// kept (`watch`). The driver resolves them and freezes again.
    #[error("operation {op_id}: keys of the range are locked by transactions: {keys:?}")]
    Locked { op_id: OpId, keys: Vec<String> },
    /// A merge's target asked to absorb a range it already owns a part of.
    #[error("range [{start:?}, {end:?}) overlaps a range this shard owns")]
    Owned { start: String, end: Option<String> },
}

/// The result of applying one entry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum CommandResponse {
    /// Blank and membership entries.
    None,
    /// The new version of the key.
    Kv(Result<u64, KvError>),
    Meta(Result<MetaResponse, MetaError>),
    /// A split step: the entry's log index (for `Freeze`, the freeze index).
    Shard(Result<u64, StepError>),
    /// The command did not fit this group (e.g. a KV write sent to group 0).
    Rejected(String),
    /// A transaction step.
    Txn(Result<crate::txn::TxnReply, KvError>),
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
            Command::Shard(ShardCommand::Ingest { op_id, source_index, records }) => {
                write!(f, "ingest(op={op_id}, source_index={source_index:?}, {} records)", records.len())
            }
            Command::Shard(s) => write!(f, "shard({s:?})"),
            Command::Txn(t) => write!(f, "txn({})", t.summary()),
            Command::At { ts, cmd } => write!(f, "{cmd} @{ts}"),
        }
    }
}

impl std::fmt::Display for CommandResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}
