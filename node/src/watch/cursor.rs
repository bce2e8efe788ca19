//! A watch's position and its opaque text form, the cursor.
//!
//! Changes are ordered by `(timestamp, key)` — the order the change log
//! holds them in — and a [`Position`] sits right after one of them
//! (`(ts, Some(key))`) or after every change at a timestamp (`(ts, None)`,
//! what a progress line promises). A cursor is that position as text:
//! `<ts in hex>` or `<ts in hex>.<key in hex>`. It means the same on every
//! node and across splits, since timestamps do (see [`crate::clock`]).

use std::cmp::Ordering;

use crate::clock::Ts;

/// Right after the change of `key` at `ts`, or after all of `ts`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub ts: Ts,
    pub key: Option<String>,
}

impl Position {
    /// After every change at or below `ts`.
    pub fn after_all(ts: Ts) -> Position {
        Position { ts, key: None }
    }

    /// Whether the change of `key` at `ts` comes after this position.
    pub fn precedes(&self, ts: Ts, key: &str) -> bool {
        match ts.cmp(&self.ts) {
            Ordering::Greater => true,
            Ordering::Less => false,
            Ordering::Equal => self.key.as_deref().is_some_and(|k| key > k),
        }
    }

    /// The cursor text.
    pub fn encode(&self) -> String {
        match &self.key {
            None => format!("{:x}", self.ts),
            Some(k) => format!("{:x}.{}", self.ts, hex(k.as_bytes())),
        }
    }

    /// Reads a cursor; `None` when it is not one.
    pub fn decode(s: &str) -> Option<Position> {
        let (ts, key) = match s.split_once('.') {
            Some((ts, key)) => (ts, Some(key)),
            None => (s, None),
        };
        if ts.is_empty() || ts.len() > 16 || !ts.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let ts = Ts::from_str_radix(ts, 16).ok()?;
        let key = match key {
            None => None,
            Some(k) => Some(String::from_utf8(unhex(k)?).ok()?),
        };
        Some(Position { ts, key })
    }
}

impl PartialOrd for Position {
    fn partial_cmp(&self, other: &Position) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Position {
    /// `(ts, key)` order, where "after all of `ts`" comes after every key.
    fn cmp(&self, other: &Position) -> Ordering {
        self.ts.cmp(&other.ts).then_with(|| match (&self.key, &other.key) {
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

    #[test]
    fn cursors_read_back_as_written_and_anything_else_is_refused() {
        for p in [
            Position::after_all(0),
            Position::after_all(u64::MAX),
            Position { ts: 0x1234, key: Some("a/ü.b".into()) },
            Position { ts: 7, key: Some(String::new()) },
        ] {
            assert_eq!(Position::decode(&p.encode()), Some(p));
        }
        for bad in ["", "xyz", "12.3", "12.zz", "1.ff", "11111111111111111", ".61", "12..", "-1"] {
            assert_eq!(Position::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn positions_order_by_timestamp_then_key_with_all_of_a_timestamp_last() {
        let at = |ts, k: &str| Position { ts, key: Some(k.into()) };
        assert!(at(1, "z") < at(2, ""));
        assert!(at(2, "a") < at(2, "b"));
        assert!(at(2, "z") < Position::after_all(2));
        assert!(Position::after_all(2) < at(3, ""));
        assert!(at(2, "a").precedes(2, "b"));
        assert!(!at(2, "b").precedes(2, "b"));
        assert!(!Position::after_all(2).precedes(2, "zzz"));
        assert!(Position::after_all(2).precedes(3, ""));
    }
}
