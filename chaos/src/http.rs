//! The HTTP side: one request per operation, and the rules that turn what
//! came back into an [`Outcome`].
//!
//! There are no retries here. A client library that retries hides exactly
//! what a checker needs to see (was the first attempt applied?), so each
//! operation is one request, classified by what the API documents:
//!
//! | what happened | outcome |
//! |---|---|
//! | 200, 404 (read), 409 (conditional write) | `ok` with the answer |
//! | connection refused / connect timeout (nothing sent) | `failed` |
//! | 400, 413, 421 stale route, 503 no leader / range moving | `failed` (the API says: not applied) |
//! | 504, 500, a timeout or reset after sending, anything else | `indeterminate` |
//!
//! Treating 503 and 421 as "not applied" takes the API at its word; if the
//! server applied such a write anyway, the checkers will say so.
//!
//! The few wire shapes the runner reads are declared here, with only the
//! fields it uses, so the suite depends on nothing but the public API.

use std::time::Duration;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::history::{Outcome, PageRecord, Ret};

/// `GET /admin/shards` (the fields used).
#[derive(Deserialize, Debug, Clone)]
pub struct ShardInfo {
    pub shard_id: u64,
    pub leader: Option<u64>,
    pub replicas: Vec<ReplicaInfo>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct ReplicaInfo {
    pub node_id: u64,
}

/// `GET /admin/ranges` (the fields used).
#[derive(Deserialize, Debug, Clone)]
pub struct RangeInfo {
    pub range_id: u64,
    pub start: String,
    pub end: Option<String>,
}

/// `GET /admin/nodes` (the fields used).
#[derive(Deserialize, Debug, Clone)]
pub struct NodeInfo {
    pub id: u64,
}

#[derive(Deserialize)]
struct ItemBody {
    key: String,
    value: Box<serde_json::value::RawValue>,
    version: u64,
}

#[derive(Deserialize)]
struct ScanBody {
    items: Vec<ItemBody>,
    next: Option<String>,
}

#[derive(Deserialize)]
struct WriteBody {
    version: u64,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    #[serde(default)]
    message: String,
    version: Option<u64>,
}

/// An answer to an admin request.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> Option<Value> {
        serde_json::from_str(&self.body).ok()
    }

    /// A 404 from the router's fallback: this server has no such route.
    pub fn is_missing_route(&self) -> bool {
        self.status == 404
            && serde_json::from_str::<ErrorBody>(&self.body)
                .is_ok_and(|e| e.error.code == "not_found" && e.error.message.contains("no such endpoint"))
    }
}

/// A page of a scan: `(key, value)` pairs (a value that is not a u64 comes
/// back as `u64::MAX`) and the cursor of the next page.
pub type ScanPage = (Vec<(String, u64)>, Option<String>);

/// HTTP access to the nodes. Cheap to clone.
#[derive(Clone)]
pub struct Api {
    client: reqwest::Client,
    admin: reqwest::Client,
    /// Workload reads ask for `consistency=stale` (to check the checkers).
    stale_reads: bool,
}

/// Credentials for a secured cluster (`--token`, `--ca-cert`).
#[derive(Clone, Default)]
pub struct Auth {
    pub token: Option<String>,
    /// PEM of the CA of nodes that serve HTTPS.
    pub ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("token", &self.token.as_ref().map(|_| ".."))
            .field("ca_pem", &self.ca_pem.as_ref().map(Vec::len))
            .finish()
    }
}

fn build(timeout: Duration, auth: &Auth) -> Result<reqwest::Client> {
    cleave_client::tls::install_provider();
    let builder = reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(1).min(timeout))
        .pool_idle_timeout(Duration::from_secs(5));
    let builder = cleave_client::tls::with_credentials(builder, auth.token.as_deref(), auth.ca_pem.as_deref())
        .map_err(|e| Error::Http(format!("--token/--ca-cert: {e}")))?;
    builder.build().map_err(|e| Error::Http(format!("cannot build client: {e}")))
}

/// The value of a raw JSON text, if it is one of ours (an unsigned integer).
fn our_value(raw: &str) -> Option<u64> {
    serde_json::from_str::<u64>(raw).ok()
}

/// Everything but RFC 3986 unreserved characters is escaped: a key is one
/// path segment (or one query value), `/` included.
const ESCAPED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

fn percent_encode(s: &str) -> String {
    utf8_percent_encode(s, ESCAPED).to_string()
}

/// Classifies a transport error: certainly not sent, or unknown.
fn transport_outcome(e: &reqwest::Error) -> Outcome {
    if e.is_connect() {
        Outcome::Failed { reason: "connect".into() }
    } else if e.is_timeout() {
        Outcome::Indeterminate { reason: "timeout".into() }
    } else {
        Outcome::Indeterminate { reason: format!("transport: {}", error_chain(e)) }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// Classifies an error status (not 200/404/409).
fn status_outcome(status: u16, body: &str) -> Outcome {
    let code = serde_json::from_str::<ErrorBody>(body).map(|e| e.error.code).unwrap_or_default();
    let reason = format!("{status} {code}");
    match status {
        400 | 413 | 421 | 503 => Outcome::Failed { reason },
        _ => Outcome::Indeterminate { reason },
    }
}

impl Api {
    /// `op_timeout`: how long a workload request may take before the client
    /// gives up on it (it is then indeterminate).
    pub fn new(op_timeout: Duration, auth: &Auth) -> Result<Api> {
        Ok(Api { client: build(op_timeout, auth)?, admin: build(Duration::from_secs(3), auth)?, stale_reads: false })
    }

    /// Workload reads served by whichever replica gets them, which may lag
    /// (recorded as such in the history, and checked as stale reads).
    pub fn with_stale_reads(self) -> Api {
        Api { stale_reads: true, ..self }
    }

    /// Whether workload reads ask for `consistency=stale`.
    pub fn stale_reads(&self) -> bool {
        self.stale_reads
    }

    fn kv_url(base: &str, key: &str) -> String {
        format!("{base}/v1/kv/{}", percent_encode(key))
    }

    /// Sends one workload request: `(status, body)`, or the outcome of a
    /// transport failure.
    async fn exchange(&self, req: reqwest::RequestBuilder) -> std::result::Result<(u16, String), Outcome> {
        let resp = req.send().await.map_err(|e| transport_outcome(&e))?;
        let status = resp.status().as_u16();
        let body = resp.text().await.map_err(|e| transport_outcome(&e))?;
        Ok((status, body))
    }

    /// A linearizable read (unless [`Api::with_stale_reads`]).
    pub async fn read(&self, base: &str, key: &str) -> Outcome {
        let mut url = Self::kv_url(base, key);
        if self.stale_reads {
            url.push_str("?consistency=stale");
        }
        let (status, body) = match self.exchange(self.client.get(url)).await {
            Ok(answer) => answer,
            Err(outcome) => return outcome,
        };
        match status {
            200 => match serde_json::from_str::<ItemBody>(&body) {
                Ok(item) => match our_value(item.value.get()) {
                    Some(value) => Outcome::ok(Ret::Value { value, version: item.version }),
                    None => Outcome::ok(Ret::Unparsable { text: item.value.get().to_string() }),
                },
                Err(e) => Outcome::Indeterminate { reason: format!("bad read answer {body:?}: {e}") },
            },
            404 => Outcome::ok(Ret::NotFound),
            _ => status_outcome(status, &body),
        }
    }

    /// `POST /v1/txn` with `body`: the answer's JSON, or the outcome of a
    /// failure (a transaction that writes may have happened if the answer
    /// was lost or a 504).
    pub async fn txn(&self, base: &str, body: &Value) -> std::result::Result<Value, Outcome> {
        let (status, text) = self.exchange(self.client.post(format!("{base}/v1/txn")).json(body)).await?;
        match status {
            200 => serde_json::from_str(&text)
                .map_err(|e| Outcome::Indeterminate { reason: format!("bad txn answer {text:?}: {e}") }),
            _ => Err(status_outcome(status, &text)),
        }
    }

    /// A write, conditional if `if_version` is given.
    pub async fn write(&self, base: &str, key: &str, value: u64, if_version: Option<u64>) -> Outcome {
        let body = match if_version {
            Some(v) => json!({ "value": value, "if_version": v }),
            None => json!({ "value": value }),
        };
        let (status, text) = match self.exchange(self.client.put(Self::kv_url(base, key)).json(&body)).await {
            Ok(answer) => answer,
            Err(outcome) => return outcome,
        };
        match status {
            200 => match serde_json::from_str::<WriteBody>(&text) {
                Ok(w) => Outcome::ok(Ret::Written { version: w.version }),
                Err(e) => Outcome::Indeterminate { reason: format!("bad write answer {text:?}: {e}") },
            },
            409 => {
                let current = serde_json::from_str::<ErrorBody>(&text).ok().and_then(|e| e.error.version);
                Outcome::ok(Ret::Conflict { current })
            }
            _ => status_outcome(status, &text),
        }
    }

    /// A delete, conditional if `if_version` is given: the tombstone's
    /// version, 404, or 409 with the current version.
    pub async fn delete(&self, base: &str, key: &str, if_version: Option<u64>) -> Outcome {
        let mut url = Self::kv_url(base, key);
        if let Some(v) = if_version {
            url.push_str(&format!("?if_version={v}"));
        }
        let (status, text) = match self.exchange(self.client.delete(url)).await {
            Ok(answer) => answer,
            Err(outcome) => return outcome,
        };
        match status {
            200 => match serde_json::from_str::<WriteBody>(&text) {
                Ok(w) => Outcome::ok(Ret::Written { version: w.version }),
                Err(e) => Outcome::Indeterminate { reason: format!("bad delete answer {text:?}: {e}") },
            },
            404 => Outcome::ok(Ret::NotFound),
            409 => {
                let current = serde_json::from_str::<ErrorBody>(&text).ok().and_then(|e| e.error.version);
                Outcome::ok(Ret::Conflict { current })
            }
            _ => status_outcome(status, &text),
        }
    }

    /// One page of a workload scan (`GET /v1/kv?start=&limit=`, with the
    /// workload's timeout), as the scan checker records it: `ours` are the
    /// items whose key `keep` accepts. `Err` carries the outcome of a page
    /// that did not come back.
    pub async fn scan_record(
        &self,
        base: &str,
        start: &str,
        limit: usize,
        keep: impl Fn(&str) -> bool,
    ) -> std::result::Result<PageRecord, Outcome> {
        let url = format!("{base}/v1/kv?start={}&limit={limit}", percent_encode(start));
        let (status, body) = self.exchange(self.client.get(url)).await?;
        if status != 200 {
            return Err(status_outcome(status, &body));
        }
        let page: ScanBody = serde_json::from_str(&body)
            .map_err(|e| Outcome::Indeterminate { reason: format!("bad scan answer: {e}") })?;
        Ok(PageRecord {
            start: start.to_string(),
            items: page.items.len() as u32,
            first: page.items.first().map(|i| i.key.clone()),
            last: page.items.last().map(|i| i.key.clone()),
            ours: page
                .items
                .iter()
                .filter(|i| keep(&i.key))
                .map(|i| (i.key.clone(), our_value(i.value.get()).unwrap_or(u64::MAX)))
                .collect(),
            next: page.next,
        })
    }

    /// The nodes holding a replica of the metadata group (group 0), from
    /// `GET /admin/directory` (its `meta` descriptor).
    pub async fn meta_replicas(&self, base: &str) -> Result<Vec<u64>> {
        let dir: Value = self.admin_get(base, "/admin/directory").await?;
        let replicas = dir
            .pointer("/meta/replicas")
            .and_then(|r| r.as_array())
            .ok_or_else(|| Error::Http(format!("{base}/admin/directory: no metadata group descriptor")))?;
        Ok(replicas.iter().filter_map(|r| r.get("node_id").and_then(|n| n.as_u64())).collect())
    }

    /// `GET /admin/operations/{id}`, untyped.
    pub async fn operation(&self, base: &str, id: u64) -> Result<Value> {
        self.admin_get(base, &format!("/admin/operations/{id}")).await
    }

    async fn admin_send(&self, method: Method, url: String, body: Option<Value>) -> Result<Answer> {
        let mut req = self.admin.request(method, &url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| Error::Http(format!("{url}: {}", error_chain(&e))))?;
        let status = resp.status().as_u16();
        let body = resp.text().await.map_err(|e| Error::Http(format!("{url}: {e}")))?;
        Ok(Answer { status, body })
    }

    async fn admin_get<T: DeserializeOwned>(&self, base: &str, path: &str) -> Result<T> {
        let a = self.admin_send(Method::GET, format!("{base}{path}"), None).await?;
        if a.status != 200 {
            return Err(Error::Http(format!("{base}{path}: {} {}", a.status, a.body)));
        }
        serde_json::from_str(&a.body).map_err(|e| Error::Http(format!("{base}{path}: {e}")))
    }

    /// `POST {path}` with a JSON body; any status is an `Ok` answer.
    pub async fn admin_post(&self, base: &str, path: &str, body: Value) -> Result<Answer> {
        self.admin_send(Method::POST, format!("{base}{path}"), Some(body)).await
    }

    /// Whether the node answers `/health` with 200.
    pub async fn healthy(&self, base: &str) -> bool {
        self.admin_send(Method::GET, format!("{base}/health"), None).await.is_ok_and(|a| a.status == 200)
    }

    pub async fn shards(&self, base: &str) -> Result<Vec<ShardInfo>> {
        self.admin_get(base, "/admin/shards").await
    }

    pub async fn ranges(&self, base: &str) -> Result<Vec<RangeInfo>> {
        self.admin_get(base, "/admin/ranges").await
    }

    pub async fn nodes(&self, base: &str) -> Result<Vec<NodeInfo>> {
        self.admin_get(base, "/admin/nodes").await
    }

    /// `GET /admin/operations`, untyped.
    pub async fn operations(&self, base: &str) -> Result<Vec<Value>> {
        self.admin_get(base, "/admin/operations").await
    }

    /// Whether this node says it leads Raft group `group` (its `/metrics`).
    pub async fn leads_group(&self, base: &str, group: u64) -> Result<bool> {
        let a = self.admin_send(Method::GET, format!("{base}/metrics"), None).await?;
        let needle = format!("cleave_raft_is_leader{{group=\"{group}\"}}");
        Ok(a.body.lines().any(|l| l.starts_with(&needle) && l.trim_end().ends_with(" 1")))
    }

    /// One page of `GET /v1/kv?start=&limit=`.
    pub async fn scan_page(&self, base: &str, start: &str, limit: usize) -> Result<ScanPage> {
        let url = format!("{base}/v1/kv?start={}&limit={limit}", percent_encode(start));
        let a = self.admin_send(Method::GET, url.clone(), None).await?;
        if a.status != 200 {
            return Err(Error::Http(format!("{url}: {} {}", a.status, a.body)));
        }
        let page: ScanBody = serde_json::from_str(&a.body).map_err(|e| Error::Http(format!("{url}: {e}")))?;
        let items = page.items.into_iter().map(|i| (i.key, our_value(i.value.get()).unwrap_or(u64::MAX))).collect();
        Ok((items, page.next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_statuses_are_classified_by_the_api_contract() {
        let body = r#"{"error":{"code":"unavailable","message":"no leader"}}"#;
        assert!(matches!(status_outcome(503, body), Outcome::Failed { .. }));
        assert!(matches!(status_outcome(421, ""), Outcome::Failed { .. }));
        assert!(status_outcome(504, "").is_indeterminate());
        assert!(status_outcome(500, "").is_indeterminate());
    }

    #[test]
    fn missing_routes_are_recognised() {
        let missing =
            Answer { status: 404, body: r#"{"error":{"code":"not_found","message":"no such endpoint"}}"#.into() };
        assert!(missing.is_missing_route());
        let unknown_shard =
            Answer { status: 404, body: r#"{"error":{"code":"not_found","message":"no shard 9"}}"#.into() };
        assert!(!unknown_shard.is_missing_route());
    }

    #[test]
    fn keys_are_percent_encoded() {
        assert_eq!(percent_encode("ab/x y"), "ab%2Fx%20y");
        assert_eq!(our_value("42"), Some(42));
        assert_eq!(our_value("\"42\""), None);
    }
}
