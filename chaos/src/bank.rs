//! The bank workload: money moves between accounts that lie on different
//! shards, through transactions, while transactions that read every account
//! check that none was made or lost.
//!
//! [`ACCOUNTS`] accounts of [`OPENING`] each are opened by one transaction
//! (every client tries; the comparison "absent" lets exactly one through).
//! Each client then either transfers — reads two accounts in one
//! transaction, then moves a random amount if neither changed since — or
//! reads every account in one transaction. Only the latter are checked:
//! every one that was answered must see every account, and balances that
//! add up to the opening total. A transfer whose answer was lost may have
//! happened or not, but never half: the total holds either way. After the
//! run the runner reads every account once more ([`read_all_op`]), so a
//! run whose transactions all failed still checks the final state.

use serde_json::{json, Value};

use crate::history::{Call, Op, Outcome, Ret, Workload};
use crate::workload::key;

/// Accounts in the bank.
pub const ACCOUNTS: u32 = 8;
/// Each account's opening balance.
pub const OPENING: i64 = 100;

/// Account `i`'s key in run `run` (spread over the key space, so splits
/// put the accounts on several shards).
pub fn account(run: &str, i: u32) -> String {
    key(run, Workload::Bank, &format!("a{i}"))
}

fn get(key: String) -> Value {
    json!({"op": "get", "key": key})
}

/// The transaction that opens every account if none exists.
pub fn open_body(run: &str) -> Value {
    json!({
        "compare": (0..ACCOUNTS).map(|i| json!({"key": account(run, i), "version": 0})).collect::<Vec<_>>(),
        "success": (0..ACCOUNTS).map(|i| json!({"op": "put", "key": account(run, i), "value": OPENING})).collect::<Vec<_>>(),
    })
}

/// The transaction reading every account.
pub fn read_all_body(run: &str) -> Value {
    json!({ "success": (0..ACCOUNTS).map(|i| get(account(run, i))).collect::<Vec<_>>() })
}

/// The transaction reading accounts `a` and `b`.
pub fn read_two_body(run: &str, a: u32, b: u32) -> Value {
    json!({ "success": [get(account(run, a)), get(account(run, b))] })
}

/// `(version, balance)` of each get result of a transaction's answer
/// (`None`: absent, or not a number).
pub fn balances(answer: &Value) -> Vec<Option<(u64, i64)>> {
    answer["results"]
        .as_array()
        .map(|rs| rs.iter().map(|r| Some((r["version"].as_u64()?, r["value"].as_i64()?))).collect())
        .unwrap_or_default()
}

/// The transaction moving `amount` from `from` to `to`, given what a read
/// of both returned.
pub fn transfer_body(run: &str, (from, to, amount): (u32, u32, i64), seen: [(u64, i64); 2]) -> Value {
    let (a, b) = (account(run, from), account(run, to));
    json!({
        "compare": [{"key": a, "version": seen[0].0}, {"key": b, "version": seen[1].0}],
        "success": [{"op": "put", "key": a, "value": seen[0].1 - amount}, {"op": "put", "key": b, "value": seen[1].1 + amount}],
    })
}

/// The outcome of a [`Call::ReadAll`] answer.
pub fn read_all_outcome(answer: Result<Value, Outcome>) -> Outcome {
    match answer {
        Ok(v) => Outcome::ok(Ret::Balances { balances: balances(&v).into_iter().map(|b| b.map(|(_, n)| n)).collect() }),
        // Reading changes nothing: whatever went wrong, nothing happened.
        Err(Outcome::Indeterminate { reason } | Outcome::Failed { reason }) => Outcome::Failed { reason },
        Err(o) => o,
    }
}

/// What the bank checker found.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct BankReport {
    /// Reads of every account that were answered (all checked).
    pub reads: u64,
    /// Transfers that moved money (answered `succeeded: true`).
    pub transfers: u64,
    /// The reads that saw another total, or a missing account.
    pub wrong: Vec<Op>,
}

/// Checks the bank workload's operations.
pub fn check_bank(ops: &[&Op]) -> BankReport {
    let mut r = BankReport::default();
    let total = OPENING * ACCOUNTS as i64;
    for op in ops {
        match (&op.call, op.outcome.ret()) {
            (Call::ReadAll, Some(Ret::Balances { balances })) => {
                r.reads += 1;
                let whole = balances.len() == ACCOUNTS as usize && balances.iter().all(Option::is_some);
                if !whole || balances.iter().flatten().sum::<i64>() != total {
                    r.wrong.push((*op).clone());
                }
            }
            (Call::Transfer { .. }, Some(Ret::Txn { succeeded: true })) => r.transfers += 1,
            _ => {}
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(id: u64, balances: Vec<Option<i64>>) -> Op {
        Op {
            id,
            workload: Workload::Bank,
            client: 1,
            key: "bank".into(),
            call: Call::ReadAll,
            invoke: id,
            complete: id + 1,
            outcome: Outcome::ok(Ret::Balances { balances }),
            node: String::new(),
            stale: false,
        }
    }

    #[test]
    fn every_read_must_see_every_account_and_the_opening_total() {
        let even = vec![Some(OPENING); ACCOUNTS as usize];
        let mut moved = even.clone();
        moved[0] = Some(OPENING - 7);
        moved[5] = Some(OPENING + 7);
        let mut lost = even.clone();
        lost[3] = Some(OPENING - 1);
        let mut missing = even.clone();
        missing[2] = None;
        let ops = [read(1, even), read(2, moved), read(3, lost), read(4, missing), read(5, vec![Some(800)])];
        let r = check_bank(&ops.iter().collect::<Vec<_>>());
        assert_eq!(r.reads, 5);
        assert_eq!(r.wrong.iter().map(|o| o.id).collect::<Vec<_>>(), vec![3, 4, 5]);
    }

    #[test]
    fn answers_are_read_into_balances() {
        let v = json!({"succeeded": true, "results": [{"key": "a", "value": 5, "version": 2}, {"key": "b", "found": false}]});
        assert_eq!(balances(&v), vec![Some((2, 5)), None]);
        let t = transfer_body("r", (0, 1, 3), [(2, 5), (4, 10)]);
        assert_eq!(t["success"][0]["value"], 2);
        assert_eq!(t["success"][1]["value"], 13);
        assert_eq!(t["compare"][1]["version"], 4);
        assert!(matches!(read_all_outcome(Err(Outcome::Indeterminate { reason: "x".into() })), Outcome::Failed { .. }));
    }
}
