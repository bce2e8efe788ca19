//! The stored form of a user value: its per-key version, whether it is a
//! tombstone, and the JSON text exactly as the user sent it.
//!
//! Deletes leave a tombstone carrying the next version so that a key's
//! version never goes backwards, even across delete and re-create (and, in a
//! split, so that a backfilled old value can never overwrite a newer delete).

/// Layout: `version: u64 BE | flags: u8 | json bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueRecord {
    pub version: u64,
    pub tombstone: bool,
    pub json: Vec<u8>,
}

const TOMBSTONE: u8 = 1;

impl ValueRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + self.json.len());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.push(if self.tombstone { TOMBSTONE } else { 0 });
        out.extend_from_slice(&self.json);
        out
    }

    /// Decodes a stored record; `None` for bytes that are not one.
    pub fn decode(bytes: &[u8]) -> Option<ValueRecord> {
        if bytes.len() < 9 {
            return None;
        }
        let version = u64::from_be_bytes(bytes[..8].try_into().ok()?);
        Some(ValueRecord { version, tombstone: bytes[8] & TOMBSTONE != 0, json: bytes[9..].to_vec() })
    }

    /// The version of a live value, 0 for an absent key or a tombstone.
    pub fn live_version(rec: Option<&ValueRecord>) -> u64 {
        rec.filter(|r| !r.tombstone).map_or(0, |r| r.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for r in [
            ValueRecord { version: 7, tombstone: false, json: b"{\"a\":1}".to_vec() },
            ValueRecord { version: u64::MAX, tombstone: true, json: vec![] },
        ] {
            assert_eq!(ValueRecord::decode(&r.encode()), Some(r));
        }
        assert_eq!(ValueRecord::decode(b"short"), None);
    }
}
