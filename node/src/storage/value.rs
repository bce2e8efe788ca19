//! The stored form of a user value: its per-key version, whether it is a
//! tombstone, and the JSON text exactly as the user sent it.
//!
//! Deletes leave a tombstone carrying the next version so that a key's
//! version never goes backwards, even across delete and re-create (and, in a
//! split, so that a backfilled old value can never overwrite a newer delete).

use super::txn_info::{LegacyTxnInfo, Lock, TxnInfo};

/// Layout: `version: u64 BE | flags: u8 | [txn length: u32 BE | txn] | json
/// bytes`; the transaction part (a lock, outcomes: [`TxnInfo`]) is there
/// only when the `TXN_TS` flag (or, written before commit timestamps, the
/// `TXN` flag) is set, so records written before transactions existed read
/// as they did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueRecord {
    pub version: u64,
    pub tombstone: bool,
    pub json: Vec<u8>,
    /// Transaction state of the key (`None`: no lock, no outcome).
    pub txn: Option<Box<TxnInfo>>,
}

const TOMBSTONE: u8 = 1;
/// A transaction part as written before outcomes had a commit timestamp
/// ([`LegacyTxnInfo`]): read, never written.
const TXN: u8 = 2;
/// A transaction part ([`TxnInfo`]).
const TXN_TS: u8 = 4;

impl ValueRecord {
    /// A live value at `version`.
    pub fn live(version: u64, json: Vec<u8>) -> ValueRecord {
        ValueRecord { version, tombstone: false, json, txn: None }
    }

    /// A deleted key's tombstone at `version`.
    pub fn deleted(version: u64) -> ValueRecord {
        ValueRecord { version, tombstone: true, json: Vec::new(), txn: None }
    }

    /// Whether this record says no more than an absent key would: a
    /// version-0 tombstone with no transaction part (what releasing a lock
    /// on a key that never existed leaves). It is not stored: the key is
    /// deleted instead.
    pub fn is_vacant(&self) -> bool {
        self.tombstone && self.version == 0 && self.txn.is_none()
    }

    /// The lock on the key, if a transaction holds it.
    pub fn lock(&self) -> Option<&Lock> {
        self.txn.as_ref().and_then(|t| t.lock.as_ref())
    }

    /// This record with `txn` as its transaction part (dropped when empty).
    pub fn with_txn(mut self, txn: TxnInfo) -> ValueRecord {
        self.txn = (!txn.is_empty()).then(|| Box::new(txn));
        self
    }

    pub fn encode(&self) -> Vec<u8> {
        let txn = self.txn.as_ref().map(|t| crate::codec::encode(t.as_ref()).expect("txn info encodes"));
        let mut out = Vec::with_capacity(9 + self.json.len() + txn.as_ref().map_or(0, |t| 4 + t.len()));
        out.extend_from_slice(&self.version.to_be_bytes());
        out.push(if self.tombstone { TOMBSTONE } else { 0 } | if txn.is_some() { TXN_TS } else { 0 });
        if let Some(t) = txn {
            out.extend_from_slice(&(t.len() as u32).to_be_bytes());
            out.extend_from_slice(&t);
        }
        out.extend_from_slice(&self.json);
        out
    }

    /// Decodes a stored record; `None` for bytes that are not one.
    pub fn decode(bytes: &[u8]) -> Option<ValueRecord> {
        if bytes.len() < 9 {
            return None;
        }
        let version = u64::from_be_bytes(bytes[..8].try_into().ok()?);
        let flags = bytes[8];
        if flags & !(TOMBSTONE | TXN | TXN_TS) != 0 || flags & TXN != 0 && flags & TXN_TS != 0 {
            return None; // a format this build does not know
        }
        let (txn, json) = if flags & (TXN | TXN_TS) != 0 {
            let len = u32::from_be_bytes(bytes.get(9..13)?.try_into().ok()?) as usize;
            let body = bytes.get(13..13usize.checked_add(len)?)?;
            let info: TxnInfo = match flags & TXN_TS != 0 {
                true => crate::codec::decode(body).ok()?,
                false => crate::codec::decode::<LegacyTxnInfo>(body).ok()?.into(),
            };
            (Some(Box::new(info)), &bytes[13 + len..])
        } else {
            (None, &bytes[9..])
        };
        Some(ValueRecord { version, tombstone: flags & TOMBSTONE != 0, json: json.to_vec(), txn })
    }

    /// Whether stored `bytes` are a record without a transaction part,
    /// and then whether it is a tombstone and how long its JSON is: what a
    /// bulk reader needs of most records, without decoding them.
    pub fn peek_plain(bytes: &[u8]) -> Option<(bool, usize)> {
        let flags = *bytes.get(8)?;
        (flags & !TOMBSTONE == 0).then(|| (flags & TOMBSTONE != 0, bytes.len() - 9))
    }

    /// The version of a live value, 0 for an absent key or a tombstone.
    pub fn live_version(rec: Option<&ValueRecord>) -> u64 {
        rec.filter(|r| !r.tombstone).map_or(0, |r| r.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::txn_info::Outcome;

    #[test]
    fn round_trips() {
        for r in [
            ValueRecord::live(7, b"{\"a\":1}".to_vec()),
            ValueRecord::deleted(u64::MAX),
            ValueRecord::live(3, b"[1]".to_vec()).with_txn(TxnInfo {
                lock: Some(Lock { txn: 9, primary: "p".into(), expires_ms: 5, write: true }),
                outcomes: vec![Outcome { txn: 8, committed: Some(vec![]), expires_ms: 5, commit_ts: 77 }],
                dropped_through_ms: 3,
            }),
            ValueRecord::deleted(0).with_txn(TxnInfo {
                lock: Some(Lock { txn: u128::MAX, primary: "q".into(), expires_ms: 0, write: false }),
                ..TxnInfo::default()
            }),
        ] {
            assert_eq!(ValueRecord::decode(&r.encode()), Some(r));
        }
        assert_eq!(ValueRecord::decode(b"short"), None);
        // Records from before transactions: no TXN flag, the JSON right after the flags.
        let old = [&7u64.to_be_bytes()[..], &[0], b"{}"].concat();
        assert_eq!(ValueRecord::decode(&old), Some(ValueRecord::live(7, b"{}".to_vec())));
        // A transaction part that is cut short or claims more than is there.
        let mut bad = ValueRecord::deleted(1)
            .with_txn(TxnInfo {
                lock: None,
                outcomes: vec![Outcome { txn: 1, committed: None, expires_ms: 0, commit_ts: 0 }],
                dropped_through_ms: 0,
            })
            .encode();
        bad.truncate(bad.len() - 1);
        assert_eq!(ValueRecord::decode(&bad), None);
        let mut huge = [&1u64.to_be_bytes()[..], &[TXN]].concat();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(ValueRecord::decode(&huge), None);
        // A transaction part written before commit timestamps reads with none.
        #[derive(serde::Serialize)]
        struct Before {
            lock: Option<Lock>,
            outcomes: Vec<(u128, Option<Vec<crate::storage::txn_info::PendingWrite>>, u64)>,
            dropped_through_ms: u64,
        }
        let before =
            crate::codec::encode(&Before { lock: None, outcomes: vec![(4, Some(vec![]), 9)], dropped_through_ms: 2 });
        let before = before.unwrap();
        let legacy = [&3u64.to_be_bytes()[..], &[TXN], &(before.len() as u32).to_be_bytes(), &before, b"1"].concat();
        let outcome = Outcome { txn: 4, committed: Some(vec![]), expires_ms: 9, commit_ts: 0 };
        let info = TxnInfo { lock: None, outcomes: vec![outcome], dropped_through_ms: 2 };
        assert_eq!(ValueRecord::decode(&legacy), Some(ValueRecord::live(3, b"1".to_vec()).with_txn(info)));
        let unknown = [&1u64.to_be_bytes()[..], &[8], b"{}"].concat();
        assert_eq!(ValueRecord::decode(&unknown), None, "an unknown flag is not ignored");
        assert_eq!(ValueRecord::peek_plain(&unknown), None);
        assert_eq!(ValueRecord::peek_plain(b"short"), None);
        assert_eq!(ValueRecord::peek_plain(&ValueRecord::live(3, b"[1]".to_vec()).encode()), Some((false, 3)));
        assert_eq!(ValueRecord::peek_plain(&ValueRecord::deleted(3).encode()), Some((true, 0)));
        let lock = Lock { txn: 9, primary: "p".into(), expires_ms: 5, write: true };
        let locked = ValueRecord::live(3, b"[1]".to_vec()).with_txn(TxnInfo { lock: Some(lock), ..TxnInfo::default() });
        assert_eq!(ValueRecord::peek_plain(&locked.encode()), None, "a transaction part needs decoding");
    }
}
