//! A minimal etcd client over its v3 JSON gateway, for comparing against.
//!
//! etcd serves its gRPC KV API as JSON at `POST /v3/kv/put` and
//! `POST /v3/kv/range` on every client URL; keys and values travel
//! base64-encoded. Any member accepts a request (followers forward writes to
//! the leader, and ranges are linearizable by default, as CleaveDB's reads
//! are), so requests simply rotate over `--endpoints`. No retries: an error
//! is counted as one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::Deserialize;
use serde_json::json;

/// An etcd cluster reached through its JSON gateway.
pub struct Etcd {
    http: reqwest::Client,
    urls: Vec<String>,
    next: AtomicUsize,
}

/// The part of a range answer the benchmark looks at.
#[derive(Deserialize)]
struct RangeAnswer {
    #[serde(default)]
    kvs: Vec<serde_json::Value>,
}

impl Etcd {
    /// A client for the etcd members at `endpoints` (`host:port` or `http://host:port`).
    pub fn new(endpoints: &[String], timeout: Duration) -> Result<Etcd> {
        let urls: Vec<String> = endpoints
            .iter()
            .map(|e| {
                let e = e.trim().trim_end_matches('/');
                if e.contains("://") {
                    e.to_owned()
                } else {
                    format!("http://{e}")
                }
            })
            .collect();
        anyhow::ensure!(!urls.is_empty(), "--endpoints lists no etcd member");
        cleave_client::tls::install_provider();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .tcp_nodelay(true)
            .build()
            .context("building the HTTP client")?;
        Ok(Etcd { http, urls, next: AtomicUsize::new(0) })
    }

    /// Writes `value` (raw bytes) under `key`.
    pub async fn put(&self, key: &str, value: &[u8]) -> Result<(), String> {
        self.post("/v3/kv/put", json!({"key": B64.encode(key), "value": B64.encode(value)})).await.map(drop)
    }

    /// Reads `key`; whether it exists.
    pub async fn get(&self, key: &str) -> Result<bool, String> {
        let body = self.post("/v3/kv/range", json!({"key": B64.encode(key)})).await?;
        let answer: RangeAnswer = serde_json::from_slice(&body).map_err(|_| "decode".to_owned())?;
        Ok(!answer.kvs.is_empty())
    }

    /// Reads up to `limit` keys from `start` to the end of the key space;
    /// how many came back.
    pub async fn scan(&self, start: &str, limit: usize) -> Result<usize, String> {
        // range_end "\0" means "every key from `key` on".
        let req = json!({"key": B64.encode(start), "range_end": B64.encode([0u8]), "limit": limit});
        let body = self.post("/v3/kv/range", req).await?;
        let answer: RangeAnswer = serde_json::from_slice(&body).map_err(|_| "decode".to_owned())?;
        Ok(answer.kvs.len())
    }

    /// One POST to the next member; the error is the kind to count.
    async fn post(&self, path: &str, body: serde_json::Value) -> Result<Vec<u8>, String> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.urls.len();
        let resp = self.http.post(format!("{}{path}", self.urls[i])).json(&body).send().await.map_err(|e| {
            if e.is_timeout() {
                "timeout".to_owned()
            } else if e.is_connect() {
                "unreachable".to_owned()
            } else {
                "transport".to_owned()
            }
        })?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|_| "transport".to_owned())?;
        if status == 200 {
            Ok(bytes.to_vec())
        } else {
            Err(format!("http_{status}"))
        }
    }
}
