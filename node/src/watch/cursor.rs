//! A watch's position and its opaque text form, the cursor.
//!
//! Changes are ordered by `(timestamp, origin, key)` — the order the change
//! log holds them in. The **origin** names the writes that belong together:
//! a transaction's (every shard writes its changes at the transaction's
//! commit timestamp under the same origin, so they sort next to each other
//! even when another shard wrote something else at that same timestamp),
//! or one log entry's (a shard gives each entry its own timestamp, so the
//! shard's group is enough). Timestamps alone would not do: two nodes'
//! clocks can hand out the same one, and two transactions committed at one
//! timestamp on two shards would come out interleaved by key.
//!
//! A [`Position`] sits right after one change (`(ts, Some((origin, key)))`)
//! or after every change at a timestamp (`(ts, None)`, what a progress
//! line promises). A cursor is that position as text: `<ts in hex>` or
//! `<ts>.<origin>.<key>`, each part in hex. It means the same on every node
//! and across splits, since timestamps do (see [`crate::clock`]).

use std::cmp::Ordering;

use super::changes::Change;
use crate::clock::Ts;
use crate::storage::txn_info::TxnId;

/// The writes a change belongs to (see the module doc).
pub type Origin = u128;

/// The origin of the writes of one log entry of shard group `group`.
pub fn entry_origin(group: u64) -> Origin {
    Origin::from(group)
}

/// The origin of transaction `txn`'s writes (apart from every group's).
pub fn txn_origin(txn: TxnId) -> Origin {
    txn | 1 << 127
}

/// Right after the change `(ts, origin, key)`, or after all of `ts`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub ts: Ts,
    pub at: Option<(Origin, String)>,
}

impl Position {
    /// After every change at or below `ts`.
    pub fn after_all(ts: Ts) -> Position {
        Position { ts, at: None }
    }

    /// Right after change `c`.
    pub fn after(c: &Change) -> Position {
        Position { ts: c.ts, at: Some((c.origin, c.key.clone())) }
    }

    /// Whether change `c` comes after this position.
    pub fn precedes(&self, c: &Change) -> bool {
        match c.ts.cmp(&self.ts) {
            Ordering::Greater => true,
            Ordering::Less => false,
            Ordering::Equal => self.at.as_ref().is_some_and(|(o, k)| (c.origin, c.key.as_str()) > (*o, k.as_str())),
        }
    }

    /// The cursor text.
    pub fn encode(&self) -> String {
        match &self.at {
            None => format!("{:x}", self.ts),
            Some((o, k)) => format!("{:x}.{o:x}.{}", self.ts, hex(k.as_bytes())),
        }
    }

    /// Reads a cursor; `None` when it is not one.
    pub fn decode(s: &str) -> Option<Position> {
        let mut parts = s.split('.');
        let ts = number(parts.next()?, 16)?;
        let at = match (parts.next(), parts.next()) {
            (None, _) => None,
            (Some(o), Some(k)) => {
                let origin = number(o, 32)?;
                Some((origin, String::from_utf8(unhex(k)?).ok()?))
            }
            (Some(_), None) => return None,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(Position { ts: Ts::try_from(ts).ok()?, at })
    }
}

/// A hex number of at most `digits` digits.
fn number(s: &str, digits: usize) -> Option<u128> {
    if s.is_empty() || s.len() > digits || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(s, 16).ok()
}

impl PartialOrd for Position {
    fn partial_cmp(&self, other: &Position) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Position {
    /// `(ts, origin, key)` order, where "after all of `ts`" comes after
    /// every change at `ts`.
    fn cmp(&self, other: &Position) -> Ordering {
        self.ts.cmp(&other.ts).then_with(|| match (&self.at, &other.at) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(a), Some(b)) => a.cmp(b),
        })
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ts: Ts, origin: Origin, key: &str) -> Position {
        Position { ts, at: Some((origin, key.into())) }
    }

    fn change(ts: Ts, origin: Origin, key: &str) -> Change {
        Change { ts, origin, key: key.into(), version: 1, value: None, prev: None, lines: Default::default() }
    }

    #[test]
    fn cursors_read_back_as_written_and_anything_else_is_refused() {
        for p in [
            Position::after_all(0),
            Position::after_all(u64::MAX),
            at(0x1234, 7, "a/ü.b"),
            at(7, 0, ""),
            at(7, txn_origin(u128::MAX), "k"),
        ] {
            assert_eq!(Position::decode(&p.encode()), Some(p));
        }
        let bad = [
            "",
            "xyz",
            "12.3",
            "12.zz",
            "1.ff",
            "11111111111111111",
            ".61",
            "12..",
            "-1",
            "1.2.3",
            "1.2.61.61",
            "1..61",
            "1.x.61",
            "1.111111111111111111111111111111111.61",
        ];
        for bad in bad {
            assert_eq!(Position::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn positions_order_by_timestamp_origin_and_key_with_all_of_a_timestamp_last() {
        assert!(at(1, 9, "z") < at(2, 0, ""));
        assert!(at(2, 1, "z") < at(2, 2, "a"), "one origin's changes together");
        assert!(at(2, 1, "a") < at(2, 1, "b"));
        assert!(at(2, u128::MAX, "z") < Position::after_all(2));
        assert!(Position::after_all(2) < at(3, 0, ""));
        assert!(at(2, 1, "a").precedes(&change(2, 1, "b")));
        assert!(at(2, 1, "z").precedes(&change(2, 2, "a")));
        assert!(!at(2, 1, "b").precedes(&change(2, 1, "b")));
        assert!(!Position::after_all(2).precedes(&change(2, u128::MAX, "zzz")));
        assert!(Position::after_all(2).precedes(&change(3, 0, "")));
    }

    #[test]
    fn transactions_never_share_an_origin_with_a_log_entry() {
        assert_ne!(txn_origin(5), entry_origin(5));
        assert!(txn_origin(0) > entry_origin(u64::MAX));
    }
}
