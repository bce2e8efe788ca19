//! The pure part of a transaction: checking a request against the limits,
//! listing the keys it touches, and deciding it — comparisons, the branch
//! that runs, its results and the writes it makes — from the keys' stored
//! states. No I/O: the single-shard path runs [`evaluate`] inside one apply,
//! the coordinator of a multi-shard transaction runs the same function over
//! the states its locks returned, so both decide alike.

use std::collections::{BTreeMap, HashMap, HashSet};

use cleave_metadata::api::{TxnOpKind, TxnRequest};
use cleave_metadata::MAX_KEY_BYTES;
use serde::{Deserialize, Serialize};

use crate::storage::txn_info::PendingWrite;

/// Most operations in one transaction: comparisons and both branches. (The
/// body is limited as a single write's is: the value limit plus 64 KiB.)
pub const MAX_OPS: usize = 128;

/// One operation of a branch, checked.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `value`: the JSON text, stored verbatim.
    Put {
        key: String,
        value: String,
    },
    Get {
        key: String,
    },
    Delete {
        key: String,
    },
}

impl Op {
    pub fn key_mut(&mut self) -> &mut String {
        match self {
            Op::Put { key, .. } | Op::Get { key } | Op::Delete { key } => key,
        }
    }

    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Get { key } | Op::Delete { key } => key,
        }
    }

    fn writes(&self) -> bool {
        !matches!(self, Op::Get { .. })
    }
}

/// A checked transaction.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Txn {
    /// `(key, version)`: the key's live version must be `version` (0: absent).
    pub compare: Vec<(String, u64)>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

impl Txn {
    /// Every key the transaction names, to change in place (the data API
    /// maps keys under a hash-spread keyspace to their bucketed form).
    pub fn keys_mut(&mut self) -> impl Iterator<Item = &mut String> {
        let compared = self.compare.iter_mut().map(|(k, _)| k);
        compared.chain(self.success.iter_mut().chain(self.failure.iter_mut()).map(Op::key_mut))
    }
}

/// Why a request is not a transaction we run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// 400.
    #[error("{0}")]
    Bad(String),
    /// 413.
    #[error("{0}")]
    TooLarge(String),
}

fn check_key(key: &str, what: &str) -> Result<(), Invalid> {
    if key.is_empty() {
        return Err(Invalid::Bad(format!("{what}: key must not be empty")));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(Invalid::TooLarge(format!("{what}: key is {} bytes; the limit is {MAX_KEY_BYTES}", key.len())));
    }
    Ok(())
}

/// Checks a request: the operation count, every key, every value's size, a
/// value exactly where a put needs one, no key written twice in a branch.
pub fn validate(req: TxnRequest, max_value_bytes: usize) -> Result<Txn, Invalid> {
    let count = req.compare.len() + req.success.len() + req.failure.len();
    if count > MAX_OPS {
        return Err(Invalid::TooLarge(format!(
            "a transaction has at most {MAX_OPS} comparisons and operations, this one {count}"
        )));
    }
    let mut t = Txn::default();
    for (i, c) in req.compare.into_iter().enumerate() {
        check_key(&c.key, &format!("compare[{i}]"))?;
        t.compare.push((c.key, c.version));
    }
    for (name, ops, out) in [("success", req.success, &mut t.success), ("failure", req.failure, &mut t.failure)] {
        let mut written = HashSet::new();
        for (i, op) in ops.into_iter().enumerate() {
            let what = format!("{name}[{i}]");
            check_key(&op.key, &what)?;
            let checked = match (op.op, op.value) {
                (TxnOpKind::Put, Some(v)) => {
                    let value = v.get().to_string();
                    if value.len() > max_value_bytes {
                        return Err(Invalid::TooLarge(format!(
                            "{what}: value is {} bytes of JSON; the limit is {max_value_bytes}",
                            value.len()
                        )));
                    }
                    Op::Put { key: op.key, value }
                }
                (TxnOpKind::Put, None) => return Err(Invalid::Bad(format!("{what}: a put needs a \"value\""))),
                (kind, Some(_)) => {
                    return Err(Invalid::Bad(format!("{what}: a {kind:?} takes no \"value\"").to_lowercase()))
                }
                (TxnOpKind::Get, None) => Op::Get { key: op.key },
                (TxnOpKind::Delete, None) => Op::Delete { key: op.key },
            };
            if checked.writes() && !written.insert(checked.key().to_string()) {
                return Err(Invalid::Bad(format!("{what}: key {:?} is written twice in {name}", checked.key())));
            }
            out.push(checked);
        }
    }
    Ok(t)
}

/// Every key `t` touches, in order, with whether either branch may write it.
pub fn keys(t: &Txn) -> BTreeMap<String, bool> {
    let mut out: BTreeMap<String, bool> = t.compare.iter().map(|(k, _)| (k.clone(), false)).collect();
    for op in t.success.iter().chain(&t.failure) {
        *out.entry(op.key().to_string()).or_default() |= op.writes();
    }
    out
}

/// A key's stored state as a transaction sees it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Stored {
    /// The stored version, a tombstone's included (a write gets this + 1).
    pub version: u64,
    /// The live JSON value; `None` for an absent or deleted key.
    pub value: Option<String>,
}

impl Stored {
    /// The version a comparison sees: 0 for an absent key.
    pub fn live_version(&self) -> u64 {
        if self.value.is_some() {
            self.version
        } else {
            0
        }
    }
}

/// One result of the branch that ran.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A put or delete: the key's new version (0: a delete of an absent
    /// key, which writes nothing).
    Written {
        key: String,
        version: u64,
    },
    Got {
        key: String,
        version: u64,
        value: String,
    },
    Missing {
        key: String,
    },
}

/// A decided transaction.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Decided {
    pub succeeded: bool,
    pub results: Vec<Outcome>,
    /// What it writes, in key order, each key at most once.
    pub writes: Vec<PendingWrite>,
}

/// Decides `t` over the keys' stored states (`read` is asked only for keys
/// of `t`). The branch runs in order: a get after a put of the same key
/// sees the put.
pub fn evaluate(t: &Txn, mut read: impl FnMut(&str) -> Stored) -> Decided {
    let succeeded = t.compare.iter().all(|(k, v)| read(k).live_version() == *v);
    let branch = if succeeded { &t.success } else { &t.failure };
    let mut now: HashMap<&str, Stored> = HashMap::new();
    let mut writes: BTreeMap<String, PendingWrite> = BTreeMap::new();
    let mut results = Vec::with_capacity(branch.len());
    for op in branch {
        let key = op.key();
        let cur = match now.get(key) {
            Some(s) => s.clone(),
            None => read(key),
        };
        let (result, next) = match op {
            Op::Get { .. } => match &cur.value {
                Some(v) => (Outcome::Got { key: key.into(), version: cur.version, value: v.clone() }, None),
                None => (Outcome::Missing { key: key.into() }, None),
            },
            Op::Put { value, .. } => {
                let next = Stored { version: cur.version + 1, value: Some(value.clone()) };
                (Outcome::Written { key: key.into(), version: next.version }, Some(next))
            }
            Op::Delete { .. } if cur.value.is_none() => (Outcome::Written { key: key.into(), version: 0 }, None),
            Op::Delete { .. } => {
                let next = Stored { version: cur.version + 1, value: None };
                (Outcome::Written { key: key.into(), version: next.version }, Some(next))
            }
        };
        if let Some(next) = next {
            writes.insert(
                key.to_string(),
                PendingWrite { key: key.to_string(), version: next.version, value: next.value.clone() },
            );
            now.insert(key, next);
        }
        results.push(result);
    }
    Decided { succeeded, results, writes: writes.into_values().collect() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cleave_metadata::api::{TxnCompare, TxnOp};
    use serde_json::value::RawValue;

    fn op(kind: TxnOpKind, key: &str, value: Option<&str>) -> TxnOp {
        TxnOp { op: kind, key: key.into(), value: value.map(|v| RawValue::from_string(v.into()).unwrap()) }
    }

    fn stored(pairs: &[(&str, u64, Option<&str>)]) -> impl FnMut(&str) -> Stored {
        let m: HashMap<String, Stored> = pairs
            .iter()
            .map(|(k, v, j)| (k.to_string(), Stored { version: *v, value: j.map(str::to_string) }))
            .collect();
        move |k| m.get(k).cloned().unwrap_or_default()
    }

    #[test]
    fn the_branch_follows_the_comparisons_and_runs_in_order() {
        let t = Txn {
            compare: vec![("a".into(), 7), ("b".into(), 0)],
            success: vec![
                Op::Put { key: "a".into(), value: "90".into() },
                Op::Get { key: "a".into() },
                Op::Put { key: "b".into(), value: "10".into() },
                Op::Delete { key: "c".into() },
                Op::Delete { key: "nothing".into() },
                Op::Get { key: "c".into() },
            ],
            failure: vec![Op::Get { key: "a".into() }],
        };
        let d = evaluate(&t, stored(&[("a", 7, Some("100")), ("b", 4, None), ("c", 2, Some("1"))]));
        assert!(d.succeeded, "b's tombstone counts as absent");
        assert_eq!(
            d.results,
            vec![
                Outcome::Written { key: "a".into(), version: 8 },
                Outcome::Got { key: "a".into(), version: 8, value: "90".into() },
                Outcome::Written { key: "b".into(), version: 5 },
                Outcome::Written { key: "c".into(), version: 3 },
                Outcome::Written { key: "nothing".into(), version: 0 },
                Outcome::Missing { key: "c".into() },
            ]
        );
        let w = |k: &str, version, value: Option<&str>| PendingWrite {
            key: k.into(),
            version,
            value: value.map(str::to_string),
        };
        assert_eq!(d.writes, vec![w("a", 8, Some("90")), w("b", 5, Some("10")), w("c", 3, None)]);

        let d = evaluate(&t, stored(&[("a", 6, Some("100"))]));
        assert!(!d.succeeded);
        assert_eq!(d.results, vec![Outcome::Got { key: "a".into(), version: 6, value: "100".into() }]);
        assert!(d.writes.is_empty());
    }

    #[test]
    fn keys_know_which_may_be_written() {
        let t = Txn {
            compare: vec![("x".into(), 1)],
            success: vec![Op::Get { key: "y".into() }, Op::Put { key: "x".into(), value: "1".into() }],
            failure: vec![Op::Delete { key: "z".into() }, Op::Get { key: "y".into() }],
        };
        let k: Vec<_> = keys(&t).into_iter().collect();
        assert_eq!(k, vec![("x".into(), true), ("y".into(), false), ("z".into(), true)]);
    }

    #[test]
    fn bad_requests_are_refused_with_the_right_kind() {
        let req = |success: Vec<TxnOp>| TxnRequest { compare: vec![], success, failure: vec![] };
        let bad = |r| matches!(validate(r, 100), Err(Invalid::Bad(_)));
        let large = |r| matches!(validate(r, 100), Err(Invalid::TooLarge(_)));
        assert!(bad(req(vec![op(TxnOpKind::Put, "k", None)])), "put without a value");
        assert!(bad(req(vec![op(TxnOpKind::Get, "k", Some("1"))])), "get with a value");
        assert!(bad(req(vec![op(TxnOpKind::Get, "", None)])), "empty key");
        assert!(bad(req(vec![op(TxnOpKind::Put, "k", Some("1")), op(TxnOpKind::Delete, "k", None)])), "twice");
        assert!(large(req(vec![op(TxnOpKind::Put, "k", Some(&format!("\"{}\"", "x".repeat(100))))])));
        assert!(large(req(vec![op(TxnOpKind::Get, &"k".repeat(MAX_KEY_BYTES + 1), None)])));
        assert!(large(req((0..=MAX_OPS).map(|i| op(TxnOpKind::Get, &format!("k{i}"), None)).collect())));
        let many = TxnRequest {
            compare: vec![TxnCompare { key: "k".into(), version: 1 }],
            success: vec![op(TxnOpKind::Get, "k", None), op(TxnOpKind::Put, "k", Some("1"))],
            failure: vec![op(TxnOpKind::Put, "k", Some("2"))],
        };
        let t = validate(many, 100).expect("a get and a put of one key, and the same key in the other branch");
        assert_eq!(t.failure, vec![Op::Put { key: "k".into(), value: "2".into() }]);
    }
}
