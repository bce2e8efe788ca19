//! A linearizability checker: the Wing & Gong search with Lowe's memoization,
//! as in Porcupine.
//!
//! A history is linearizable if every operation can be given a single instant
//! between its invocation and its completion such that, taking the operations
//! in the order of those instants, a sequential model (here: a register)
//! produces exactly the answers the clients got.
//!
//! The search keeps the history as a doubly linked list of call and return
//! entries sorted by time. Walking from the front, it tries to *linearize* a
//! call (apply it to the model state; if the model agrees with the recorded
//! answer, remove the call and its return from the list and start over from
//! the front). Reaching a return entry means that operation should already
//! have been linearized: backtrack, undoing the last choice and trying the
//! next call instead. The list empties iff a linearization exists.
//!
//! Memoization makes it practical: the pair (set of linearized operations,
//! model state) fully determines the rest of the search, so a pair seen once
//! is never explored again. The number of such pairs is also the budget: a
//! search that exceeds it gives up with [`Verdict::Unknown`] rather than run
//! forever.
//!
//! Indeterminate operations (no completion) get a return entry at the end of
//! time: they may be linearized anywhere after their invocation, and placing
//! one after everything else is the same as it never having happened.
//! Operations that certainly failed should simply be left out of the input.

use std::collections::HashSet;
use std::fmt::Debug;
use std::hash::Hash;

use crate::history::Nanos;

/// A sequential specification.
pub trait Model {
    type Call;
    type Ret;
    type State: Clone + Eq + Hash + Debug;

    fn init(&self) -> Self::State;

    /// The state after `call` answered `ret` (`None`: no answer is known, any
    /// answer is fine), or `None` if the model cannot give that answer from
    /// `state`.
    fn step(&self, state: &Self::State, call: &Self::Call, ret: Option<&Self::Ret>) -> Option<Self::State>;
}

/// One operation as the checker sees it.
#[derive(Clone, Debug)]
pub struct Event<C, R> {
    pub call: C,
    /// `None` for an indeterminate operation.
    pub ret: Option<R>,
    pub invoke: Nanos,
    /// `None` for an indeterminate operation: it may take effect at any time
    /// after `invoke`.
    pub complete: Option<Nanos>,
}

/// Why a history is not linearizable: the deepest point the search reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure<S> {
    /// Indices (into the input) of the longest linearizable prefix found, in
    /// linearization order.
    pub prefix: Vec<usize>,
    /// The model state after that prefix.
    pub state: S,
    /// The operation whose completion came before any valid place for it
    /// could be found after that prefix.
    pub stuck: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict<S> {
    Linearizable,
    NotLinearizable(Failure<S>),
    /// The search explored `states` memoized states and gave up.
    Unknown {
        states: usize,
    },
}

impl<S> Verdict<S> {
    pub fn is_linearizable(&self) -> bool {
        matches!(self, Verdict::Linearizable)
    }
}

const NIL: usize = usize::MAX;
const HEAD: usize = 0;

/// A call or return entry of the linked list.
#[derive(Clone, Copy)]
struct Entry {
    op: usize,
    is_call: bool,
}

/// The call/return entries, sorted by time, as a list that supports removing
/// an operation's two entries and putting them back in LIFO order
/// (dancing links).
struct Entries {
    entries: Vec<Entry>,
    next: Vec<usize>,
    prev: Vec<usize>,
    /// The list node of each operation's return entry.
    ret_node: Vec<usize>,
}

impl Entries {
    fn new<C, R>(events: &[Event<C, R>]) -> Entries {
        let mut sorted: Vec<(Nanos, bool, usize)> = Vec::with_capacity(2 * events.len());
        for (i, e) in events.iter().enumerate() {
            sorted.push((e.invoke, false, i));
            // An answer is never earlier than its request.
            sorted.push((e.complete.map_or(Nanos::MAX, |c| c.max(e.invoke)), true, i));
        }
        // At equal times calls come first: the two operations are then
        // treated as concurrent, the permissive reading.
        sorted.sort();
        let n = sorted.len();
        let mut entries = vec![Entry { op: NIL, is_call: false }];
        let mut ret_node = vec![NIL; events.len()];
        for (k, &(_, is_ret, op)) in sorted.iter().enumerate() {
            entries.push(Entry { op, is_call: !is_ret });
            if is_ret {
                ret_node[op] = k + 1;
            }
        }
        let next = (0..=n).map(|i| if i == n { NIL } else { i + 1 }).collect();
        let prev = (0..=n).map(|i| if i == 0 { NIL } else { i - 1 }).collect();
        Entries { entries, next, prev, ret_node }
    }

    fn unlink(&mut self, x: usize) {
        let (p, n) = (self.prev[x], self.next[x]);
        self.next[p] = n;
        if n != NIL {
            self.prev[n] = p;
        }
    }

    fn relink(&mut self, x: usize) {
        let (p, n) = (self.prev[x], self.next[x]);
        self.next[p] = x;
        if n != NIL {
            self.prev[n] = x;
        }
    }

    /// Removes call entry `c` and its operation's return entry.
    fn lift(&mut self, c: usize) {
        let r = self.ret_node[self.entries[c].op];
        self.unlink(c);
        self.unlink(r);
    }

    /// Undoes the last [`Entries::lift`] of `c`.
    fn unlift(&mut self, c: usize) {
        let r = self.ret_node[self.entries[c].op];
        self.relink(r);
        self.relink(c);
    }
}

/// A set of operation indices, hashable, for the memo table.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Bits {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
}

/// Checks one history (one key) against `model`, exploring at most
/// `max_states` memoized states.
pub fn check<M: Model>(model: &M, events: &[Event<M::Call, M::Ret>], max_states: usize) -> Verdict<M::State> {
    let mut list = Entries::new(events);
    let mut state = model.init();
    let mut linearized = Bits::new(events.len());
    let mut seen: HashSet<(Bits, M::State)> = HashSet::new();
    // The choices made so far: (call node, state before it).
    let mut calls: Vec<(usize, M::State)> = Vec::new();
    let mut deepest: Option<Failure<M::State>> = None;

    let mut node = list.next[HEAD];
    while list.next[HEAD] != NIL {
        let entry = list.entries[node];
        let event = &events[entry.op];
        if entry.is_call {
            if let Some(after) = model.step(&state, &event.call, event.ret.as_ref()) {
                linearized.set(entry.op);
                if seen.insert((linearized.clone(), after.clone())) {
                    if seen.len() > max_states {
                        return Verdict::Unknown { states: seen.len() };
                    }
                    calls.push((node, std::mem::replace(&mut state, after)));
                    list.lift(node);
                    node = list.next[HEAD];
                    continue;
                }
                linearized.clear(entry.op);
            }
            node = list.next[node];
        } else {
            // This operation had to be linearized by now, and was not.
            if deepest.as_ref().is_none_or(|d| calls.len() > d.prefix.len()) {
                deepest = Some(Failure {
                    prefix: calls.iter().map(|(c, _)| list.entries[*c].op).collect(),
                    state: state.clone(),
                    stuck: entry.op,
                });
            }
            let Some((c, before)) = calls.pop() else {
                return Verdict::NotLinearizable(deepest.expect("set just above"));
            };
            state = before;
            linearized.clear(list.entries[c].op);
            list.unlift(c);
            node = list.next[c];
        }
    }
    Verdict::Linearizable
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain integer register: write(v), read() → v; starts at 0.
    struct IntRegister;

    #[derive(Clone, Copy, Debug)]
    enum C {
        W(u32),
        R,
    }

    impl Model for IntRegister {
        type Call = C;
        type Ret = u32;
        type State = u32;
        fn init(&self) -> u32 {
            0
        }
        fn step(&self, s: &u32, call: &C, ret: Option<&u32>) -> Option<u32> {
            match call {
                C::W(v) => Some(*v),
                C::R => ret.is_none_or(|r| r == s).then_some(*s),
            }
        }
    }

    fn ev(call: C, ret: Option<u32>, invoke: Nanos, complete: Option<Nanos>) -> Event<C, u32> {
        Event { call, ret, invoke, complete }
    }

    #[test]
    fn empty_and_sequential_histories_are_linearizable() {
        assert!(check(&IntRegister, &[], 100).is_linearizable());
        let h = [ev(C::W(1), None, 0, Some(1)), ev(C::R, Some(1), 2, Some(3))];
        assert!(check(&IntRegister, &h, 100).is_linearizable());
    }

    #[test]
    fn concurrent_read_may_see_either_value() {
        // write 1 over [0,10]; reads inside see 0 and then 1.
        let h = [ev(C::W(1), None, 0, Some(10)), ev(C::R, Some(0), 1, Some(2)), ev(C::R, Some(1), 3, Some(4))];
        assert!(check(&IntRegister, &h, 100).is_linearizable());
    }

    #[test]
    fn stale_read_after_completed_write_is_caught() {
        let h = [ev(C::W(1), None, 0, Some(1)), ev(C::R, Some(0), 2, Some(3))];
        let Verdict::NotLinearizable(f) = check(&IntRegister, &h, 100) else { panic!("not caught") };
        assert_eq!(f.stuck, 1);
        assert_eq!(f.prefix, vec![0]);
        assert_eq!(f.state, 1);
    }

    #[test]
    fn reads_may_not_flip_back() {
        // Concurrent write: read 1 then, strictly later, read 0: impossible.
        let h = [ev(C::W(1), None, 0, Some(10)), ev(C::R, Some(1), 1, Some(2)), ev(C::R, Some(0), 3, Some(4))];
        assert!(!check(&IntRegister, &h, 100).is_linearizable());
    }

    #[test]
    fn indeterminate_write_may_land_late_or_never() {
        let late = [ev(C::W(1), None, 0, None), ev(C::R, Some(0), 5, Some(6)), ev(C::R, Some(1), 7, Some(8))];
        assert!(check(&IntRegister, &late, 100).is_linearizable());
        let never = [ev(C::W(1), None, 0, None), ev(C::R, Some(0), 5, Some(6))];
        assert!(check(&IntRegister, &never, 100).is_linearizable());
    }

    #[test]
    fn budget_gives_unknown() {
        let h: Vec<_> = (0..12).map(|i| ev(C::W(i), None, 0, None)).chain([ev(C::R, Some(99), 1, Some(2))]).collect();
        assert!(matches!(check(&IntRegister, &h, 50), Verdict::Unknown { .. }));
    }
}
