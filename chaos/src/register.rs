//! The register workloads' model and per-key linearizability check.
//!
//! A CleaveDB key behaves as a register of (value, version): every write,
//! conditional or not, replaces the value and bumps the version by one, and
//! the version is part of every answer. Modelling the version (not just the
//! value) makes the check much sharper than a plain register: a write's
//! answer says exactly how many writes came before it, and a compare-and-set
//! (`if_version`) succeeds only if the version matches.
//!
//! Deletes are writes too: a delete of a live key leaves a tombstone with
//! the next version (its answer), after which reads answer 404 and the next
//! write continues from the tombstone's version. So the model keeps the
//! version of an absent key, and a flag for whether it exists. What the
//! server compares `if_version` with is the *live* version (0 when absent,
//! tombstone or not), and a 409 reports that live version. A delete of an
//! absent key answers 404, or 409 (current 0) when it asked for a version
//! other than 0.
//!
//! Written values are unique in the run, so a read's value identifies the
//! write it observed, and a value nobody wrote cannot be explained at all.
//!
//! A read made with `consistency=stale` (`--stale-reads`, recorded in the
//! history) promises less: it may show any state the key had before it
//! completed. It is checked as exactly that, by letting it take effect
//! anywhere from the start of the history until its completion.

use serde::{Deserialize, Serialize};

use crate::history::{Call, Nanos, Op, Outcome, Ret};
use crate::linearizability::{self, Event, Model, Verdict};

/// The register's state. `version` counts every write of the key, deletes
/// included; `exists` is false before the first write and after a delete
/// (then `value == 0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RegisterState {
    pub value: u64,
    pub version: u64,
    #[serde(default)]
    pub exists: bool,
}

impl RegisterState {
    /// The version `if_version` is compared with: 0 for an absent key.
    fn live(&self) -> u64 {
        if self.exists {
            self.version
        } else {
            0
        }
    }
}

/// The sequential specification of one key.
pub struct RegisterModel;

impl Model for RegisterModel {
    type Call = Call;
    type Ret = Ret;
    type State = RegisterState;

    fn init(&self) -> RegisterState {
        RegisterState { value: 0, version: 0, exists: false }
    }

    fn step(&self, s: &RegisterState, call: &Call, ret: Option<&Ret>) -> Option<RegisterState> {
        let written = |value: u64| RegisterState { value, version: s.version + 1, exists: true };
        let deleted = RegisterState { value: 0, version: s.version + 1, exists: false };
        let next = s.version + 1;
        match (call, ret) {
            (Call::Read, None) => Some(*s),
            (Call::Read, Some(Ret::NotFound)) => (!s.exists).then_some(*s),
            (Call::Read, Some(Ret::Value { value, version })) => {
                (s.exists && s.value == *value && s.version == *version).then_some(*s)
            }
            (Call::Write { value }, None) => Some(written(*value)),
            (Call::Write { value }, Some(Ret::Written { version })) => (*version == next).then_some(written(*value)),
            // Unknown answer: if the condition held it applied, else it was a no-op.
            (Call::Cas { expected, value }, None) => Some(if s.live() == *expected { written(*value) } else { *s }),
            (Call::Cas { expected, value }, Some(Ret::Written { version })) => {
                (s.live() == *expected && *version == next).then_some(written(*value))
            }
            (Call::Cas { expected, .. } | Call::CasDelete { expected }, Some(Ret::Conflict { current })) => {
                (s.live() != *expected && current.is_none_or(|c| c == s.live())).then_some(*s)
            }
            (Call::Delete, None) => Some(if s.exists { deleted } else { *s }),
            (Call::Delete, Some(Ret::Written { version })) => (s.exists && *version == next).then_some(deleted),
            (Call::Delete, Some(Ret::NotFound)) => (!s.exists).then_some(*s),
            (Call::CasDelete { expected }, None) => Some(if s.exists && s.version == *expected { deleted } else { *s }),
            (Call::CasDelete { expected }, Some(Ret::Written { version })) => {
                (s.exists && s.version == *expected && *version == next).then_some(deleted)
            }
            (Call::CasDelete { expected }, Some(Ret::NotFound)) => (!s.exists && *expected == 0).then_some(*s),
            _ => None,
        }
    }
}

/// The events the checker needs from one key's operations: failed operations
/// are left out (they had no effect) and so are indeterminate reads (they
/// constrain nothing). Returns the events and, for each, its operation.
pub fn events_of<'a>(ops: &[&'a Op]) -> (Vec<Event<Call, Ret>>, Vec<&'a Op>) {
    let mut events = Vec::new();
    let mut origin = Vec::new();
    for &op in ops {
        if op.call == Call::Scan {
            continue;
        }
        // A stale read may show any earlier state: it may take effect from
        // the start of the history on.
        let invoke = if op.stale && op.call == Call::Read { 0 } else { op.invoke };
        let event = match &op.outcome {
            Outcome::Failed { .. } => continue,
            Outcome::Indeterminate { .. } if op.call == Call::Read => continue,
            Outcome::Indeterminate { .. } => Event { call: op.call, ret: None, invoke, complete: None },
            Outcome::Ok { ret } => Event { call: op.call, ret: Some(ret.clone()), invoke, complete: Some(op.complete) },
        };
        events.push(event);
        origin.push(op);
    }
    (events, origin)
}

/// The result of checking one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyVerdict {
    Linearizable,
    /// Not linearizable: an explanation and the operations around the point
    /// where every linearization failed (failed operations of the key
    /// included, marked as such, since a "failed" write that did apply is a
    /// classic cause).
    Violation {
        message: String,
        ops: Vec<Op>,
    },
    /// The search ran out of budget.
    Unknown {
        states: usize,
    },
}

/// Most operations shown in a violation's sub-history.
const MAX_SHOWN: usize = 40;

/// Checks one key's operations (any order) for linearizability.
pub fn check_key(ops: &[&Op], max_states: usize) -> KeyVerdict {
    let (events, origin) = events_of(ops);
    match linearizability::check(&RegisterModel, &events, max_states) {
        Verdict::Linearizable => KeyVerdict::Linearizable,
        Verdict::Unknown { states } => KeyVerdict::Unknown { states },
        Verdict::NotLinearizable(f) => {
            let stuck = origin[f.stuck];
            let state = if f.state.version == 0 {
                "absent".to_string()
            } else if !f.state.exists {
                format!("deleted at v{}", f.state.version)
            } else {
                format!("value {} v{}", f.state.value, f.state.version)
            };
            let message = format!(
                "no linearization: after the longest linearizable prefix ({} ops) the key is {state}, and {} \
                 cannot be placed before it completes",
                f.prefix.len(),
                stuck.describe()
            );
            // Window: from the completion of the last few operations of the
            // prefix up to the stuck operation's completion.
            let mut prefix_ends: Vec<Nanos> =
                f.prefix.iter().map(|&i| origin[i].complete).filter(|&c| c <= stuck.invoke).collect();
            prefix_ends.sort_unstable();
            let from = prefix_ends.iter().rev().nth(3).copied().unwrap_or(0).min(stuck.invoke);
            let to = stuck.complete;
            let mut shown: Vec<Op> = ops
                .iter()
                .filter(|o| o.invoke <= to && (o.complete >= from || o.outcome.is_indeterminate()))
                .map(|o| (*o).clone())
                .collect();
            shown.sort_by_key(|o| (o.invoke, o.id));
            if shown.len() > MAX_SHOWN {
                // Keep the stuck operation in view: the ones closest before it.
                let at = shown.iter().position(|o| o.id == stuck.id).unwrap_or(shown.len() - 1);
                let end = (at + 1).max(MAX_SHOWN).min(shown.len());
                shown = shown[end - MAX_SHOWN..end].to_vec();
            }
            KeyVerdict::Violation { message, ops: shown }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Workload;

    /// Builds ops from `(client, call, invoke, complete, outcome)`.
    fn ops(spec: &[(u32, Call, Nanos, Nanos, Outcome)]) -> Vec<Op> {
        spec.iter()
            .enumerate()
            .map(|(i, (client, call, invoke, complete, outcome))| Op {
                id: i as u64 + 1,
                workload: Workload::Register,
                client: *client,
                key: "k".into(),
                call: *call,
                invoke: *invoke,
                complete: *complete,
                outcome: outcome.clone(),
                node: "n1".into(),
                stale: false,
            })
            .collect()
    }

    fn ok(ret: Ret) -> Outcome {
        Outcome::ok(ret)
    }

    fn verdict(spec: &[(u32, Call, Nanos, Nanos, Outcome)]) -> KeyVerdict {
        let ops = ops(spec);
        let refs: Vec<&Op> = ops.iter().collect();
        check_key(&refs, 100_000)
    }

    fn unknown() -> Outcome {
        Outcome::Indeterminate { reason: "timeout".into() }
    }

    fn failed() -> Outcome {
        Outcome::Failed { reason: "503".into() }
    }

    use Call::*;
    use Ret::*;

    #[test]
    fn writes_reads_and_cas_in_order_pass() {
        let v = verdict(&[
            (1, Read, 0, 1, ok(NotFound)),
            (1, Cas { expected: 0, value: 10 }, 2, 3, ok(Written { version: 1 })),
            (2, Read, 4, 5, ok(Value { value: 10, version: 1 })),
            (2, Write { value: 11 }, 6, 7, ok(Written { version: 2 })),
            (1, Cas { expected: 1, value: 12 }, 8, 9, ok(Conflict { current: Some(2) })),
            (1, Cas { expected: 2, value: 12 }, 10, 11, ok(Written { version: 3 })),
            (2, Read, 12, 13, ok(Value { value: 12, version: 3 })),
        ]);
        assert_eq!(v, KeyVerdict::Linearizable);
    }

    #[test]
    fn concurrent_writes_may_order_either_way() {
        let v = verdict(&[
            (1, Write { value: 1 }, 0, 10, ok(Written { version: 2 })),
            (2, Write { value: 2 }, 1, 9, ok(Written { version: 1 })),
            (3, Read, 11, 12, ok(Value { value: 1, version: 2 })),
        ]);
        assert_eq!(v, KeyVerdict::Linearizable);
    }

    #[test]
    fn stale_read_is_caught() {
        let v = verdict(&[
            (1, Write { value: 1 }, 0, 1, ok(Written { version: 1 })),
            (1, Write { value: 2 }, 2, 3, ok(Written { version: 2 })),
            (2, Read, 4, 5, ok(Value { value: 1, version: 1 })),
        ]);
        let KeyVerdict::Violation { message, ops } = v else { panic!("stale read not caught: {v:?}") };
        assert!(message.contains("value 1 v1"), "{message}");
        assert!(message.contains("value 2 v2"), "{message}");
        assert_eq!(ops.len(), 3);
    }

    #[test]
    fn lost_write_is_caught() {
        // An acknowledged write that a later read does not see.
        let v = verdict(&[(1, Write { value: 1 }, 0, 1, ok(Written { version: 1 })), (2, Read, 2, 3, ok(NotFound))]);
        assert!(matches!(v, KeyVerdict::Violation { .. }), "{v:?}");
    }

    #[test]
    fn impossible_cas_is_caught() {
        // Both CAS from version 1 succeed: only one could have.
        let v = verdict(&[
            (1, Write { value: 1 }, 0, 1, ok(Written { version: 1 })),
            (1, Cas { expected: 1, value: 2 }, 2, 5, ok(Written { version: 2 })),
            (2, Cas { expected: 1, value: 3 }, 2, 5, ok(Written { version: 2 })),
        ]);
        assert!(matches!(v, KeyVerdict::Violation { .. }), "{v:?}");
        // A CAS that reports a conflict while the version matched.
        let v = verdict(&[
            (1, Write { value: 1 }, 0, 1, ok(Written { version: 1 })),
            (1, Cas { expected: 1, value: 2 }, 2, 3, ok(Conflict { current: Some(1) })),
        ]);
        assert!(matches!(v, KeyVerdict::Violation { .. }), "{v:?}");
    }

    #[test]
    fn version_skip_needs_a_write() {
        // v1 then v3 with nothing in between: a write is missing from the
        // history, unless an indeterminate one explains it.
        let skip = [
            (1, Write { value: 1 }, 0, 1, ok(Written { version: 1 })),
            (2, Write { value: 3 }, 4, 5, ok(Written { version: 3 })),
        ];
        assert!(matches!(verdict(&skip), KeyVerdict::Violation { .. }));
        let mut explained = skip.to_vec();
        explained.push((3, Write { value: 2 }, 2, 3, unknown()));
        assert_eq!(verdict(&explained), KeyVerdict::Linearizable);
        // A *failed* write cannot explain it.
        let mut failed_one = skip.to_vec();
        failed_one.push((3, Write { value: 2 }, 2, 3, failed()));
        assert!(matches!(verdict(&failed_one), KeyVerdict::Violation { .. }));
    }

    #[test]
    fn indeterminate_write_may_show_up_much_later_or_never() {
        let v = verdict(&[
            (1, Write { value: 1 }, 0, 1, unknown()),
            (2, Read, 10, 11, ok(NotFound)),
            (2, Read, 20, 21, ok(Value { value: 1, version: 1 })),
        ]);
        assert_eq!(v, KeyVerdict::Linearizable);
        let v = verdict(&[(1, Write { value: 1 }, 0, 1, unknown()), (2, Read, 10, 11, ok(NotFound))]);
        assert_eq!(v, KeyVerdict::Linearizable);
        // But not before it was invoked.
        let v =
            verdict(&[(2, Read, 0, 1, ok(Value { value: 1, version: 1 })), (1, Write { value: 1 }, 5, 6, unknown())]);
        assert!(matches!(v, KeyVerdict::Violation { .. }));
    }

    #[test]
    fn a_replayed_put_is_caught() {
        // Issue 23: A's put(x,1) applies at v1 and its answer is lost; a
        // reader sees (1, v1); B's put(x,2) is acknowledged at v2; A's client
        // replays the put, which applies at v3 and answers Ok(v3); a reader
        // sees (1, v3).
        let replayed = [
            (1, Write { value: 1 }, 0, 10, ok(Written { version: 3 })),
            (3, Read, 1, 2, ok(Value { value: 1, version: 1 })),
            (2, Write { value: 2 }, 3, 4, ok(Written { version: 2 })),
            (3, Read, 11, 12, ok(Value { value: 1, version: 3 })),
        ];
        assert!(matches!(verdict(&replayed), KeyVerdict::Violation { .. }), "{:?}", verdict(&replayed));
        // The same history as an honest client reports it (A's put
        // indeterminate): still no linearization, the put took effect twice.
        let mut reported = replayed.to_vec();
        reported[0].4 = unknown();
        assert!(matches!(verdict(&reported), KeyVerdict::Violation { .. }), "{:?}", verdict(&reported));
        // Without the replay the reader sees B's write, and all is well.
        reported[3].4 = ok(Value { value: 2, version: 2 });
        assert_eq!(verdict(&reported), KeyVerdict::Linearizable);
    }

    #[test]
    fn deletes_leave_a_version_and_a_replayed_delete_is_caught() {
        let v = verdict(&[
            (1, Write { value: 1 }, 0, 1, ok(Written { version: 1 })),
            (1, Delete, 2, 3, ok(Written { version: 2 })),
            (2, Read, 4, 5, ok(NotFound)),
            (2, Delete, 6, 7, ok(NotFound)),
            (2, CasDelete { expected: 0 }, 8, 9, ok(NotFound)),
            (2, CasDelete { expected: 2 }, 10, 11, ok(Conflict { current: Some(0) })),
            (1, Cas { expected: 0, value: 3 }, 12, 13, ok(Written { version: 3 })),
            (2, Read, 14, 15, ok(Value { value: 3, version: 3 })),
            (2, CasDelete { expected: 2 }, 16, 17, ok(Conflict { current: Some(3) })),
            (2, CasDelete { expected: 3 }, 18, 19, ok(Written { version: 4 })),
            (1, Write { value: 5 }, 20, 21, ok(Written { version: 5 })),
        ]);
        assert_eq!(v, KeyVerdict::Linearizable);
        // A's delete applies at v2 (answer lost), a reader sees nothing, B's
        // put is acknowledged at v3, A's replay deletes it at v4 and answers
        // 200: no linearization.
        let replayed = [
            (1, Write { value: 1 }, 0, 1, ok(Written { version: 1 })),
            (1, Delete, 2, 20, ok(Written { version: 4 })),
            (3, Read, 3, 4, ok(NotFound)),
            (2, Write { value: 2 }, 5, 6, ok(Written { version: 3 })),
            (3, Read, 21, 22, ok(NotFound)),
        ];
        assert!(matches!(verdict(&replayed), KeyVerdict::Violation { .. }), "{:?}", verdict(&replayed));
        // A delete of a deleted key does not bump the version.
        let v = verdict(&[
            (1, Write { value: 1 }, 0, 1, ok(Written { version: 1 })),
            (1, Delete, 2, 3, ok(Written { version: 2 })),
            (1, Delete, 4, 5, ok(Written { version: 3 })),
        ]);
        assert!(matches!(v, KeyVerdict::Violation { .. }), "{v:?}");
        // An indeterminate delete may explain a read of nothing, or not have happened.
        let v = verdict(&[
            (1, Write { value: 1 }, 0, 1, ok(Written { version: 1 })),
            (1, Delete, 2, 3, unknown()),
            (2, Read, 4, 5, ok(Value { value: 1, version: 1 })),
            (2, Read, 6, 7, ok(NotFound)),
            (1, Write { value: 2 }, 8, 9, ok(Written { version: 3 })),
        ]);
        assert_eq!(v, KeyVerdict::Linearizable);
    }

    #[test]
    fn stale_reads_may_be_old_but_not_from_the_future() {
        let spec = |stale_read: Ret| {
            let ops = ops(&[
                (1, Write { value: 1 }, 0, 1, ok(Written { version: 1 })),
                (1, Write { value: 2 }, 2, 3, ok(Written { version: 2 })),
                (2, Read, 4, 5, ok(stale_read)),
                (1, Write { value: 3 }, 6, 7, ok(Written { version: 3 })),
            ]);
            let mut stale = ops.clone();
            stale[2].stale = true;
            let check = |ops: &[Op]| check_key(&ops.iter().collect::<Vec<_>>(), 100_000);
            (check(&ops), check(&stale))
        };
        let (linearizable, stale) = spec(Value { value: 1, version: 1 });
        assert!(matches!(linearizable, KeyVerdict::Violation { .. }), "{linearizable:?}");
        assert_eq!(stale, KeyVerdict::Linearizable, "a stale read may show an older state");
        let (_, stale) = spec(NotFound);
        assert_eq!(stale, KeyVerdict::Linearizable, "even the state before the first write");
        let (_, stale) = spec(Value { value: 3, version: 3 });
        assert!(matches!(stale, KeyVerdict::Violation { .. }), "a write invoked after the read: {stale:?}");
        let (_, stale) = spec(Value { value: 1, version: 2 });
        assert!(matches!(stale, KeyVerdict::Violation { .. }), "a state that never was: {stale:?}");
    }

    #[test]
    fn value_nobody_wrote_is_caught() {
        let v = verdict(&[(1, Read, 0, 1, ok(Unparsable { text: "\"x\"".into() }))]);
        assert!(matches!(v, KeyVerdict::Violation { .. }));
        let v = verdict(&[(1, Read, 0, 1, ok(Value { value: 5, version: 1 }))]);
        assert!(matches!(v, KeyVerdict::Violation { .. }));
    }

    /// Random histories from a real register run sequentially, with random
    /// overlap added, answers kept, and some answers dropped (indeterminate):
    /// always linearizable. Then one read's answer is made stale: caught
    /// unless some concurrency explains it (checked by brute force).
    mod generated {
        use super::*;
        use proptest::prelude::*;

        #[derive(Clone, Debug)]
        enum Gen {
            Read,
            Write,
            Cas(u8),
            Delete,
            CasDelete(u8),
        }

        fn gen_op() -> impl Strategy<Value = (Gen, u8, u8, bool)> {
            let g = prop_oneof![
                3 => Just(Gen::Read),
                3 => Just(Gen::Write),
                3 => (0u8..4).prop_map(Gen::Cas),
                1 => Just(Gen::Delete),
                1 => (0u8..4).prop_map(Gen::CasDelete),
            ];
            // (op, how long before its linearization point it was invoked, how
            // long after it completed, answer lost?)
            (g, 0u8..3, 0u8..3, proptest::bool::weighted(0.15))
        }

        /// Runs the ops on a register that behaves like the server (see the
        /// module docs) in sequence at times 10, 20, … and stretches each
        /// op's interval around its point.
        fn run(spec: &[(Gen, u8, u8, bool)]) -> Vec<Op> {
            let mut s = RegisterState { value: 0, version: 0, exists: false };
            let mut out = Vec::new();
            for (i, (g, before, after, lost)) in spec.iter().enumerate() {
                let at = 10 * (i as Nanos + 1);
                let value = i as u64 + 100;
                let live = s.live();
                let guess = |d: u8| live.saturating_sub(d as u64 % 2) + (d as u64 / 3);
                let (call, ret) = match g {
                    Gen::Read => (Read, if s.exists { Value { value: s.value, version: s.version } } else { NotFound }),
                    Gen::Write => {
                        s = RegisterState { value, version: s.version + 1, exists: true };
                        (Write { value }, Written { version: s.version })
                    }
                    Gen::Cas(d) => {
                        let expected = guess(*d);
                        if expected == live {
                            s = RegisterState { value, version: s.version + 1, exists: true };
                            (Cas { expected, value }, Written { version: s.version })
                        } else {
                            (Cas { expected, value }, Conflict { current: Some(live) })
                        }
                    }
                    Gen::Delete if !s.exists => (Delete, NotFound),
                    Gen::Delete => {
                        s = RegisterState { value: 0, version: s.version + 1, exists: false };
                        (Delete, Written { version: s.version })
                    }
                    Gen::CasDelete(d) => {
                        let expected = guess(*d);
                        let call = CasDelete { expected };
                        if !s.exists {
                            (call, if expected == 0 { NotFound } else { Conflict { current: Some(0) } })
                        } else if expected == live {
                            s = RegisterState { value: 0, version: s.version + 1, exists: false };
                            (call, Written { version: s.version })
                        } else {
                            (call, Conflict { current: Some(live) })
                        }
                    }
                };
                let outcome = if *lost { unknown() } else { ok(ret) };
                out.push(Op {
                    id: i as u64 + 1,
                    workload: crate::history::Workload::Register,
                    client: i as u32,
                    key: "k".into(),
                    call,
                    invoke: at - 4 * (*before as Nanos),
                    complete: at + 4 * (*after as Nanos),
                    outcome,
                    node: String::new(),
                    stale: false,
                });
            }
            out
        }

        proptest! {
            #[test]
            fn real_register_histories_pass(spec in proptest::collection::vec(gen_op(), 0..40)) {
                let ops = run(&spec);
                let refs: Vec<&Op> = ops.iter().collect();
                prop_assert_eq!(check_key(&refs, 1_000_000), KeyVerdict::Linearizable);
            }

            #[test]
            fn a_read_of_an_unwritten_version_fails(spec in proptest::collection::vec(gen_op(), 1..30), pick in 0usize..30) {
                let mut ops = run(&spec);
                // A read at the end claiming a version no write produced.
                let last = ops.iter().map(|o| o.complete).max().unwrap_or(0);
                let max_version = ops.iter().filter_map(|o| match (&o.outcome, o.call) {
                    (Outcome::Ok { ret: Written { version } }, _) => Some(*version),
                    (Outcome::Indeterminate { .. }, Write { .. } | Cas { .. } | Delete | CasDelete { .. }) => {
                        Some(u64::MAX / 2)
                    }
                    _ => None,
                }).max().unwrap_or(0);
                prop_assume!(max_version < u64::MAX / 2);
                ops.push(Op {
                    id: 1000,
                    workload: crate::history::Workload::Register,
                    client: 99,
                    key: "k".into(),
                    call: Read,
                    invoke: last + 1 + pick as Nanos,
                    complete: last + 100,
                    outcome: ok(Value { value: 100 + pick as u64, version: max_version + 1 }),
                    node: String::new(),
                    stale: false,
                });
                let refs: Vec<&Op> = ops.iter().collect();
                let v = check_key(&refs, 1_000_000);
                prop_assert!(matches!(v, KeyVerdict::Violation { .. }), "{:?}", v);
            }
        }
    }
}
