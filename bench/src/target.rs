//! The system under test: CleaveDB through the real [`Client`] (routing
//! cache, leader-direct requests, its retries), or etcd through its JSON
//! gateway. Both offer the three operations the workloads need, and report
//! a failure as a short *kind* (`unavailable`, `indeterminate`, `http_503`,
//! ...) for the error counts.

use clap::ValueEnum;
use cleave_client::{Client, Consistency, Error, TxnCompare, TxnOp, TxnOpKind, TxnRequest};
use serde_json::value::RawValue;

use crate::etcd::Etcd;

/// Which system `--endpoints` points at.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetKind {
    Cleavedb,
    Etcd,
}

/// A connected system under test.
pub enum Target {
    Cleave { client: Client, consistency: Consistency },
    Etcd(Etcd),
}

impl Target {
    /// Writes `value` (JSON text, e.g. from [`crate::keys::Values`]) under `key`.
    pub async fn put(&self, key: &str, value: &str) -> Result<(), String> {
        match self {
            Target::Cleave { client, .. } => {
                let raw: &RawValue = serde_json::from_str(value).map_err(|_| "invalid_value".to_owned())?;
                client.put(key, raw, None).await.map(drop).map_err(|e| error_kind(&e))
            }
            Target::Etcd(etcd) => etcd.put(key, value.as_bytes()).await,
        }
    }

    /// Reads `key`; whether it exists.
    pub async fn get(&self, key: &str) -> Result<bool, String> {
        match self {
            Target::Cleave { client, consistency } => {
                client.get(key, *consistency).await.map(|v| v.is_some()).map_err(|e| error_kind(&e))
            }
            Target::Etcd(etcd) => etcd.get(key).await,
        }
    }

    /// Reads up to `limit` keys from `start` on; how many came back.
    pub async fn scan(&self, start: &str, limit: usize) -> Result<usize, String> {
        match self {
            Target::Cleave { client, .. } => {
                client.scan(start, None, Some(limit)).await.map(|p| p.items.len()).map_err(|e| error_kind(&e))
            }
            Target::Etcd(etcd) => etcd.scan(start, limit).await,
        }
    }

    /// Moves 1 from `from` to `to` (absent or non-numeric values count as
    /// 0): a read-only transaction of both, then a transaction that writes
    /// both if neither changed since. Whether it lost that race.
    pub async fn transfer(&self, from: &str, to: &str) -> Result<bool, String> {
        let Target::Cleave { client, .. } = self else { return Err("txn_unsupported".into()) };
        let keys: Vec<&str> = if from == to { vec![from] } else { vec![from, to] };
        let op = |op, key: &str, value: Option<i64>| TxnOp {
            op,
            key: key.to_owned(),
            value: value.map(|v| RawValue::from_string(v.to_string()).expect("a number is JSON")),
        };
        let read =
            TxnRequest { success: keys.iter().map(|k| op(TxnOpKind::Get, k, None)).collect(), ..Default::default() };
        let got = client.txn(&read).await.map_err(|e| error_kind(&e))?;
        let state: Vec<(u64, i64)> = got
            .results
            .iter()
            .map(|r| (r.version.unwrap_or(0), r.value.as_ref().and_then(|v| v.get().parse().ok()).unwrap_or(0)))
            .collect();
        let moved: &[i64] = if keys.len() == 1 { &[0] } else { &[-1, 1] };
        let write = TxnRequest {
            compare: keys
                .iter()
                .zip(&state)
                .map(|(k, (v, _))| TxnCompare { key: k.to_string(), version: *v })
                .collect(),
            success: keys
                .iter()
                .zip(&state)
                .zip(moved)
                .map(|((k, (_, n)), d)| op(TxnOpKind::Put, k, Some(n + d)))
                .collect(),
            failure: vec![],
        };
        let done = client.txn(&write).await.map_err(|e| error_kind(&e))?;
        Ok(!done.succeeded)
    }

    /// The CleaveDB client, for the scenarios that need its admin calls.
    pub fn cleave(&self) -> Option<&Client> {
        match self {
            Target::Cleave { client, .. } => Some(client),
            Target::Etcd(_) => None,
        }
    }
}

/// The kind of a client error, for the error counts.
pub fn error_kind(e: &Error) -> String {
    match e {
        Error::NotFound => "not_found".into(),
        Error::VersionConflict { .. } => "version_conflict".into(),
        Error::Api { status, code: Some(code), .. } => {
            let name = serde_json::to_value(code).ok().and_then(|v| v.as_str().map(str::to_owned));
            format!("{}_{status}", name.unwrap_or_else(|| "api".into()))
        }
        Error::Api { status, code: None, .. } => format!("http_{status}"),
        Error::Unavailable { .. } => "unavailable".into(),
        Error::Indeterminate(_) => "indeterminate".into(),
        Error::Transport(_) => "transport".into(),
        Error::Decode(_) => "decode".into(),
        Error::InvalidArgument(_) => "invalid_argument".into(),
        _ => "other".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cleave_client::ErrorCode;

    #[test]
    fn error_kinds_are_short_and_stable() {
        let api = |status, code| Error::Api { status, code, message: "m".into() };
        assert_eq!(error_kind(&api(503, Some(ErrorCode::RangeMoving))), "range_moving_503");
        assert_eq!(error_kind(&api(502, None)), "http_502");
        assert_eq!(error_kind(&Error::Unavailable { attempts: 3, last: "x".into() }), "unavailable");
        assert_eq!(error_kind(&Error::Indeterminate("x".into())), "indeterminate");
    }
}
