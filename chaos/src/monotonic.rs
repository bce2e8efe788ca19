//! The monotonic workload's checker: a client never sees a key's version go
//! down.
//!
//! CleaveDB promises that a key's version grows with every write and never
//! goes backwards. One client issues its operations one after another, so
//! the versions it observes for one key (read answers, and the versions its
//! own acknowledged writes created) must never decrease, and a key it has
//! seen must not become "not found" again (keys are never deleted here).
//! This catches stale reads served by a deposed leader or a lagging replica
//! even where the register checker's keys do not reach. Reads made with
//! `consistency=stale` (`--stale-reads`) promise no such thing and are left
//! out by [`crate::check`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::history::{Op, Outcome, Ret};

/// One place where a client saw a version go down.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Regression {
    pub client: u32,
    pub key: String,
    /// The earlier operation, which saw the higher version, and the later one.
    pub earlier: Op,
    pub later: Op,
}

/// The version an operation observed, if it observed one (0: absent).
fn observed(op: &Op) -> Option<u64> {
    match &op.outcome {
        Outcome::Ok { ret: Ret::Value { version, .. } | Ret::Written { version } } => Some(*version),
        Outcome::Ok { ret: Ret::NotFound } => Some(0),
        Outcome::Ok { ret: Ret::Conflict { current: Some(c) } } => Some(*c),
        _ => None,
    }
}

/// Checks every client's sequence of operations per key.
pub fn check_monotonic(ops: &[&Op]) -> Vec<Regression> {
    let mut seqs: BTreeMap<(u32, &str), Vec<&Op>> = BTreeMap::new();
    for op in ops {
        seqs.entry((op.client, op.key.as_str())).or_default().push(op);
    }
    let mut found = Vec::new();
    for ((client, key), mut seq) in seqs {
        seq.sort_by_key(|o| (o.invoke, o.id));
        let mut best: Option<(u64, &Op)> = None;
        for op in seq {
            let Some(v) = observed(op) else { continue };
            match best {
                Some((b, earlier)) if v < b => {
                    found.push(Regression {
                        client,
                        key: key.to_string(),
                        earlier: earlier.clone(),
                        later: op.clone(),
                    });
                }
                Some((b, _)) if v == b => {}
                _ => best = Some((v, op)),
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Call, Workload};

    fn op(id: u64, client: u32, invoke: u64, ret: Ret) -> Op {
        Op {
            id,
            workload: Workload::Monotonic,
            client,
            key: "m".into(),
            call: Call::Read,
            invoke,
            complete: invoke + 1,
            outcome: Outcome::ok(ret),
            node: String::new(),
            stale: false,
        }
    }

    #[test]
    fn growing_versions_pass_and_a_drop_is_caught() {
        let ops = [
            op(1, 1, 0, Ret::NotFound),
            op(2, 1, 2, Ret::Value { value: 1, version: 1 }),
            op(3, 1, 4, Ret::Written { version: 3 }),
            op(4, 1, 6, Ret::Value { value: 3, version: 3 }),
            // Another client lagging behind client 1 is not a regression.
            op(5, 2, 7, Ret::Value { value: 1, version: 1 }),
        ];
        let refs: Vec<&Op> = ops.iter().collect();
        assert!(check_monotonic(&refs).is_empty());

        let mut more = ops.to_vec();
        more.push(op(6, 1, 8, Ret::Value { value: 1, version: 2 }));
        more.push(op(7, 1, 9, Ret::NotFound));
        let refs: Vec<&Op> = more.iter().collect();
        let r = check_monotonic(&refs);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].earlier.id, r[0].later.id), (3, 6));
        assert_eq!(r[1].later.id, 7);
    }
}
