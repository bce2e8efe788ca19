//! The history of a run: every client operation with when it was invoked,
//! when it completed, and what came back.
//!
//! A checker can only judge what the clients saw, so the history keeps the
//! client's view, not the server's: an operation is *invoked* just before its
//! HTTP request is sent and *completes* when its answer (or the lack of one)
//! is known. Its [`Outcome`] is one of three:
//!
//! - [`Outcome::Ok`]: a definite answer ([`Ret`]), including "not found" and
//!   "version conflict", which are facts about the data too;
//! - [`Outcome::Failed`]: the operation certainly had no effect (the
//!   connection was refused before anything was sent, or the server said
//!   "no leader", "stale route", "bad request");
//! - [`Outcome::Indeterminate`]: it may or may not have taken effect, now or
//!   at any later time (a timeout, a 504, a connection reset after sending).
//!   A checker must accept both possibilities.
//!
//! Times are nanoseconds on one monotonic clock since the start of the run,
//! so real-time order between operations of different clients is exact.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Nanoseconds since the start of the run, on the runner's monotonic clock.
pub type Nanos = u64;

/// Which workload an operation belongs to; each has its own checker.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    /// Read / write / compare-and-set / delete on a few keys: checked for linearizability.
    Register,
    /// Unique inserts: every acknowledged one must be read back at the end.
    Set,
    /// Reads and writes whose versions, per client and key, must never go down.
    Monotonic,
    /// Unique inserts and paginated scans of the whole key space while
    /// ranges split: every scan must show what was acknowledged before it.
    Scan,
    /// The register workload through the Rust client (`cleave_client`),
    /// with its routing and retries: checked for linearizability.
    Client,
    /// Transfers between accounts on several shards, and transactions
    /// reading every account: every read must see the same total.
    Bank,
    /// A watch of the whole key space through the Rust client, across
    /// every fault: each acknowledged write seen once, in order
    /// (`watched`). Runs no clients of its own.
    Watch,
}

impl Workload {
    pub const ALL: [Workload; 7] = [
        Workload::Register,
        Workload::Set,
        Workload::Monotonic,
        Workload::Scan,
        Workload::Client,
        Workload::Bank,
        Workload::Watch,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Register => "register",
            Workload::Set => "set",
            Workload::Monotonic => "monotonic",
            Workload::Scan => "scan",
            Workload::Client => "client",
            Workload::Bank => "bank",
            Workload::Watch => "watch",
        }
    }

    /// Whether the operations are checked key by key for linearizability.
    pub fn is_register(self) -> bool {
        matches!(self, Workload::Register | Workload::Client)
    }
}

/// What a client asked for, on one key. Written values are unique integers
/// (per run), so a read's value names the write it saw.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(tag = "f", rename_all = "snake_case")]
pub enum Call {
    /// `GET /v1/kv/{key}` (linearizable, unless the op is marked `stale`).
    Read,
    /// `PUT /v1/kv/{key}` `{"value": value}`.
    Write { value: u64 },
    /// `PUT /v1/kv/{key}` `{"value": value, "if_version": expected}` (0 = must not exist).
    Cas { expected: u64, value: u64 },
    /// `DELETE /v1/kv/{key}`.
    Delete,
    /// `DELETE /v1/kv/{key}?if_version=expected`.
    CasDelete { expected: u64 },
    /// Every page of `GET /v1/kv?start={key}&limit=…`, following `next`.
    Scan,
    /// `POST /v1/txn` reading every account of the bank workload.
    ReadAll,
    /// `POST /v1/txn` moving `amount` from account `from` to account `to`,
    /// if neither changed since the client read them.
    Transfer { from: u32, to: u32, amount: u32 },
}

/// One page of a scan, as the scan checker needs it: the cursor it was
/// asked with, the cursor it returned, and its keys (only those of the scan
/// workload of this run are kept, with their values; `first` and `last`
/// are the page's first and last key of any kind).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct PageRecord {
    pub start: String,
    pub next: Option<String>,
    pub items: u32,
    pub first: Option<String>,
    pub last: Option<String>,
    pub ours: Vec<(String, u64)>,
}

/// A definite answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Ret {
    /// 404: the key does not exist.
    NotFound,
    /// 200 to a read.
    Value { value: u64, version: u64 },
    /// 200 to a write: the version the write created.
    Written { version: u64 },
    /// 409 to a compare-and-set: it did not apply; `current` is the version
    /// the server reported, if it did.
    Conflict { current: Option<u64> },
    /// 200 to a read, with a value this suite never writes.
    Unparsable { text: String },
    /// Every page of a scan, in order.
    Scanned { pages: Vec<PageRecord> },
    /// 200 to [`Call::ReadAll`]: each account's balance (`None`: absent
    /// or not a number).
    Balances { balances: Vec<Option<i64>> },
    /// 200 to [`Call::Transfer`]: whether its comparisons held (it moved
    /// the money) or not (it changed nothing).
    Txn { succeeded: bool },
}

/// How an operation ended, from the client's point of view.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Ok {
        ret: Ret,
    },
    /// Certainly had no effect.
    Failed {
        reason: String,
    },
    /// May have taken effect, at any time after invocation.
    Indeterminate {
        reason: String,
    },
}

impl Outcome {
    pub fn ok(ret: Ret) -> Outcome {
        Outcome::Ok { ret }
    }

    pub fn ret(&self) -> Option<&Ret> {
        match self {
            Outcome::Ok { ret } => Some(ret),
            _ => None,
        }
    }

    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok { .. })
    }

    pub fn is_indeterminate(&self) -> bool {
        matches!(self, Outcome::Indeterminate { .. })
    }
}

/// One operation of one client.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Op {
    /// Unique in the run, in invocation order per client.
    pub id: u64,
    pub workload: Workload,
    pub client: u32,
    pub key: String,
    pub call: Call,
    pub invoke: Nanos,
    /// When the answer (or the giving up) happened. For an indeterminate
    /// operation the *effect* may still come later: checkers treat its
    /// completion as infinitely late.
    pub complete: Nanos,
    #[serde(flatten)]
    pub outcome: Outcome,
    /// The node (API endpoint) the request went to.
    pub node: String,
    /// A read sent with `consistency=stale` (`--stale-reads`): it may show
    /// any state the key had before it completed, and is checked as such.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stale: bool,
}

impl Op {
    /// One line for reports: `#12 c3 read k → value 5 v4 [1.203s–1.210s] via …`.
    pub fn describe(&self) -> String {
        let call = match self.call {
            Call::Read => "read".to_string(),
            Call::Write { value } => format!("write {value}"),
            Call::Cas { expected, value } => format!("cas v{expected}→{value}"),
            Call::Delete => "delete".to_string(),
            Call::CasDelete { expected } => format!("delete if v{expected}"),
            Call::Scan => "scan from".to_string(),
            Call::ReadAll => "read all accounts".to_string(),
            Call::Transfer { from, to, amount } => format!("transfer {amount} from {from} to {to}"),
        };
        let call = if self.stale { format!("stale {call}") } else { call };
        let outcome = match &self.outcome {
            Outcome::Ok { ret } => match ret {
                Ret::NotFound => "not found".to_string(),
                Ret::Value { value, version } => format!("value {value} v{version}"),
                Ret::Written { version } => format!("ok v{version}"),
                Ret::Conflict { current: Some(c) } => format!("conflict (current v{c})"),
                Ret::Conflict { current: None } => "conflict".to_string(),
                Ret::Unparsable { text } => format!("unparsable value {text:?}"),
                Ret::Balances { balances } => format!("balances {balances:?}"),
                Ret::Txn { succeeded } => format!("succeeded {succeeded}"),
                Ret::Scanned { pages } => {
                    let ours: usize = pages.iter().map(|p| p.ours.len()).sum();
                    format!("{} pages, {ours} keys of the scan workload", pages.len())
                }
            },
            Outcome::Failed { reason } => format!("FAILED ({reason})"),
            Outcome::Indeterminate { reason } => format!("INDETERMINATE ({reason})"),
        };
        format!(
            "#{} c{} {} {:?} → {} [{:.3}s–{:.3}s] via {}",
            self.id,
            self.client,
            call,
            self.key,
            outcome,
            self.invoke as f64 / 1e9,
            self.complete as f64 / 1e9,
            self.node
        )
    }
}

/// Collects operations from concurrent clients. Cheap to share (`Arc`).
pub struct Recorder {
    start: Instant,
    next_id: AtomicU64,
    ops: Mutex<Vec<Op>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    pub fn new() -> Self {
        Recorder { start: Instant::now(), next_id: AtomicU64::new(1), ops: Mutex::new(Vec::new()) }
    }

    /// Now, on the history's clock.
    pub fn now(&self) -> Nanos {
        self.start.elapsed().as_nanos() as Nanos
    }

    /// A fresh operation id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Adds a completed operation.
    pub fn record(&self, op: Op) {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).push(op);
    }

    /// Every operation recorded so far, ordered by invocation.
    pub fn snapshot(&self) -> Vec<Op> {
        let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner()).clone();
        ops.sort_by_key(|o| (o.invoke, o.id));
        ops
    }
}

/// Counts of outcomes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct OpCounts {
    pub total: u64,
    pub ok: u64,
    pub failed: u64,
    pub indeterminate: u64,
}

impl OpCounts {
    pub fn add(&mut self, outcome: &Outcome) {
        self.total += 1;
        match outcome {
            Outcome::Ok { .. } => self.ok += 1,
            Outcome::Failed { .. } => self.failed += 1,
            Outcome::Indeterminate { .. } => self.indeterminate += 1,
        }
    }

    pub fn of<'a>(ops: impl IntoIterator<Item = &'a Op>) -> OpCounts {
        let mut c = OpCounts::default();
        for op in ops {
            c.add(&op.outcome);
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_round_trip_through_json_lines() {
        let op = Op {
            id: 7,
            workload: Workload::Register,
            client: 2,
            key: "ab/reg/1".into(),
            call: Call::Cas { expected: 3, value: 9 },
            invoke: 10,
            complete: 20,
            outcome: Outcome::ok(Ret::Conflict { current: Some(4) }),
            node: "http://127.0.0.1:1".into(),
            stale: false,
        };
        let line = serde_json::to_string(&op).unwrap();
        assert_eq!(serde_json::from_str::<Op>(&line).unwrap(), op);
        assert!(op.describe().contains("conflict (current v4)"), "{}", op.describe());
        assert!(!line.contains("stale"), "not written when false: {line}");
        let stale = Op { call: Call::Read, stale: true, ..op };
        let line = serde_json::to_string(&stale).unwrap();
        assert_eq!(serde_json::from_str::<Op>(&line).unwrap(), stale);
        assert!(stale.describe().contains("stale read"), "{}", stale.describe());
    }

    #[test]
    fn counts_split_by_outcome() {
        let mk = |outcome| Op {
            id: 1,
            workload: Workload::Set,
            client: 0,
            key: "k".into(),
            call: Call::Read,
            invoke: 0,
            complete: 1,
            outcome,
            node: String::new(),
            stale: false,
        };
        let ops = [
            mk(Outcome::ok(Ret::NotFound)),
            mk(Outcome::Failed { reason: "503".into() }),
            mk(Outcome::Indeterminate { reason: "timeout".into() }),
        ];
        assert_eq!(OpCounts::of(&ops), OpCounts { total: 3, ok: 1, failed: 1, indeterminate: 1 });
    }
}
